"""Compile the head kernels for a GPU architecture on a machine without one, and report what each config uses.

    python benchmarks/compile_offline.py [--arch 90] [--q int8 fp8] [--act bf16 fp16] [--sass]

Needs only ``triton`` (it ships ptxas and cuobjdump), no GPU and no vLLM: device time is the scarce resource, and
shared memory per block, registers, spills and the instruction mix (HGMMA present? how many conversion
instructions per weight?) are answered by the compiler. Prints one row per table config and weight format.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_kernel_module():
    spec = importlib.util.spec_from_file_location("_wo", ROOT / "vllm_lmhead_quant/kernels/weight_only.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TRITON_DTYPE = {"int8": "i8", "fp8": "fp8e4nv", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def compile_config(wo, cfg, q: str, act: str, out: str, arch: int, k: int = 4096):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    a, w, y = TRITON_DTYPE[act], TRITON_DTYPE[q], TRITON_DTYPE[out]
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SWAP_AB": cfg.swap_ab}
    token_scale = cfg.fp16_math and act == "bf16"
    if token_scale:
        a = "fp16"
    if cfg.tma and arch >= 90:
        fn = wo._wo_tma_kernel
        sig = {
            "x_desc": f"tensordesc<{a}[{cfg.block_m}, {cfg.block_k}]>",
            "q_desc": f"tensordesc<{w}[{cfg.block_n}, {cfg.block_k}]>",
            "s_ptr": "*fp32", "t_ptr": "*fp32", "y_ptr": f"*{y}",
            "M": "i32", "N": "i32", "stride_ym": "i32", "K": "i32",
        }  # fmt: skip
    else:
        fn = wo._wo_kernel
        sig = {
            "x_ptr": f"*{a}", "q_ptr": f"*{w}", "s_ptr": "*fp32", "t_ptr": "*fp32", "y_ptr": f"*{y}",
            "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_ym": "i32",
        }  # fmt: skip
        consts["EVEN_K"] = True
    consts["TOKEN_SCALE"] = token_scale
    sig.update({name: "constexpr" for name in consts})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


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
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--q", nargs="+", default=["fp8", "int8"])
    ap.add_argument("--act", nargs="+", default=["bf16"])
    ap.add_argument("--out", default="bf16")
    ap.add_argument("--fp16-math", choices=["table", "on", "off"], default="table")
    ap.add_argument("--sass", action="store_true", help="print the SASS opcode mix of each kernel's main loop")
    ap.add_argument("--dump", type=Path, help="write PTX/SASS files here")
    args = ap.parse_args()
    wo = load_kernel_module()
    print(f"{'max M':>6} {'config':<60} {'q':<5} {'act':<5} {'smem KiB':>8} {'regs':>5} {'stack':>5}  notes")
    for max_m, fp8_cfg in wo._CONFIG_TABLE:
        for q in args.q:
            cfg = wo._INT8_ROWS.get(max_m, fp8_cfg) if q == "int8" else fp8_cfg
            if args.fp16_math != "table":
                cfg = cfg._replace(fp16_math=args.fp16_math == "on")
            for act in args.act:
                try:
                    k = compile_config(wo, cfg, q, act, args.out, args.arch)
                except Exception as e:  # report and go on: one bad config must not hide the others
                    why = str(e).splitlines()[-1][:200]
                    print(f"{min(max_m, 99999):>6} {str(tuple(cfg)):<60} {q:<5} {act:<5} FAILED: {why}")
                    continue
                md = k.metadata
                notes = ""
                if args.sass or args.dump:
                    sass = cuobjdump(k.asm["cubin"], "--dump-sass")
                    c = opcode_counts(sass)
                    keys = (
                        "HGMMA",
                        "HMMA",
                        "PRMT",
                        "LOP3",
                        "HADD2",
                        "FADD",
                        "F2FP",
                        "I2F",
                        "F2F",
                        "UTMALDG",
                        "LDS",
                        "LDSM",
                        "LDG",
                    )
                    notes = " ".join(f"{key}={c[key]}" for key in keys if key in c)
                    if args.dump:
                        args.dump.mkdir(parents=True, exist_ok=True)
                        stem = f"m{max_m if max_m < 1 << 60 else 'inf'}_{q}_{act}"
                        (args.dump / f"{stem}.ptx").write_text(k.asm["ptx"])
                        (args.dump / f"{stem}.sass").write_text(sass)
                regs, spills = resources(k.asm["cubin"])
                head = f"{min(max_m, 99999):>6} {str(tuple(cfg)):<60} {q:<5} {act:<5}"
                print(f"{head} {md.shared / 1024:>8.0f} {regs:>5} {spills:>5}  {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
