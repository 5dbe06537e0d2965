"""vLLM end to end on a GPU host: the head methods against vLLM's own fp32 head, KV-cache tokens, decode speed.

    python benchmarks/gpu_e2e.py --part eager  --out DIR [--only MODEL,...] [--heads ...]
                               # accuracy (bitwise vs oracle), memory, KV tokens
    python benchmarks/gpu_e2e.py --part graphs --out DIR [--only MODEL,...] [--heads bf16,fp8,...] [--batch 64]
                 [--profile]   # CUDA graphs: decode throughput at batch 1 and --batch of bf16, vLLM's fp32 head
                               # (oracle), ours fp32 and FP8, each engine in its own process; --profile adds a trace
    python benchmarks/gpu_e2e.py --plot-from A.json[,B.json] --out DIR   # PNG of the throughput JSONs (no GPU)

Random-weight checkpoints are built on the host (no download): a Qwen3-0.6B-shaped model (hidden 1024, vocab
151936, head-dominated; tied like the real one, and an untied twin) and a hidden-4096 Llama-shaped one, 2-4 layers
each. Two models with real bodies use vLLM's dummy weights instead (``*-dummy``: Qwen3-0.6B's 28 layers and
Qwen3-8B's shape, only config.json on disk). Prompts are token ids (no tokenizer needed). Writes one JSON per part
into DIR (docs/gpu-e2e.md reads them).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import torch  # noqa: E402

MODELS = {
    "qwen3-0.6b-shape-tied": dict(arch="qwen3", hidden=1024, inter=3072, layers=4, heads=16, kv=8, tied=True),
    "qwen3-0.6b-shape-untied": dict(arch="qwen3", hidden=1024, inter=3072, layers=4, heads=16, kv=8, tied=False),
    "llama-h4096-untied": dict(arch="llama", hidden=4096, inter=11008, layers=2, heads=32, kv=8, tied=False),
    # Real bodies, vLLM's dummy weights (only config.json on disk): Qwen3-0.6B's 28 layers (untied twin) and Qwen3-8B.
    "qwen3-0.6b-dummy-untied": dict(arch="qwen3", hidden=1024, inter=3072, layers=28, heads=16, kv=8, tied=False,
                                    dummy=True),  # fmt: skip
    "qwen3-8b-shape-dummy": dict(arch="qwen3", hidden=4096, inter=12288, layers=36, heads=32, kv=8, tied=False,
                                 dummy=True),  # fmt: skip
}
# Engine arguments of the dummy-weight models: no checkpoint, and graphs only for decode batches up to the one timed
# (capturing vLLM's ~67 default sizes x 37 pieces of a 36-layer body takes minutes).
DUMMY_KW = {"load_format": "dummy", "compilation_config": {"backend": "eager",
            "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]}}  # fmt: skip
VOCAB = 151936
ORACLE = {"hf_overrides": {"head_dtype": "float32"}}
FP32 = {"quantization": "bf16_last_layer_fp32"}
FP8 = {"quantization": "fp8_lm_head"}  # fp32 logits by default since 2026-11-30
FP8_MODEL_LOGITS = {"quantization": "fp8_lm_head", "additional_config": {"lm_head_quant": {"logits_dtype": "model"}}}
FP8_TIED = {"quantization": "fp8_lm_head", "additional_config": {"lm_head_quant": {"tied": "quantize"}}}
INT8 = {"quantization": "int8_lm_head"}
INT8_TIED = {"quantization": "int8_lm_head", "additional_config": {"lm_head_quant": {"tied": "quantize"}}}
HEADS = {"bf16": {}, "oracle": ORACLE, "fp32": FP32, "fp8": FP8, "int8": INT8}


def build(name: str, root: str) -> str:
    spec = MODELS[name]
    path = os.path.join(root, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import transformers

    cls_cfg = transformers.Qwen3Config if spec["arch"] == "qwen3" else transformers.LlamaConfig
    cfg = cls_cfg(vocab_size=VOCAB, hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                  num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                  num_key_value_heads=spec["kv"], head_dim=128 if spec["arch"] == "qwen3" else None,
                  tie_word_embeddings=spec["tied"], max_position_embeddings=4096, torch_dtype="bfloat16")  # fmt: skip
    model_cls = transformers.Qwen3ForCausalLM if spec["arch"] == "qwen3" else transformers.LlamaForCausalLM
    if spec.get("dummy"):  # vLLM initializes the weights itself (load_format="dummy")
        cfg.architectures = [model_cls.__name__]  # else vLLM resolves a pooling model
        cfg.save_pretrained(path)
        transformers.GenerationConfig.from_model_config(cfg).save_pretrained(path)  # as save_pretrained writes
        return path
    with torch.device("cuda"):
        model = model_cls(cfg).to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:  # embeddings/head 0.08: realistic logit spread; body 0.02
                std = 0.08 if ("embed" in n or "lm_head" in n) else 0.02
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") * std)
    model.save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return path


def prompts(n: int, length: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, VOCAB, (length,), generator=g).tolist()} for _ in range(n)]


def inspect_head(model):
    head = getattr(model, "lm_head", None)
    embed = dict(model.named_modules()).get("model.embed_tokens")
    return {
        "method": type(head.quant_method).__name__,
        "dtype": str(head.weight.dtype),
        "param_bytes": sum(p.numel() * p.element_size() for p in head.parameters(recurse=False)),
        "is_embed_module": head is embed,
        "embed_dtype": str(embed.weight.dtype),
        # a body layer's method, as vLLM picked it for the checkpoint (Marlin for 4-bit checkpoints on CUDA)
        "body_method": type(getattr(dict(model.named_modules()).get("model.layers.0.mlp.down_proj"), "quant_method",
                                None)).__name__,  # fmt: skip
    }


def engine(path, eager: bool, **kw):
    from vllm import LLM

    comp = {} if eager else {"compilation_config": {"backend": "eager"}}
    return LLM(model=path, skip_tokenizer_init=True, enforce_eager=eager, gpu_memory_utilization=0.5,
               max_model_len=2048, seed=0, **{**comp, **kw})  # fmt: skip


def close(llm):
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def isolated(fn: str, path: str, eager: bool, kw: dict, **opts) -> dict:
    """Run one engine in a fresh process: in-process engines do not give their GPU memory back on teardown,
    which would shrink every later engine's KV cache."""
    spec = json.dumps({"fn": fn, "path": path, "eager": eager, "kw": kw, "opts": opts})
    proc = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    for line in log.splitlines():
        if "[vllm_lmhead_quant]" in line:
            print("   ", line.split("[vllm_lmhead_quant]")[-1].strip(), flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{fn} {kw} failed:\n{log[-4000:]}")
    res = json.loads(log.split("@@RESULT@@")[1])
    m = re.search(r"GPU KV cache size: ([\d,]+) tokens", log)
    res["kv_tokens"] = int(m.group(1).replace(",", "")) if m else None
    m = re.search(r"Model loading took ([\d.]+) GiB", log)
    res["model_load_gib"] = float(m.group(1)) if m else None
    return res


def greedy_logprobs(llm) -> dict:
    """8 prompts x 128 random ids: the logprob of every actual prompt token, 16 greedy tokens and their logprobs."""
    from vllm import SamplingParams

    ps = prompts(8, 128)
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=1, prompt_logprobs=1, detokenize=False)
    outs = llm.generate(ps, params, use_tqdm=False)
    prompt_lp, sample_lp, tokens = [], [], []
    for p, o in zip(ps, outs):
        ids = p["prompt_token_ids"]
        prompt_lp += [step[t].logprob for t, step in zip(ids[1:], o.prompt_logprobs[1:])]
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        sample_lp += [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]
    return {"prompt_lp": prompt_lp, "sample_lp": sample_lp, "tokens": tokens}


