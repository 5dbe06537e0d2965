"""Tensor parallel on a multi-GPU host: every head at TP=N and TP=1, memory per rank, speed and host time per call.

    source benchmarks/device_env.sh     # (after the bundle is installed) the entry point for the TP workers
    python benchmarks/gpu_tp.py --out DIR [--tp 2] [--heads bf16,oracle,fp32,fp8,int8] [--tps 2,1] [--profile]
    python benchmarks/gpu_tp.py --out DIR --tp 2 --throughput   # decode tok/s, Qwen3-8B-shaped dummy model

On the Qwen3-0.6B-shaped random checkpoint of ``gpu_e2e.py`` (vocab 151936, untied), eager: ``bf16_last_layer_fp32``
at TP=N vs ``hf_overrides={"head_dtype": "float32"}`` at TP=N (bitwise), bytes per rank, logprobs at TP=N vs TP=1,
and ``model.compute_logits`` timed inside the workers (all ranks at once, gather included): CUDA events (median of
50), back-to-back calls without a sync (host-bound time per call) and, with ``--profile``, the host time of the
head GEMM alone, of vLLM's gather alone, and the top host-side ops and Python functions of one rank's calls.
Writes ``gpu_tp.json`` (or ``gpu_tp_throughput.json``) into DIR.
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
BIG = "qwen3-8b-shape-dummy"


def head_facts(model) -> dict:
    """Runs on every rank (``LLM.apply_model``; pickled by reference, so module level). ``--profile`` reaches the
    workers through the environment they inherit."""
    profile = os.environ.get("LMHQ_BENCH_PROFILE") == "1"
    import torch

    head, lp = model.lm_head, model.logits_processor
    out = {
        "method": type(head.quant_method).__name__,
        "dtype": str(head.weight.dtype),
        "shape": list(head.weight.shape),
        "param_bytes": sum(p.numel() * p.element_size() for p in head.parameters(recurse=False)),
    }
    hidden = head.weight.shape[1]
    act = next(p.dtype for n, p in model.named_parameters() if n.endswith("norm.weight"))

    from vllm.distributed import get_tp_group

    tp_group = get_tp_group()

    def timed(fn, n=50) -> tuple[float, float, float]:
        """(CUDA-event median, host per call back to back, wall per call back to back), µs. Each event-timed call
        starts with the ranks aligned (a CPU barrier), as the body's collectives align them in a decode step;
        without it, TP 2 medians came out near 100 or near 200 µs from run to run for every head (docs/tp.md)."""
        for _ in range(5):
            fn()
        times = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if tp_group.world_size > 1:
                tp_group.barrier()
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e6
        return sorted(times)[n // 2], host, wall

    for m in (1, 64, 256):
        x = torch.randn(m, hidden, device=head.weight.device, dtype=act)
        ev, host, wall = timed(lambda x=x: model.compute_logits(x))
        for key, v in (("logits_us", ev), ("host_us", host), ("back_to_back_us", wall)):
            out.setdefault(key, {})[m] = round(v, 1)
        if profile:
            y = lp._apply_head(head, x, None)
            parts = {"head": lambda x=x: lp._apply_head(head, x, None), "gather": lambda y=y: lp._gather_logits(y)}
            for name, fn in parts.items():
                ev, host, wall = timed(fn)
                out.setdefault(f"{name}_only", {})[m] = {"event_us": round(ev, 1), "host_us": round(host, 1),
                                                        "back_to_back_us": round(wall, 1)}  # fmt: skip
    kernel = getattr(head.quant_method, "_bound", (None,) * 3)[2]
    if kernel is not None:  # the quantized head's BoundKernel: plans kept, calls served by them
        plans = list(kernel.plans.values())
        out["bound_kernel"] = {"hits": kernel.hits, "plans": len(plans),
                               "fp16_math_plans": sum(p.token_scale for p in plans),
                               "kept_pre_pass": sum(p.pre_runner is not None for p in plans)}  # fmt: skip
    if profile:
        out["profile_m1"] = host_profile(model, torch.randn(1, hidden, device=head.weight.device, dtype=act))
    return out


def host_profile(model, x, calls: int = 100) -> dict:
    """Where one rank's host time per ``compute_logits`` goes: torch.profiler's CPU ops and cProfile's Python
    functions, per call."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            model.compute_logits(x)
        torch.cuda.synchronize()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        model.compute_logits(x)
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
    return {
        "calls": calls,
        "cpu_ops": [
            {"name": e.key[:100], "count": e.count, "self_us_per_call": round(e.self_cpu_time_total / calls, 2)}
            for e in ops
        ],
        "cprofile": buf.getvalue()[-6000:],
    }


