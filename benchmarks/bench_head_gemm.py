"""LM-head GEMM benchmark: bf16 vs fp32-logit vs FP8 and INT8 variants, side by side in one run, with the byte floor.

    python benchmarks/bench_head_gemm.py --out DIR            # JSON + markdown table + PNG plots
    python benchmarks/bench_head_gemm.py --plot-from DIR/head_gemm.json --out DIR   # plots only (no GPU)
    python benchmarks/bench_head_gemm.py --tune --out DIR     # time candidate kernel configs per M bucket
    python benchmarks/bench_head_gemm.py --tune --tune-format int8 --out DIR   # the same with INT8 weights

Why it measures the way it does: at decode the head GEMM is a stream of the V x H weight, so the honest
comparison is against the bytes it must read. Every timed call is preceded by a write of a buffer larger than
L2 (the weight is never L2-resident, as in a real decode step where the body ran in between), timed alone with
CUDA events, and the median of many calls is reported. TF32 is off so fp32 variants are real fp32. The floor
columns are weight bytes over the device-to-device copy bandwidth measured in the same run (bytes read +
written per second, the same way the copy is counted).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SHAPES = ((151936, 1024), (151936, 4096), (131072, 5120), (262144, 2560))
MS = (1, 8, 64, 256, 2048)
VARIANTS = (
    "bf16",
    "out_dtype_fp32",
    "upcast_fp32_per_call",
    "fp8_dequant_per_call",
    "fp8_dequant_scaled_per_call",
    "scaled_mm_w8a8",
    "fp8_bf16_out",
    "fp8_fp32_out",
    "int8_bf16_out",
    "int8_fp32_out",
)
# Variants computed from a quantized weight, and which: their "own" accuracy reference is that weight.
QUANTIZED_VARIANTS = {
    "fp8_dequant_per_call": "fp8",
    "fp8_dequant_scaled_per_call": "fp8",
    "scaled_mm_w8a8": "fp8",
    "fp8_bf16_out": "fp8",
    "fp8_fp32_out": "fp8",
    "int8_bf16_out": "int8",
    "int8_fp32_out": "int8",
}


def _import_kernel():
    """Import the kernel module from the package, or by file path if the package import fails (no vLLM)."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    try:
        from vllm_lmhead_quant import quant
        from vllm_lmhead_quant.kernels import weight_only as wo
    except ImportError:
        import importlib.util

        def load(name, rel):
            spec = importlib.util.spec_from_file_location(name, root / rel)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod

        quant = load("_quant", "vllm_lmhead_quant/quant.py")
        wo = load("_wo", "vllm_lmhead_quant/kernels/weight_only.py")
    return quant, wo