def accuracy_run(path, eager: bool, kw: dict) -> dict:
    t0 = time.perf_counter()
    llm = engine(path, eager, **kw)
    start_s = time.perf_counter() - t0
    res = {"start_s": round(start_s, 1), **greedy_logprobs(llm), "head": llm.apply_model(inspect_head)[0]}
    close(llm)
    return res


def compare(run: dict, ref: dict) -> dict:
    d = [a - b for a, b in zip(run["prompt_lp"], ref["prompt_lp"])]
    same_prefix = [a == b for a, b in zip(run["tokens"], ref["tokens"])]
    return {
        "bitwise_prompt": run["prompt_lp"] == ref["prompt_lp"],
        "bitwise_all": run["prompt_lp"] == ref["prompt_lp"] and run["sample_lp"] == ref["sample_lp"]
        and run["tokens"] == ref["tokens"],
        "rms": math.sqrt(sum(x * x for x in d) / len(d)),
        "max": max(abs(x) for x in d),
        "n": len(d),
        "greedy_same": f"{sum(same_prefix)}/{len(same_prefix)}",
    }


def throughput(path, eager: bool, kw: dict, n_seqs=64, new_tokens=256, repeats=5, profile=False) -> dict:
    from vllm import SamplingParams

    llm = engine(path, eager, **kw)
    out = decode_rates(llm, (1, n_seqs), new_tokens, repeats)
    if profile:
        out[f"profile_batch{n_seqs}"] = profile_decode(llm, prompts(n_seqs, 32, seed=9), SamplingParams, new_tokens=32)
    close(llm)
    return out