def run_one(path: str, kw: dict, profile: bool) -> dict:
    from vllm import LLM

    os.environ["LMHQ_BENCH_PROFILE"] = "1" if profile else "0"
    llm = LLM(model=path, skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.5,
              max_model_len=2048, seed=0, **kw)  # fmt: skip
    return {**gpu_e2e.greedy_logprobs(llm), "ranks": llm.apply_model(head_facts)}


def run_throughput(path: str, kw: dict) -> dict:
    return gpu_e2e.throughput(path, False, {**gpu_e2e.DUMMY_KW, **kw}, n_seqs=64, new_tokens=128, repeats=3)


def isolated(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or "@@RESULT@@" not in log:
        raise RuntimeError(f"{spec['kw']} failed:\n{log[-3000:]}")
    res = json.loads(log.split("@@RESULT@@")[1])
    res["plugin_lines"] = [ln.split("[vllm_lmhead_quant]")[-1].strip()[:200] for ln in log.splitlines()
                           if "[vllm_lmhead_quant]" in ln]  # fmt: skip
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tps", default=None, help="comma-separated TP sizes to run (default: --tp and 1)")
    ap.add_argument("--heads", default="bf16,oracle,fp32,fp8,int8")
    ap.add_argument("--profile", action="store_true", help="host-time breakdown and profiles in the workers")
    ap.add_argument("--throughput", action="store_true", help="decode tok/s at --tp on the Qwen3-8B-shaped model")
    ap.add_argument("--models", default="/tmp/lmhq-models")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        import vllm_lmhead_quant

        vllm_lmhead_quant.register()  # this process; the TP workers get it from the entry point
        spec = json.loads(args.one)
        res = run_throughput(spec["path"], spec["kw"]) if spec.get("throughput") else run_one(
            spec["path"], spec["kw"], spec.get("profile", False))  # fmt: skip
        print("@@RESULT@@" + json.dumps(res) + "@@RESULT@@", flush=True)
        return 0
    import torch
    import vllm

    os.makedirs(args.out, exist_ok=True)
    report = {"gpu": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}", "torch": torch.__version__,
              "vllm": vllm.__version__, "runs": {}}  # fmt: skip
    heads = args.heads.split(",")
    if args.throughput:
        report["model"] = BIG
        path = gpu_e2e.build(BIG, args.models)
        out = os.path.join(args.out, "gpu_tp_throughput.json")
        for h in heads:
            kw = {**gpu_e2e.HEADS[h], "tensor_parallel_size": args.tp}
            t0 = time.time()
            try:
                report["runs"][f"{h}_tp{args.tp}"] = r = isolated({"path": path, "kw": kw, "throughput": True})
            except RuntimeError as e:
                report["runs"][f"{h}_tp{args.tp}"] = r = {"error": str(e)[-1500:]}
            print(h, round(time.time() - t0), json.dumps({k: v for k, v in r.items() if "all" not in k})[:600],
                  flush=True)  # fmt: skip
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
        return 0
    report["model"] = MODEL
    path = gpu_e2e.build(MODEL, args.models)
    tps = [int(t) for t in (args.tps or f"{args.tp},1").split(",")]
    runs = {}
    out = os.path.join(args.out, "gpu_tp.json")
    for tp in tps:
        for h in heads:
            name = f"{h}_tp{tp}"
            t0 = time.time()
            try:
                runs[name] = r = isolated({"path": path, "kw": {**gpu_e2e.HEADS[h], "tensor_parallel_size": tp},
                                           "profile": args.profile})  # fmt: skip
            except RuntimeError as e:
                report["runs"][name] = {"error": str(e)[-1500:]}
                print(name, "FAILED", str(e)[-800:], flush=True)
                continue
            report["runs"][name] = {"ranks": r["ranks"], "plugin_lines": r["plugin_lines"]}
            keys = ("method", "logits_us", "host_us", "back_to_back_us", "head_only", "bound_kernel")
            brief = [{k: rk[k] for k in keys if k in rk} for rk in r["ranks"]]
            print(name, round(time.time() - t0), json.dumps(brief), flush=True)
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
    cmp = report["comparisons"] = {}
    for a, b in [("fp32_tp{n}", "oracle_tp{n}"), ("oracle_tp{n}", "oracle_tp1"), ("fp8_tp{n}", "fp8_tp1"),
                 ("int8_tp{n}", "int8_tp1"), ("fp8_tp{n}", "oracle_tp{n}"), ("int8_tp{n}", "oracle_tp{n}"),
                 ("bf16_tp{n}", "oracle_tp{n}")]:  # fmt: skip
        a, b = a.format(n=tps[0]), b.format(n=tps[0])
        if a in runs and b in runs and a != b:
            cmp[f"{a}_vs_{b}"] = gpu_e2e.compare(runs[a], runs[b])
            print(f"{a}_vs_{b}", json.dumps(cmp[f"{a}_vs_{b}"]), flush=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