class Timer:
    """Median of per-call CUDA-event timings, each call preceded by an L2-flushing write.

    With ``graphs`` (``--graphs``) each variant is captured once in a CUDA graph and the graph is replayed:
    that times the GPU work alone, as in a graph-captured decode step, instead of Python launch overhead
    (which widens the spread of the ~80 µs kernels of small heads in eager timing). Variants that cannot be
    captured are timed eagerly, and the row says so.
    """

    def __init__(self, torch, flush_bytes: int = 256 << 20, graphs: bool = False):
        self.torch = torch
        self.graphs = graphs
        self.flush_buf = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")

    def __call__(self, fn, *, min_reps: int = 10, max_reps: int = 200, budget_s: float = 0.4) -> dict:
        us, mode = self.samples(fn, min_reps=min_reps, max_reps=max_reps, budget_s=budget_s)
        return summarize(us, mode)

    def samples(self, fn, *, min_reps: int, max_reps: int, budget_s: float) -> tuple[list[float], str]:
        """Per-call µs of ``fn`` (each after an L2 flush), and how it ran ("eager" or "graph")."""
        torch = self.torch
        fn()  # warm-up (compilation, cuBLAS heuristics, allocator)
        torch.cuda.synchronize()
        run, mode, graph = fn, "eager", None
        if self.graphs:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                run, mode = graph.replay, "graph"
            except Exception:  # not capturable: time it eagerly
                graph = None
                torch.cuda.synchronize()
        run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        est = max(time.perf_counter() - t0, 1e-6)
        reps = int(min(max_reps, max(min_reps, budget_s / (est + 2e-4))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            self.flush_buf.fill_(1)
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        us = [s.elapsed_time(e) * 1e3 for s, e in events]
        del graph
        return us, mode


def summarize(us: list[float], mode: str) -> dict:
    us = sorted(us)
    return {
        "median_us": statistics.median(us),
        "p10_us": us[len(us) // 10],
        "p90_us": us[(9 * len(us)) // 10],
        "reps": len(us),
        "mode": mode,
    }


def interleaved(timer: Timer, fns: dict, names: list, rounds: int, budget_s: float) -> dict:
    """``name -> summary`` (or ``{"error": ...}``) of ``fns[name]``, timed round robin in ``rounds`` passes, each
    pass starting one variant later: clock and temperature drift during a cell (large-M GEMMs run the H100 at its
    power limit) then hits every variant alike. Timed one after another, drift moved ratios by 5-10 %."""
    samples: dict[str, list[float]] = {name: [] for name in names}
    out: dict[str, dict] = {name: {} for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if "error" in out[name]:
                continue
            try:
                us, mode = timer.samples(fns[name], min_reps=4, max_reps=80, budget_s=budget_s / rounds)
                samples[name] += us
                out[name]["mode"] = mode
            except Exception as e:  # e.g. a torch build without row-wise _scaled_mm, a config out of resources
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    for name in names:
        if "error" not in out[name]:
            out[name].update(summarize(samples[name], out[name]["mode"]))
    return out


def host_launch_us(torch, fn, n: int = 200) -> float:
    """Host (Python + driver) time per eager call, GPU not waited for: what graphs save per call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def copy_bandwidth(torch, timer: Timer, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(7)
    dst = torch.empty_like(src)
    t = Timer(torch, graphs=False)(lambda: dst.copy_(src), min_reps=10, max_reps=30)
    return 2 * nbytes / (t["median_us"] * 1e-6)


def env_info(torch) -> dict:
    info = {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def make_variants(torch, wo, x, w, quants):
    """name -> zero-arg callable. Per-call variants rebuild their weight every call, as the real paths do.
    ``quants``: format name -> (q, scale)."""
    import torch.nn.functional as F

    from_fp8 = torch.bfloat16
    q, scale = quants["fp8"]
    q8, scale8 = quants["int8"]

    def w8a8():
        # Per-token dynamic activation quant (a w8a8 head must do it every call) + row-wise _scaled_mm.
        xs = (x.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp_min(1e-12)
        xq = (x.float() / xs).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)

    return {
        "bf16": lambda: F.linear(x, w),
        "out_dtype_fp32": lambda: torch.mm(x, w.t(), out_dtype=torch.float32),
        "upcast_fp32_per_call": lambda: F.linear(x.float(), w.float()),
        "fp8_dequant_per_call": lambda: F.linear(x, q.to(from_fp8)),
        "fp8_dequant_scaled_per_call": lambda: F.linear(x, (q.float() * scale[:, None]).to(from_fp8)),
        "scaled_mm_w8a8": w8a8,
        "fp8_bf16_out": lambda: wo.weight_only_mm(x, q, scale, torch.bfloat16),
        "fp8_fp32_out": lambda: wo.weight_only_mm(x, q, scale, torch.float32),
        "int8_bf16_out": lambda: wo.weight_only_mm(x, q8, scale8, torch.bfloat16),
        "int8_fp32_out": lambda: wo.weight_only_mm(x, q8, scale8, torch.float32),
    }


def make_weights(torch, quant, v, h):
    """bf16 weight and its quantized forms, ``{format name: (q, scale)}``."""
    g = torch.Generator(device="cuda").manual_seed(v + h)
    w = (torch.randn(v, h, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    return w, {name: quant.quantize_rows(w, fmt) for name, fmt in quant.FORMATS.items()}


def run_bench(args, torch, quant, wo) -> dict:
    timer = Timer(torch, graphs=args.graphs)
    bw = copy_bandwidth(torch, timer)
    res = {
        "timing": "cuda_graph_replay" if args.graphs else "eager",
        "rounds": args.rounds,
        "env": env_info(torch),
        "copy_bw_Bps": bw,
        "config_table": [[max_m, _key(cfg)] for max_m, cfg in wo._CONFIG_TABLE],
        "int8_rows": {max_m: _key(cfg) for max_m, cfg in wo._INT8_ROWS.items()},
        "results": [],
        "accuracy": None,
        "host_launch_us": {},
    }
    print(f"# {res['env']}  copy bw {bw / 1e12:.2f} TB/s", flush=True)
    for v, h in args.shapes:
        w, quants = make_weights(torch, quant, v, h)
        for m in args.ms:
            x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
            fns = make_variants(torch, wo, x, w, quants)
            rows = interleaved(timer, fns, args.variants, args.rounds, args.budget)
            for name in args.variants:
                row = {"V": v, "H": h, "M": m, "variant": name, **rows[name]}
                res["results"].append(row)
                print(row, flush=True)
            if not res["host_launch_us"]:  # once, at the first shape and M
                for name in ("bf16", "out_dtype_fp32", "scaled_mm_w8a8", "fp8_bf16_out", "int8_bf16_out"):
                    res["host_launch_us"][name] = host_launch_us(torch, fns[name])
                print("host launch us", res["host_launch_us"], flush=True)
            del x, fns
            (args.out / "head_gemm.json").write_text(json.dumps(res, indent=1))  # incremental
        if (v, h) == tuple(args.acc_shape):
            res["accuracy"] = accuracy(torch, wo, w, quants, args.acc_m)
        del w, quants
        torch.cuda.empty_cache()
    return res


def accuracy(torch, wo, w, quants, m) -> dict:
    """Per variant: max abs / RMS logit error vs fp64 of its own weight (arithmetic error) and vs fp64 of the
    bf16 weight (arithmetic + quantization error)."""
    h = w.shape[1]
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    ref_bf16 = x.double() @ w.double().T
    refs = {name: (x.double() @ q.double().T) * s.double() for name, (q, s) in quants.items()}
    out = {"V": w.shape[0], "H": h, "M": m, "ref_rms": ref_bf16.pow(2).mean().sqrt().item(), "variants": {}}
    for name, fn in make_variants(torch, wo, x, w, quants).items():
        try:
            y = fn().double()
        except Exception as e:
            out["variants"][name] = {"error": str(e)[:200]}
            continue
        own = refs[QUANTIZED_VARIANTS[name]] if name in QUANTIZED_VARIANTS else ref_bf16
        d_own, d_bf16 = y - own, y - ref_bf16
        out["variants"][name] = {
            "max_abs_vs_own_fp64": d_own.abs().max().item(),
            "rms_vs_own_fp64": d_own.pow(2).mean().sqrt().item(),
            "max_abs_vs_bf16w_fp64": d_bf16.abs().max().item(),
            "rms_vs_bf16w_fp64": d_bf16.pow(2).mean().sqrt().item(),
        }
        del y
    return out


def to_markdown(res: dict) -> str:
    env, bw = res["env"], res["copy_bw_Bps"]
    table: dict[tuple, dict] = {}
    eager: set[tuple] = set()
    for r in res["results"]:
        table.setdefault((r["V"], r["H"], r["M"]), {})[r["variant"]] = r.get("median_us")
        eager.add((r["V"], r["H"], r["M"], r["variant"])) if r.get("mode") == "eager" else None
    variants = [v for v in VARIANTS if any(v in d for d in table.values())]
    sm = env["capability"].replace(".", "")
    timed = (
        "eager calls"
        if res.get("timing", "eager") == "eager"
        else "CUDA-graph replays (* = not capturable, timed eagerly)"
    )
    n_rounds = res.get("rounds", 1)
    rounds = f"variants interleaved in {n_rounds} round-robin passes" if n_rounds > 1 else "one variant at a time"
    lines = [
        f"# LM-head GEMM, median µs (ratio to bf16), {env['gpu']} (sm_{sm}, {env['sms']} SMs)",
        "",
        (
            f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, python {env['python']}. "
            f"CUDA events around {timed}, "
            f"L2 flushed before each call, {rounds}, TF32 off. Copy bandwidth "
            f"{bw / 1e12:.2f} TB/s (read+write); floors = weight bytes / that bandwidth "
            "(bf16: 2VH, fp8 and int8: VH + 4V)."
        ),
        "",
        "| V x H | M | " + " | ".join(variants) + " | bf16 floor | 8-bit floor |",
        "|---|---|" + "---|" * (len(variants) + 2),
    ]
    for (v, h, m), d in table.items():
        base = d.get("bf16")
        cells = []
        for name in variants:
            t = d.get(name)
            star = "*" if (v, h, m, name) in eager and res.get("timing", "eager") != "eager" else ""
            if t is None:
                cells.append("err")
            elif name == "bf16" or not base:
                cells.append(f"{t:.0f}{star}")
            else:
                cells.append(f"{t:.0f}{star} ({t / base:.2f})")
        floor_bf16 = 2 * v * h / bw * 1e6
        floor_fp8 = (v * h + 4 * v) / bw * 1e6
        cells += [f"{floor_bf16:.0f}", f"{floor_fp8:.0f}" + (f" ({floor_fp8 / base:.2f})" if base else "")]
        lines.append(f"| {v}x{h} | {m} | " + " | ".join(cells) + " |")
    if res.get("host_launch_us"):
        first = res["results"][0]
        lines += [
            "",
            f"Host time per eager call (Python + launch, V x H = {first['V']}x{first['H']}, "
            f"M = {first['M']}): "
            + ", ".join(f"{k} {t:.0f} µs" for k, t in res["host_launch_us"].items())
            + ". Hidden whenever the GPU is busier than the host, and gone under CUDA graphs.",
        ]
    acc = res.get("accuracy")
    if acc:
        lines += [
            "",
            f"## Accuracy, V x H = {acc['V']}x{acc['H']}, M = {acc['M']} (logit RMS {acc['ref_rms']:.3g})",
            "",
            (
                "own = fp64 product with the variant's own weight (bf16 for bf16 variants, the dequantized "
                "FP8/INT8 weight for the others): arithmetic error. bf16w = fp64 product with the original bf16 "
                "weight: adds the quantization error. fp8_dequant_per_call leaves the scale out (it times the bare "
                "e4m3 -> bf16 conversion), so its error is not meaningful."
            ),
            "",
            "| variant | max abs vs own | RMS vs own | max abs vs bf16w | RMS vs bf16w |",
            "|---|---|---|---|---|",
        ]
        for name, a in acc["variants"].items():
            if "error" in a:
                lines.append(f"| {name} | err | | | |")
                continue
            lines.append(
                f"| {name} | {a['max_abs_vs_own_fp64']:.3g} | {a['rms_vs_own_fp64']:.3g} | "
                f"{a['max_abs_vs_bf16w_fp64']:.3g} | {a['rms_vs_bf16w_fp64']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> list[Path]:
    """One panel per V x H: µs vs M (log-log) per variant, with the two floors; and ratio to bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["V"], r["H"]) for r in res["results"]}, key=lambda s: s[1])
    bw = res["copy_bw_Bps"]
    paths = []
    for kind in ("time", "ratio"):
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), squeeze=False)
        for ax, (v, h) in zip(axes[0], shapes, strict=True):
            rows = [r for r in res["results"] if (r["V"], r["H"]) == (v, h) and "median_us" in r]
            base = {r["M"]: r["median_us"] for r in rows if r["variant"] == "bf16"}
            for name in VARIANTS:
                pts = sorted((r["M"], r["median_us"]) for r in rows if r["variant"] == name)
                if not pts or (kind == "ratio" and name == "bf16"):
                    continue
                xs = [p[0] for p in pts]
                ys = [p[1] if kind == "time" else p[1] / base[p[0]] for p in pts]
                ours = name.endswith("_out")
                ax.plot(xs, ys, "-o" if ours else "--.", label=name, linewidth=2 if ours else 1)
            ms = sorted(base)
            if kind == "time":
                ax.plot(ms, [2 * v * h / bw * 1e6] * len(ms), "k:", label="bf16 byte floor")
                ax.plot(ms, [(v * h + 4 * v) / bw * 1e6] * len(ms), "k-.", label="8-bit byte floor")
                ax.set_yscale("log")
                ax.set_ylabel("median µs")
            else:
                ax.axhline(1.0, color="k", linewidth=0.8)
                ax.axhline(0.55, color="r", linestyle=":", linewidth=0.8, label="0.55x target")
                ax.plot(ms, [(v * h + 4 * v) / bw * 1e6 / base[m] for m in ms], "k-.", label="8-bit floor / bf16")
                ax.set_yscale("log")
                ax.set_ylabel("time / bf16")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)")
            ax.set_title(f"V x H = {v} x {h}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        env = res["env"]
        fig.suptitle(f"LM-head GEMM on {env['gpu']} (torch {env['torch']}, triton {env['triton']})")
        fig.tight_layout()
        path = out / f"head_gemm_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def tune_candidates(wo, m: int, fmt: str = "fp8") -> list:
    """Hand-picked candidates for one M (pruned by earlier H100 sweeps, docs/bench/tune.json): swap-AB GEMV-like
    tiles for small M, big tiles for large M; pointer and TMA loads; and from M = 32 on each also with fp16 math
    (bf16 activations pre-scaled per token into fp16: a one-instruction e4m3 convert). Triton's automatic warp
    specialization (``tl.range(warp_specialize=True)``) was tried on the TMA configs with Triton 3.6 on an H100 and
    hit illegal memory accesses, so it is not a candidate; nor are the persistent schedules of the 2026-11-25 sweep
    (docs/bench/head_gemm_h100.md: miscompiled as a nested loop, slower as a flat one)."""
    C = wo.KernelConfig
    if m <= 16:
        base = [C(16, 64, 128, 4, 6), C(16, 64, 128, 4, 6, tma=True), C(16, 128, 128, 8, 6, tma=True),
                C(16, 64, 256, 4, 4, tma=True), C(16, 256, 128, 8, 4, tma=True)]  # fmt: skip
        if fmt == "int8":  # INT8 converts to fp16 in half the instructions of bf16: every config both ways
            return base + [c._replace(fp16_math=True) for c in base]
        return base + [C(16, 64, 128, 4, 6, tma=True, fp16_math=True)]
    if m <= 32:
        base = [C(32, 128, 128, 8, 5, tma=True), C(32, 64, 256, 4, 4, tma=True), C(32, 64, 128, 4, 6, tma=True)]
    elif m <= 64:
        base = [C(64, 128, 128, 4, 4, tma=True), C(64, 128, 64, 4, 6, tma=True), C(64, 256, 128, 8, 4, tma=True),
                C(64, 128, 256, 4, 3, tma=True), C(64, 64, 128, 4, 6, tma=True), C(64, 128, 128, 8, 4, tma=True),
                C(64, 128, 128, 4, 6, tma=True)]  # fmt: skip
        if fmt == "int8":
            base += [C(64, 128, 256, 8, 3, tma=True), C(64, 256, 64, 8, 4, tma=True), C(64, 128, 128, 8, 3, tma=True)]
    elif m <= 128:
        base = [C(128, 128, 64, 8, 4, tma=True), C(128, 128, 64, 8, 4, False, True), C(128, 256, 64, 8, 3, tma=True),
                C(128, 128, 128, 8, 3, tma=True)]  # fmt: skip
    else:  # compute-bound: fp16 math always won here (tune.json), so only the schedules vary. The 128 x 128
        # tiles fit two programs per SM (one's epilogue overlaps the other's main loop; the big tiles fit one).
        base = [C(256, 128, 128, 8, 3, tma=True), C(256, 128, 64, 8, 4, tma=True), C(128, 256, 64, 8, 3, tma=True),
                C(256, 128, 64, 8, 3, tma=True), C(128, 256, 128, 8, 3, tma=True), C(128, 128, 64, 4, 4, tma=True),
                C(128, 128, 64, 8, 4, tma=True), C(128, 128, 128, 8, 3, tma=True), C(128, 128, 128, 4, 3, tma=True),
                C(128, 128, 64, 8, 4, swap_ab=False, tma=True)]  # fmt: skip
        fp16 = [c._replace(fp16_math=True) for c in base]
        if fmt == "int8":  # also bf16 math, and two-stage pipelines (fewer live tiles)
            return fp16 + base + [c._replace(num_stages=2) for c in fp16]
        return fp16
    return base + [c._replace(fp16_math=True) for c in base]


def _no_conversion_call(torch, wo, cfg, x16, w16, scale):
    """Our kernel with fp16 weights (its in-register convert is then a no-op): the Triton GEMM's own ceiling for
    this config, to tell conversion cost from schedule cost. Diagnostic only (the result is not the head's)."""
    y = torch.empty((x16.shape[0], w16.shape[0]), dtype=torch.bfloat16, device=x16.device)
    wo._gemm(x16, w16, scale, y, cfg)
    return y


def _key(cfg) -> str:
    return repr(tuple(cfg))


def _from_key(wo, key: str):
    return wo.KernelConfig(*ast.literal_eval(key))


def check_candidate(torch, wo, x, q, scale, cfg) -> str | None:
    """None if ``cfg`` computes fp32 logits within fp32 accumulation error of the fp64 product with the dequantized
    weight (tests/test_kernel_cuda.py's typical bound), else why not. Every tuned config is checked before it is
    timed, with fp32 output (bf16 rounding would hide a wrong low-order result): Triton 3.6 miscompiles some
    schedules (benchmarks/diag_int8.py)."""
    try:
        y = wo.weight_only_mm(x, q, scale, torch.float32, config=cfg).double()
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:160]}"
    ref = (x.double() @ q.double().T) * scale.double()
    excess = ((y - ref).abs().max() / (1e-5 * ref.abs().max())).item()
    return None if excess <= 1.0 else f"wrong result: error {excess:.3g}x the fp32 bound"


