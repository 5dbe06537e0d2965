"""Tune the weight-only kernel's config table for this GPU and write it where the plugin looks first.

    python -m vllm_lmhead_quant.tune [--shape 151936x4096 ...] [--formats fp8,int8] [--out PATH]

For each weight format and token-count bucket it times a short list of candidate launch shapes (with CUDA events,
interleaved with cuBLAS bf16, median of rounds), after checking each candidate's fp32 output against an fp64
reference (Triton miscompiles some schedules: a wrong config is never picked), and keeps the one with the best
geometric mean over the shapes. Candidates that do not fit the GPU's shared memory are skipped. It takes a minute
or two (compiling dominates). The result goes to ``~/.cache/vllm_lmhead_quant/kernel_configs/<GPU name>.json``,
which every later engine on this machine uses (its start-up log names the table).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import math
import sys
from pathlib import Path

from vllm_lmhead_quant.kernels.tables import NO_LIMIT, KernelConfig, Table

# Token counts timed per bucket (bucket = the row's max M); decode sizes matter most for a head.
BUCKETS = {16: (1, 16), 32: (32,), 64: (64,), 128: (128,), NO_LIMIT: (256, 1024)}
SHAPES = ((151936, 4096), (151936, 1024))  # Qwen-family vocabulary at an 8B and a 0.6B model's hidden size


def candidates(max_m: int, fmt: str, tma: bool) -> list[KernelConfig]:
    """Launch shapes worth timing for one bucket, pruned by the H100 and H200 sweeps (docs/bench/): swap-AB
    GEMV-like tiles for decode, big tiles for prefill, each with bf16 and fp16 math (bf16 activations pre-scaled
    into fp16: the cheaper convert). Without TMA the same shapes run with pointer loads."""
    C = KernelConfig
    if max_m <= 16:
        base = [C(16, 64, 128, 4, 6), C(16, 128, 128, 8, 6), C(16, 64, 256, 4, 4), C(16, 256, 128, 8, 4)]
    elif max_m <= 32:
        base = [C(32, 128, 128, 8, 5), C(32, 64, 256, 4, 4), C(32, 64, 128, 4, 6)]
    elif max_m <= 64:
        base = [C(64, 128, 128, 8, 4), C(64, 128, 64, 4, 6), C(64, 256, 128, 8, 4), C(64, 128, 128, 4, 4)]
    elif max_m <= 128:
        base = [C(128, 128, 64, 8, 4), C(128, 128, 64, 8, 4, swap_ab=False), C(128, 256, 64, 8, 3),
                C(128, 128, 128, 8, 3)]  # fmt: skip
    else:  # compute-bound; Triton 3.6 miscompiles the 256 x 128 x 128 3-stage tile for INT8 (caught by check())
        base = [C(256, 128, 128, 8, 3), C(128, 256, 64, 8, 3), C(128, 256, 128, 8, 3), C(128, 128, 64, 8, 4),
                C(256, 128, 64, 8, 4)]  # fmt: skip
    out = []
    for cfg in base:
        for fp16_math in (False, True):
            out.append(cfg._replace(tma=tma, fp16_math=fp16_math))
    return out


def check(torch, wo, x, q, scale, ref, cfg, path) -> str | None:
    """None if ``cfg`` gives fp32 logits within fp32 accumulation error of ``ref`` (fp64), else why not."""
    y = torch.empty((x.shape[0], q.shape[0]), dtype=torch.float32, device=x.device)
    try:
        wo._run(x, q, scale, y, cfg, path)  # no shrinking: a config that does not fit is not a candidate
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:120]}"
    excess = ((y.double() - ref).abs().max() / (1e-5 * ref.abs().max())).item()
    return None if excess <= 1.0 else f"wrong result ({excess:.3g}x the fp32 bound)"


def time_us(torch, fns: dict, rounds: int, reps: int) -> dict:
    """Median over ``rounds`` of the mean time of ``reps`` back-to-back calls, per function, interleaved."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1000 / reps)
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def tune(shapes=SHAPES, formats=("fp8", "int8"), rounds: int = 5, reps: int = 10, progress: bool = True) -> dict:
    import torch
    import torch.nn.functional as F

    from vllm_lmhead_quant.kernels import device
    from vllm_lmhead_quant.kernels import weight_only as wo
    from vllm_lmhead_quant.quant import FORMATS, quantize_rows

    index = torch.cuda.current_device()
    path = device.device_path(index)
    if path is None or not wo.HAS_TRITON:
        raise SystemExit("this GPU has no weight-only kernel path (needs Triton and SM >= 8.0 or ROCm)")
    work = [(fmt, shape, max_m, m) for fmt in formats for shape in shapes for max_m, ms in BUCKETS.items() for m in ms]
    total = sum(len(candidates(max_m, fmt, path.tma)) for fmt, _, max_m, _ in work)
    bar = _bar(total, progress)
    cells = []
    for fmt, (v, h), max_m, m in work:
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(v, h, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        q, scale = quantize_rows(w, FORMATS[fmt])
        x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = (x.double() @ q.double().T) * scale.double()
        fns, errors = {"bf16": lambda x=x, w=w: F.linear(x, w)}, {}
        for cfg in candidates(max_m, fmt, path.tma):
            bar.set_postfix_str(f"{fmt} M={m} {tuple(cfg)[:5]}")
            err = check(torch, wo, x, q, scale, ref, cfg, path)
            if err is None:
                y = torch.empty((m, v), dtype=torch.bfloat16, device="cuda")
                fns[repr(tuple(cfg))] = lambda c=cfg, x=x, q=q, s=scale, y=y: wo._run(x, q, s, y, c, path)
            else:
                errors[repr(tuple(cfg))] = err
            bar.update(1)
        times = time_us(torch, fns, rounds, reps)
        cells.append({"format": fmt, "V": v, "H": h, "M": m, "max_m": max_m, "us": times, "errors": errors})
        del w, q, scale, x, ref, fns
        torch.cuda.empty_cache()
    bar.close()
    return {"cells": cells, "table": best_table(cells, formats, path.table)}


def best_table(cells: list, formats, fallback: Table) -> Table:
    """Per format and bucket, the config with the best geometric mean of time / bucket-best over its cells; a
    bucket where nothing ran keeps the current table's row."""
    rows = {}
    for fmt in formats:
        chosen = []
        for max_m in BUCKETS:
            mine = [c for c in cells if c["format"] == fmt and c["max_m"] == max_m]
            scores: dict[str, list[float]] = {}
            for c in mine:
                timed = {k: t for k, t in c["us"].items() if k != "bf16"}
                best = min(timed.values(), default=math.nan)
                for k, t in timed.items():
                    scores.setdefault(k, []).append(math.log(t / best))
            full = {k: sum(s) / len(s) for k, s in scores.items() if len(s) == len(mine)}
            if full:
                chosen.append((max_m, KernelConfig(*ast.literal_eval(min(full, key=full.get)))))
            else:
                chosen.append((max_m, next(c for m, c in fallback.rows[fmt] if max_m <= m)))
        rows[fmt] = tuple(chosen)
    return Table("tuned", rows)


def _bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="tuning", unit="config", disable=not enabled, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm comes with vLLM
        return _NoBar()


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", help="VxH of a head shard to tune for (repeatable); default "
                   "151936x4096 and 151936x1024")  # fmt: skip
    p.add_argument("--formats", default="fp8,int8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, help="where to write the table (default: the per-user folder the plugin reads)")
    p.add_argument("--details", type=Path, help="also write every timing as JSON here")
    args = p.parse_args(argv)

    import json

    import torch

    from vllm_lmhead_quant.kernels import tables

    if not torch.cuda.is_available():
        print("tune needs a GPU (CUDA or ROCm)", file=sys.stderr)
        return 2
    shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shape] if args.shape else list(SHAPES)
    formats = tuple(args.formats.split(","))
    name = torch.cuda.get_device_name()
    result = tune(shapes, formats, args.rounds)
    out = args.out or tables.USER / tables.file_name(name)
    import triton

    meta = {
        "device": name,
        "measured_on": f"{name}, torch {torch.__version__}, Triton {triton.__version__}, "
        f"{datetime.date.today().isoformat()}, shapes {', '.join(f'{v}x{h}' for v, h in shapes)}",
        "how": "python -m vllm_lmhead_quant.tune",
    }
    tables.dump(result["table"], out, **meta)
    if args.details:
        args.details.parent.mkdir(parents=True, exist_ok=True)
        args.details.write_text(json.dumps({**meta, "cells": result["cells"]}, indent=1))
    print(f"wrote {out}")
    for fmt in formats:
        for max_m, cfg in result["table"].rows[fmt]:
            cells = [c for c in result["cells"] if c["format"] == fmt and c["max_m"] == max_m]
            ratios = [c["us"][repr(tuple(cfg))] / c["us"]["bf16"] for c in cells if repr(tuple(cfg)) in c["us"]]
            bound = "any" if max_m >= NO_LIMIT else max_m
            shown = ", ".join(f"{r:.2f}" for r in ratios)
            print(f"  {fmt:<4} M <= {bound:<4} {tuple(cfg)}  time / bf16: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
