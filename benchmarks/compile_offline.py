"""Compile the head kernels for a GPU architecture on a machine without one, and report what each config uses.

    python benchmarks/compile_offline.py [--target sm_80 sm_89 gfx942 ...] [--q int8 fp8] [--act bf16 fp16] [--sass]
                                         [--group 0 32]   # 0: per-row scales; G: fp16 group scales of G weights

Needs only ``triton`` (it ships ptxas and cuobjdump), no GPU and no vLLM: device time is the scarce resource, and
shared memory per block, registers, spills and the instruction mix (HGMMA present? how many conversion
instructions per weight?) are answered by the compiler. Prints one row per table config and weight format.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package without installing it (this venv needs only torch and triton)

from vllm_lmhead_quant.kernels import offline  # noqa: E402


def cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True).stdout


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill bytes) from the cubin's resource report."""
    usage = cuobjdump(cubin, "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


def opcode_counts(sass: str) -> dict:
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    counts: dict = {}
    for op in ops:
        base = op.split(".")[0]
        counts[base] = counts.get(base, 0) + 1
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", nargs="+", default=["sm_90"], choices=list(offline.TARGETS))
    ap.add_argument("--q", nargs="+", default=["fp8", "int8"])
    ap.add_argument("--act", nargs="+", default=["bf16"])
    ap.add_argument("--out", default="bf16")
    ap.add_argument("--fp16-math", choices=["table", "on", "off"], default="table")
    ap.add_argument("--sass", action="store_true", help="print the SASS opcode mix of each kernel's main loop")
    ap.add_argument("--dump", type=Path, help="write PTX/SASS files here")
    ap.add_argument("--group", nargs="+", type=int, default=[0], help="0 (per-row scales) and/or group sizes")
    args = ap.parse_args()
    print(f"{'target':<7} {'max M':>6} {'config':<60} {'q':<5} {'act':<5} {'G':>3} {'smem KiB':>8} {'regs':>5} "
          f"{'stack':>5}")  # fmt: skip
    for target in map(offline.TARGETS.get, args.target):
        path = offline.path_for(target)
        for q in args.q:
            for max_m, cfg in path.table.rows[q]:
                if args.fp16_math != "table":
                    cfg = cfg._replace(fp16_math=args.fp16_math == "on")
                for act, group in [(a, g) for a in args.act for g in args.group]:
                    head = f"{target.name:<7} {min(max_m, 99999):>6} {str(tuple(cfg)):<60} {q:<5} {act:<5} {group:>3}"
                    try:
                        k = offline.compile_config(cfg, q, target, path, act, args.out, group)
                    except Exception as e:  # report and go on: one bad config must not hide the others
                        print(f"{head} FAILED: {str(e).splitlines()[-1][:200]}")
                        continue
                    notes = ""
                    if target.backend == "cuda" and (args.sass or args.dump):
                        sass = cuobjdump(k.asm["cubin"], "--dump-sass")
                        c = opcode_counts(sass)
                        keys = ("HGMMA", "HMMA", "PRMT", "LOP3", "HADD2", "HMUL2", "FADD", "F2FP", "I2F", "F2F",
                                "UTMALDG", "LDS", "LDSM", "LDG", "STS", "SHFL", "BAR")  # fmt: skip
                        notes = " ".join(f"{key}={c[key]}" for key in keys if key in c)
                        if args.dump:
                            args.dump.mkdir(parents=True, exist_ok=True)
                            stem = f"{target.name}_m{max_m if max_m < 1 << 60 else 'inf'}_{q}_{act}_g{group}"
                            (args.dump / f"{stem}.ptx").write_text(k.asm["ptx"])
                            (args.dump / f"{stem}.sass").write_text(sass)
                    regs, spills = resources(k.asm["cubin"]) if target.backend == "cuda" else (-1, -1)
                    print(f"{head} {k.metadata.shared / 1024:>8.0f} {regs:>5} {spills:>5}  {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