def run_tune(args, torch, quant, wo) -> dict:
    """Time every candidate config per (shape, M) with bf16 activations and bf16 output, interleaved with cuBLAS
    bf16 (``--rounds`` passes, as in the benchmark), and report the best. The best config is then also timed with
    fp32 output and, from M = 64 on, with fp16 weights (no conversion: the Triton schedule's own ceiling)."""
    import torch.nn.functional as F

    timer = Timer(torch)
    out = {"env": env_info(torch), "rounds": args.rounds, "format": args.tune_format, "cells": []}
    for v, h in args.shapes:
        w, quants = make_weights(torch, quant, v, h)
        q, scale = quants[args.tune_format]
        for m in args.tune_ms:
            x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
            fns = {"bf16": lambda x=x, w=w: F.linear(x, w)}
            wrong = {}
            for cfg in [None, *tune_candidates(wo, m, args.tune_format)]:
                name = "default" if cfg is None else _key(cfg)
                fns[name] = lambda c=cfg, x=x, q=q, s=scale: wo.weight_only_mm(x, q, s, torch.bfloat16, config=c)
                err = check_candidate(torch, wo, x, q, scale, cfg)
                if err is not None:  # a miscompiled or out-of-resources config is never timed, never picked
                    wrong[name] = err
                    del fns[name]
                    print(f"   {name}: {err}", flush=True)
            timed = interleaved(timer, fns, list(fns), args.rounds, args.budget)
            timed.update({name: {"error": err} for name, err in wrong.items()})
            base = timed.pop("bf16")["median_us"]
            configs = {k: r.get("median_us", r.get("error")) for k, r in timed.items()}
            cell = {"V": v, "H": h, "M": m, "bf16_us": base, "default": str(wo.pick_config(m, v, h, q.dtype)),
                    "configs": configs}  # fmt: skip
            ok = {k: t for k, t in configs.items() if isinstance(t, float)}
            best = min(ok, key=ok.get)
            print(
                f"V={v} H={h} M={m}: bf16 {base:.0f}us default {ok.get('default', math.nan):.0f}us "
                f"({ok.get('default', math.nan) / base:.2f}) best {best} {ok[best]:.0f}us ({ok[best] / base:.2f})",
                flush=True,
            )
            best_cfg = None if best == "default" else _from_key(wo, best)
            extra = {"best": fns[best], "best_fp32_out": lambda c=best_cfg, x=x, q=q, s=scale: (
                wo.weight_only_mm(x, q, s, torch.float32, config=c))}  # fmt: skip
            if m >= 64:  # how much of the gap to cuBLAS is the e4m3 conversion?
                w16, x16 = w.half(), x.half()
                cfg16 = best_cfg or wo.pick_config(m, v, h, q.dtype)
                extra["ceiling_fp16_weights"] = lambda c=cfg16, a=x16, b=w16, s=scale: _no_conversion_call(
                    torch, wo, c, a, b, s
                )
            extra_t = interleaved(timer, extra, list(extra), args.rounds, args.budget / 2)
            for name in ("best_fp32_out", "ceiling_fp16_weights"):
                if name in extra_t:
                    r = extra_t[name]
                    cell[f"{name}_vs_best"] = r["median_us"] / extra_t["best"]["median_us"] if "median_us" in r else r
                    print(f"   {name}: {cell[f'{name}_vs_best']} x best", flush=True)
            out["cells"].append(cell)
            (args.out / "tune.json").write_text(json.dumps(out, indent=1))  # incremental: survives a timeout
            del x, fns, extra
        del w, q, scale, quants
        torch.cuda.empty_cache()
    table = table_from_tune(out, wo)
    out["table"] = [[max_m, _key(cfg)] for max_m, cfg in table]
    (args.out / "tune.json").write_text(json.dumps(out, indent=1))
    print("tuned table:", out["table"])
    if args.apply:
        apply_table(wo, table)
    return out