def decode_rates(llm, batches, new_tokens: int, repeats: int) -> dict:
    """Decode tokens/s per batch size: a warm-up generate each, then the median of ``repeats`` timed ones (32-token
    prompts, ``ignore_eos``)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, detokenize=False)
    for batch in batches:
        llm.generate(prompts(batch, 32, seed=7), params, use_tqdm=False)  # warm-up
    out = {}
    for batch in batches:
        ps = prompts(batch, 32, seed=9)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate(ps, params, use_tqdm=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"batch{batch}_tok_per_s"] = round(batch * new_tokens / sorted(times)[len(times) // 2], 1)
        out[f"batch{batch}_all_tok_per_s"] = [round(batch * new_tokens / t, 1) for t in times]
    return out


def profile_decode(llm, ps, SamplingParams, new_tokens: int) -> dict:
    """One short decode under torch.profiler: wall time, GPU-busy time (sum of kernel self times) and the top
    kernels and CPU ops. Tells a host-bound step from a GPU-bound one, and what a head adds to either."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, detokenize=False)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            llm.generate(ps, params, use_tqdm=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
    except Exception as e:  # noqa: BLE001 - a diagnostic; the throughput numbers stand without it
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}

    def dev_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    def row(e):
        return {"name": e.key[:120], "count": e.count, "self_gpu_us": round(dev_us(e), 1),
                "self_cpu_us": round(e.self_cpu_time_total, 1)}  # fmt: skip

    kernels = [e for e in events if "CUDA" in str(getattr(e, "device_type", ""))]
    return {
        "steps": new_tokens,
        "wall_ms": round(wall * 1e3, 2),
        "gpu_busy_ms": round(sum(dev_us(e) for e in kernels) / 1e3, 2),
        "top_kernels": [row(e) for e in sorted(kernels, key=dev_us, reverse=True)[:15]],
        "top_cpu_ops": [row(e) for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]],
    }


