"""Tensor parallel on a multi-GPU host: both head methods at TP=2 against vLLM's fp32 head, memory per rank, speed.

    python benchmarks/gpu_tp.py --out DIR [--tp 2]

Needs the package pip-installed (worker processes register the plugin through its entry point) and
``NCCL_NVLS_ENABLE=0``. On the Qwen3-0.6B-shaped random checkpoint of ``gpu_e2e.py`` (vocab 151936, untied), eager:
``bf16_last_layer_fp32`` at TP=N vs ``hf_overrides={"head_dtype": "float32"}`` at TP=N (bitwise), ``fp8_lm_head``
bytes per rank, logprobs at TP=N vs TP=1, and ``model.compute_logits`` timed inside the workers (CUDA events,
median of 50, gather included) at TP=N and TP=1. Writes ``gpu_tp.json`` into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_e2e  # noqa: E402  (sets vLLM env defaults; builds checkpoints)

MODEL = "qwen3-0.6b-shape-untied"


def head_facts(model) -> dict:
    """Runs on every rank (apply_model): the head's storage on this rank, and compute_logits timings."""
    import torch

    head = model.lm_head
    out = {
        "method": type(head.quant_method).__name__,
        "dtype": str(head.weight.dtype),
        "shape": list(head.weight.shape),
        "param_bytes": sum(p.numel() * p.element_size() for p in head.parameters(recurse=False)),
        "logits_us": {},
    }
    hidden = head.weight.shape[1]
    act = next(p.dtype for n, p in model.named_parameters() if n.endswith("norm.weight"))
    for m in (1, 64, 256):
        x = torch.randn(m, hidden, device=head.weight.device, dtype=act)
        for _ in range(5):
            model.compute_logits(x)
        times = []
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model.compute_logits(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        out["logits_us"][m] = sorted(times)[len(times) // 2]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):  # back to back, no sync: host time per call when the host is the bottleneck
            model.compute_logits(x)
        host = (time.perf_counter() - t0) / 50 * 1e6
        torch.cuda.synchronize()
        out.setdefault("back_to_back_us", {})[m] = (time.perf_counter() - t0) / 50 * 1e6
        out.setdefault("host_us", {})[m] = host
    return out


def run_one(path: str, kw: dict) -> dict:
    from vllm import LLM

    llm = LLM(model=path, skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.5,
              max_model_len=2048, seed=0, **kw)  # fmt: skip
    return {**gpu_e2e.greedy_logprobs(llm), "ranks": llm.apply_model(head_facts)}


def isolated(path: str, kw: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps({"path": path, "kw": kw})],
                          capture_output=True, text=True)  # fmt: skip
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or "@@RESULT@@" not in log:
        raise RuntimeError(f"{kw} failed:\n{log[-3000:]}")
    return json.loads(log.split("@@RESULT@@")[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--models", default="/tmp/lmhq-models")
    ap.add_argument("--runs", help="comma-separated subset of the run names (default: all)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        import vllm_lmhead_quant

        vllm_lmhead_quant.register()  # this process; the TP workers get it from the entry point
        spec = json.loads(args.one)
        print("@@RESULT@@" + json.dumps(run_one(spec["path"], spec["kw"])) + "@@RESULT@@", flush=True)
        return 0
    import torch
    import vllm

    os.makedirs(args.out, exist_ok=True)
    path = gpu_e2e.build(MODEL, args.models)
    tp = {"tensor_parallel_size": args.tp}
    plan = {
        f"oracle_tp{args.tp}": {**gpu_e2e.ORACLE, **tp},
        f"fp32_tp{args.tp}": {**gpu_e2e.FP32, **tp},
        f"fp8_tp{args.tp}": {**gpu_e2e.FP8, **tp},
        "oracle_tp1": gpu_e2e.ORACLE,
        "fp8_tp1": gpu_e2e.FP8,
    }
    report = {"gpu": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}", "torch": torch.__version__,
              "vllm": vllm.__version__, "model": MODEL, "runs": {}}  # fmt: skip
    if args.runs:
        plan = {k: v for k, v in plan.items() if k in args.runs.split(",")}
    runs = {}
    for name, kw in plan.items():
        runs[name] = r = isolated(path, kw)
        report["runs"][name] = {"ranks": r["ranks"]}
        print(name, json.dumps(r["ranks"]), flush=True)
        with open(os.path.join(args.out, "gpu_tp.json"), "w") as f:
            json.dump(report, f, indent=1)
    n = args.tp
    if len(runs) < len(plan) or args.runs:
        return 0
    report["fp32_tp_vs_oracle_tp"] = gpu_e2e.compare(runs[f"fp32_tp{n}"], runs[f"oracle_tp{n}"])
    report["oracle_tp_vs_tp1"] = gpu_e2e.compare(runs[f"oracle_tp{n}"], runs["oracle_tp1"])
    report["fp8_tp_vs_fp8_tp1"] = gpu_e2e.compare(runs[f"fp8_tp{n}"], runs["fp8_tp1"])
    report["fp8_tp_vs_oracle_tp"] = gpu_e2e.compare(runs[f"fp8_tp{n}"], runs[f"oracle_tp{n}"])
    for k in ("fp32_tp_vs_oracle_tp", "oracle_tp_vs_tp1", "fp8_tp_vs_fp8_tp1", "fp8_tp_vs_oracle_tp"):
        print(k, json.dumps(report[k]), flush=True)
    with open(os.path.join(args.out, "gpu_tp.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
