"""LM-head GEMM benchmark: bf16 vs fp32-logit vs FP8 and INT8 variants, side by side in one run, with the byte floor.

    python benchmarks/bench_head_gemm.py --out DIR            # JSON + markdown table + PNG plots
    python benchmarks/bench_head_gemm.py --plot-from DIR/head_gemm.json --out DIR   # plots only (no GPU)
    python benchmarks/bench_head_gemm.py --table T.json --out DIR   # with another config table (e.g. a new tune)

Config tables are tuned by ``python -m vllm_lmhead_quant.tune`` (JSON per GPU, vllm_lmhead_quant/kernels/configs/).

Why it measures the way it does: at decode the head GEMM is a stream of the V x H weight, so the honest
comparison is against the bytes it must read. Every timed call is preceded by a write of a buffer larger than
L2 (the weight is never L2-resident, as in a real decode step where the body ran in between), timed alone with
CUDA events, and the median of many calls is reported. TF32 is off so fp32 variants are real fp32. The floor
columns are weight bytes over the device-to-device copy bandwidth measured in the same run (bytes read +
written per second, the same way the copy is counted).
"""

from __future__ import annotations

import argparse
import json
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
    "int8_g32_bf16_out",
    "int8_g32_fp32_out",
    "int8_g128_fp32_out",
    "int8_dequant_chunks_cublas_fp32_out",
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
    "int8_g32_bf16_out": "int8-g32",
    "int8_g32_fp32_out": "int8-g32",
    "int8_g128_fp32_out": "int8-g128",
    "int8_dequant_chunks_cublas_fp32_out": "int8",
}
GROUPED = {"int8-g32": 32, "int8-g128": 128}  # fp16 group scales (quant.quantize_rows group_size)


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


def make_variants(torch, wo, x, w, quants, path=None):
    """name -> zero-arg callable. Per-call variants rebuild their weight every call, as the real paths do.
    ``quants``: format name -> (q, scale); ``path``: the kernel path (default: the device's)."""
    import torch.nn.functional as F

    from_fp8 = torch.bfloat16
    q, scale = quants["fp8"]
    q8, scale8 = quants["int8"]
    q32, g32 = quants["int8-g32"]
    q128, g128 = quants["int8-g128"]

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
        "fp8_bf16_out": lambda: wo.weight_only_mm(x, q, scale, torch.bfloat16, path=path),
        "fp8_fp32_out": lambda: wo.weight_only_mm(x, q, scale, torch.float32, path=path),
        "int8_bf16_out": lambda: wo.weight_only_mm(x, q8, scale8, torch.bfloat16, path=path),
        "int8_fp32_out": lambda: wo.weight_only_mm(x, q8, scale8, torch.float32, path=path),
        "int8_g32_bf16_out": lambda: wo.weight_only_mm(x, q32, g32, torch.bfloat16, path=path),
        "int8_g32_fp32_out": lambda: wo.weight_only_mm(x, q32, g32, torch.float32, path=path),
        "int8_g128_fp32_out": lambda: wo.weight_only_mm(x, q128, g128, torch.float32, path=path),
        "int8_dequant_chunks_cublas_fp32_out": lambda: dequant_chunks_cublas(torch, x, q8, scale8),
    }


def dequant_chunks_cublas(torch, x, q, scale, chunk_bytes: int = 16 << 20):
    """A large-M candidate for issue #32: vocab chunks of the INT8 weight converted to bf16 (exact) into one buffer
    small enough to stay in L2, each multiplied by cuBLAS (fp32 out, transposed so a chunk's rows are contiguous),
    then scaled per row. Returns the [N, M] result's transpose (a view). Three launches a chunk: only for large M,
    where cuBLAS's tensor-core time, not the weight stream, is the floor."""
    n, k = q.shape
    rows = max(256, chunk_bytes // (2 * k))
    out_t = torch.empty(n, x.shape[0], dtype=torch.float32, device=x.device)
    buf = torch.empty(rows, k, dtype=x.dtype, device=x.device)
    xt = x.t()
    for s in range(0, n, rows):
        e = min(s + rows, n)
        b = buf[: e - s]
        b.copy_(q[s:e])
        torch.mul(torch.mm(b, xt, out_dtype=torch.float32), scale[s:e, None], out=out_t[s:e])
    return out_t.t()


def make_weights(torch, quant, v, h):
    """bf16 weight and its quantized forms, ``{format name: (q, scale)}`` (per row, and INT8 with group scales)."""
    g = torch.Generator(device="cuda").manual_seed(v + h)
    w = (torch.randn(v, h, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    quants = {name: quant.quantize_rows(w, fmt) for name, fmt in quant.FORMATS.items()}
    return w, quants | {name: quant.quantize_rows(w, quant.INT8, group_size=gs) for name, gs in GROUPED.items()}


def run_bench(args, torch, quant, wo) -> dict:
    timer = Timer(torch, graphs=args.graphs)
    bw = copy_bandwidth(torch, timer)
    res = {
        "timing": "cuda_graph_replay" if args.graphs else "eager",
        "rounds": args.rounds,
        "env": env_info(torch),
        "copy_bw_Bps": bw,
        "config_table": (args.path or wo._current_path()).table.source,
        "results": [],
        "accuracy": None,
        "host_launch_us": {},
    }
    print(f"# {res['env']}  copy bw {bw / 1e12:.2f} TB/s", flush=True)
    for v, h in args.shapes:
        w, quants = make_weights(torch, quant, v, h)
        for m in args.ms:
            x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
            fns = make_variants(torch, wo, x, w, quants, args.path)
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
    from vllm_lmhead_quant.quant import dequantize_rows

    refs = {name: x.double() @ dequantize_rows(q, s, torch.float64).T for name, (q, s) in quants.items()}
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--plot-from", type=Path, help="only make the markdown and plots from an earlier JSON")
    p.add_argument(
        "--shapes",
        type=lambda s: [tuple(map(int, t.split("x"))) for t in s.split(",")],
        default=list(SHAPES),
        help="comma-separated VxH list",
    )
    p.add_argument("--ms", type=lambda s: [int(t) for t in s.split(",")], default=list(MS))
    p.add_argument("--table", type=Path, help="a JSON config table to use instead of the device's")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--acc-shape", type=lambda s: tuple(map(int, s.split("x"))), default=(151936, 4096))
    p.add_argument("--acc-m", type=int, default=64)
    p.add_argument("--graphs", action="store_true", help="time CUDA-graph replays instead of eager calls")
    p.add_argument("--budget", type=float, default=0.4, help="seconds of timed calls per cell")
    p.add_argument("--rounds", type=int, default=4, help="round-robin passes over the variants per cell")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.path = None

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

    if args.table:  # this run's kernel path with another table (the device's own facts otherwise)
        from vllm_lmhead_quant.kernels import device, tables

        args.path = device.path_for(device.facts(torch.cuda.current_device()), tables.load(args.table))
        print("using config table", args.table)

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