def apply_table(wo, table) -> None:
    """Rewrite the ``<tuned-table>`` block of the kernel module's source with ``table`` (and use it now)."""
    path = Path(wo.__file__)
    src = path.read_text()
    head, rest = src.split("# <tuned-table>\n", 1)
    _, tail = rest.split("# </tuned-table>\n", 1)
    rows = []
    for max_m, cfg in table:
        bound = "1 << 62" if max_m >= 1 << 62 else str(max_m)
        defaults = wo.KernelConfig._field_defaults
        extra = "".join(f", {f}={getattr(cfg, f)}" for f in defaults if getattr(cfg, f) != defaults[f])
        rows.append(f"    ({bound}, KernelConfig({', '.join(map(str, tuple(cfg)[:5]))}{extra})),")
    block = "_CONFIG_TABLE: tuple[tuple[int, KernelConfig], ...] = (\n" + "\n".join(rows) + "\n)\n"
    path.write_text(head + "# <tuned-table>\n" + block + "# </tuned-table>\n" + tail)
    wo._CONFIG_TABLE = tuple(table)
    print("rewrote the table in", path)


def table_from_tune(tune: dict, wo) -> list:
    """Config table from tune cells: per M bucket (ends at each tuned M), the config with the best geometric
    mean of time / best-time over all shapes and Ms of the bucket (robust across hidden sizes)."""
    ms = sorted({c["M"] for c in tune["cells"]})
    table, lo = [], 0
    for i, hi in enumerate(ms):
        cells = [c for c in tune["cells"] if lo < c["M"] <= hi]
        scores: dict[str, list[float]] = {}
        for c in cells:
            timed = {k: t for k, t in c["configs"].items() if isinstance(t, float) and k != "default"}
            best = min(timed.values())
            for k, t in timed.items():
                scores.setdefault(k, []).append(math.log(t / best))
        full = {k: sum(v) / len(v) for k, v in scores.items() if len(v) == len(cells)}
        if full:
            cfg = _from_key(wo, min(full, key=full.get))
            table.append((hi if i < len(ms) - 1 else 1 << 62, cfg))
        lo = hi
    merged = []  # neighbouring buckets with the same winner become one row
    for max_m, cfg in table:
        if merged and merged[-1][1] == cfg:
            merged[-1] = (max_m, cfg)
        else:
            merged.append((max_m, cfg))
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--plot-from", type=Path, help="only make the markdown and plots from an earlier JSON")
    p.add_argument("--tune", action="store_true", help="time candidate kernel configs instead")
    p.add_argument("--apply", action="store_true", help="with --tune or --table-from: write the table into the module")
    p.add_argument("--table-from", type=Path, help="benchmark with the config table derived from a tune.json")
    p.add_argument(
        "--shapes",
        type=lambda s: [tuple(map(int, t.split("x"))) for t in s.split(",")],
        default=list(SHAPES),
        help="comma-separated VxH list",
    )
    p.add_argument("--ms", type=lambda s: [int(t) for t in s.split(",")], default=list(MS))
    p.add_argument(
        "--tune-ms",
        type=lambda s: [int(t) for t in s.split(",")],
        default=[1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048],
    )
    p.add_argument("--tune-format", choices=["fp8", "int8"], default="fp8", help="weight format for --tune")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--acc-shape", type=lambda s: tuple(map(int, s.split("x"))), default=(151936, 4096))
    p.add_argument("--acc-m", type=int, default=64)
    p.add_argument("--graphs", action="store_true", help="time CUDA-graph replays instead of eager calls")
    p.add_argument("--budget", type=float, default=0.4, help="seconds of timed calls per cell")
    p.add_argument("--rounds", type=int, default=4, help="round-robin passes over the variants per cell")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.plot_from:
        res = json.loads(args.plot_from.read_text())
        (args.out / "head_gemm.md").write_text(to_markdown(res))
        for path in plot(res, args.out):
            print("wrote", path)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    quant, wo = _import_kernel()

    if args.tune:
        run_tune(args, torch, quant, wo)
        return 0
    if args.table_from:
        table = table_from_tune(json.loads(args.table_from.read_text()), wo)
        print("using config table from", args.table_from, table)
        wo._CONFIG_TABLE = tuple(table)
        if args.apply:  # write it into the module too (the package then uses it everywhere)
            apply_table(wo, table)

    res = run_bench(args, torch, quant, wo)
    (args.out / "head_gemm.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (args.out / "head_gemm.md").write_text(md)
    print(md)
    try:
        for path in plot(res, args.out):
            print("wrote", path)
    except ImportError:
        print(f"matplotlib missing: run with --plot-from {args.out / 'head_gemm.json'} where it is installed")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
