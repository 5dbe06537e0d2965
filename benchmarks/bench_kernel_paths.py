"""Every kernel path on one GPU, side by side: what each GPU family's path costs, measured where they can all run.

    python benchmarks/bench_kernel_paths.py [--out DIR] [--shapes 151936x4096,151936x1024] [--ms 1,16,64,256]

On a Hopper GPU the Ampere path (FP8 decoded from its bits, pointer loads, the 163 KiB generic table), the 99 KiB
path of Ada/consumer Blackwell (hardware convert, pointer loads), the ROCm-like path (no PTX either) and the generic
chunked path (no Triton, SM < 8.0) all run next to the native path and cuBLAS bf16. Times are medians of interleaved
rounds (CUDA events, 10 calls each); the weights exceed L2, so every call streams them from memory. This says what
the *conversion and loads* cost; an A100 or L40S has other bandwidth and clocks, so its own ratios differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--shapes", default="151936x4096,151936x1024")
    p.add_argument("--ms", default="1,16,64,256")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--table", type=Path, help="also time the native path with this JSON table (e.g. a new tune)")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from vllm_lmhead_quant import ops
    from vllm_lmhead_quant.kernels import device, tables
    from vllm_lmhead_quant.kernels import weight_only as wo
    from vllm_lmhead_quant.quant import FORMATS, quantize_rows
    from vllm_lmhead_quant.tune import time_us

    index = torch.cuda.current_device()
    facts = device.facts(index)
    native = device.device_path(index)

    def forced(capability, smem_kib, hip=False):
        return device.path_for(facts._replace(name="forced", capability=capability, smem_per_block=smem_kib << 10,
                                              hip=hip))  # fmt: skip

    paths = {
        f"native ({native.table.source})": native,
        "hopper, H100 table": device.path_for(facts, tables.load(tables.SHIPPED / "NVIDIA_H100_80GB_HBM3.json")),
        "ampere (A100 path)": forced((8, 0), 163),
        "ada / sm_120 (99 KiB)": forced((8, 9), 99),
        "rocm-like (64 KiB)": forced((9, 4), 64, hip=True),
    }
    if args.table:
        paths[f"native ({args.table.name})"] = device.path_for(facts, tables.load(args.table))
    rows = []
    for shape in args.shapes.split(","):
        v, h = map(int, shape.split("x"))
        w = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02
        for fmt in ("fp8", "int8"):
            q, scale = quantize_rows(w, FORMATS[fmt])
            for m in map(int, args.ms.split(",")):
                x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
                fns = {"bf16 (cuBLAS)": lambda x=x, w=w: F.linear(x, w)}
                for name, path in paths.items():
                    fns[name] = lambda x=x, q=q, s=scale, p=path: wo.weight_only_mm(x, q, s, torch.float32, path=p)
                fns["generic chunked"] = lambda x=x, q=q, s=scale: ops.chunked_logits(x, q, s, out_dtype=torch.float32)
                times = time_us(torch, fns, args.rounds, 10)
                base = times["bf16 (cuBLAS)"]
                ratios = {k: t / base for k, t in times.items()}
                rows.append({"V": v, "H": h, "format": fmt, "M": m, "us": times, "vs_bf16": ratios})
                print(v, h, fmt, m, " ".join(f"{k}: {t:.0f}us ({t / base:.2f})" for k, t in times.items()), flush=True)
        del w
        torch.cuda.empty_cache()
    import triton

    env = {"device": torch.cuda.get_device_name(index), "facts": facts._asdict(), "torch": torch.__version__,
           "triton": triton.__version__}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_paths.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    names = list(rows[0]["us"])
    lines = [(f"Measured on {env['device']} (torch {env['torch']}, Triton {env['triton']}): time per call / cuBLAS "
              "bf16 time, fp32 logits; median of interleaved rounds."), "",
             "| V x H | format | M | bf16 µs | " + " | ".join(names[1:]) + " |",
             "|---|---|---|---|" + "---|" * (len(names) - 1)]  # fmt: skip
    for r in rows:
        ratios = " | ".join(f"{r['vs_bf16'][n]:.2f}" for n in names[1:])
        lines.append(f"| {r['V']}x{r['H']} | {r['format']} | {r['M']} | {r['us'][names[0]]:.0f} | {ratios} |")
    (args.out / "kernel_paths.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