def plot_throughput(paths: list[str], out_png: str) -> None:
    """Decode throughput per model and batch size: one bar per (run, head) at the median, every repeat as a dot.
    Several JSON files (e.g. a run in the other head order) appear side by side, labelled by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(os.path.splitext(os.path.basename(p))[0], json.loads(Path(p).read_text())) for p in paths]
    models = sorted({m for _, r in runs for m in r["models"]})
    batches = {}  # model -> the batch sizes any run timed it at
    for m in models:
        keys = {k for _, r in runs for res in r["models"].get(m, {}).values() for k in res}
        batches[m] = sorted(int(k[5:].split("_")[0]) for k in keys if k.startswith("batch") and "_all_" in k)
    cols = max(len(b) for b in batches.values())
    fig, axes = plt.subplots(len(models), cols, figsize=(5.5 * cols, 3.2 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for col in range(len(batches[model]), cols):
            axes[row][col].axis("off")
        for col, batch in enumerate(batches[model]):
            ax, labels, x = axes[row][col], [], 0
            for run_name, r in runs:
                for key, res in r["models"].get(model, {}).items():
                    if not key.startswith("throughput_") or f"batch{batch}_all_tok_per_s" not in res:
                        continue
                    all_ = res[f"batch{batch}_all_tok_per_s"]
                    ax.bar(x, res[f"batch{batch}_tok_per_s"], color="C0" if "bf16" in key else "C1", alpha=0.6)
                    ax.plot([x] * len(all_), all_, "k.", markersize=4)
                    labels.append(f"{key.removeprefix('throughput_')}\n{run_name.removeprefix('gpu_e2e_graphs')}")
                    x += 1
            ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=20)
            ax.set_title(f"{model}, batch {batch}", fontsize=9)
            ax.set_ylabel("tokens/s")
    first = runs[0][1]
    fig.suptitle(f"vLLM {first.get('vllm')} decode, CUDA graphs, {first.get('gpu')} (bar: median, dots: repeats)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print("wrote", out_png)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["eager", "graphs"])
    ap.add_argument("--out")
    ap.add_argument("--models", default="/tmp/lmhq-models")
    ap.add_argument("--only", help="comma-separated model names (default: all of the part)")
    ap.add_argument("--heads", default="bf16,oracle,fp32,fp8,int8", help="heads, in this order (graphs part)")
    ap.add_argument("--graphs", action="store_true", help="eager part: the same accuracy runs with CUDA graphs on")
    ap.add_argument("--profile", action="store_true", help="graphs part: also profile a short decode at --batch")
    ap.add_argument("--batch", type=int, default=64, help="graphs part: the large decode batch (besides 1)")
    ap.add_argument("--repeats", type=int, default=5, help="graphs part: timed decodes per batch size")
    ap.add_argument("--plot-from", help="comma-separated graphs-part JSONs: write --out/e2e_throughput.png only")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one engine in this process
    args = ap.parse_args()
    if args.plot_from:
        os.makedirs(args.out, exist_ok=True)
        plot_throughput(args.plot_from.split(","), os.path.join(args.out, "e2e_throughput.png"))
        return
    import vllm

    import vllm_lmhead_quant

    vllm_lmhead_quant.register()  # the entry point does this when the package is pip-installed
    if args.one:
        spec = json.loads(args.one)
        fn = {"accuracy": accuracy_run, "throughput": throughput}[spec["fn"]]
        res = fn(spec["path"], spec["eager"], spec["kw"], **spec.get("opts", {}))
        print("@@RESULT@@" + json.dumps(res) + "@@RESULT@@", flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "vllm": vllm.__version__,
              "part": args.part, "models": {}}  # fmt: skip
    if args.part == "eager":
        wanted = {h: HEADS[h] for h in args.heads.split(",")} | {"oracle": ORACLE}  # the oracle is the reference
        plan = {
            "qwen3-0.6b-shape-tied": {**wanted, "fp8_tied_quantize": FP8_TIED, "int8_tied_quantize": INT8_TIED},
            "llama-h4096-untied": {**wanted, "fp8_model_logits": FP8_MODEL_LOGITS},
        }
        if args.only:
            plan = {k: v for k, v in plan.items() if k in args.only.split(",")}
        for name, variants in plan.items():
            path = build(name, args.models)
            runs = {v: isolated("accuracy", path, not args.graphs, kw) for v, kw in variants.items()}
            summary = {}
            for v, r in runs.items():
                keep = ("kv_tokens", "model_load_gib", "head", "start_s")
                summary[v] = {"vs_oracle": compare(r, runs["oracle"]), **{k: r[k] for k in keep}}
                print(name, v, json.dumps(summary[v]), flush=True)
            report["models"][name] = summary
    else:  # throughput with CUDA graphs; the oracle too, to tell vLLM's cost of fp32 logits from ours
        out_json = os.path.join(args.out, "gpu_e2e_graphs.json")
        if os.path.exists(out_json):  # --only runs add to an earlier file
            with open(out_json) as f:
                report["models"] = json.load(f).get("models", {})
        names = args.only.split(",") if args.only else ["qwen3-0.6b-shape-untied", "llama-h4096-untied"]
        for name in names:
            path = build(name, args.models)
            entry = report["models"].setdefault(name, {})
            heads = HEADS
            extra = DUMMY_KW if MODELS[name].get("dummy") else {}
            if extra and args.batch > 64:  # graphs for the large batch too
                sizes = [*extra["compilation_config"]["cudagraph_capture_sizes"], args.batch]
                comp = {**extra["compilation_config"], "cudagraph_capture_sizes": sizes}
                extra = {**extra, "compilation_config": comp, "max_num_seqs": max(256, args.batch)}
            seen: dict[str, int] = {}
            for v in args.heads.split(","):  # a second order (e.g. fp8,bf16) or a head twice tells drift from cost
                seen[v] = seen.get(v, 0) + 1
                key = f"throughput_{v}" + (f"_run{seen[v]}" if seen[v] > 1 else "")
                entry[key] = isolated("throughput", path, False, {**heads[v], **extra}, profile=args.profile,
                                     n_seqs=args.batch, repeats=args.repeats)
                print(name, key, json.dumps(entry[key]), flush=True)
                with open(out_json, "w") as f:
                    json.dump(report, f, indent=1)
    report["cuda_graphs"] = args.part == "graphs" or args.graphs
    name = f"gpu_e2e_{args.part}{'_graphs' if args.graphs and args.part == 'eager' else ''}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
