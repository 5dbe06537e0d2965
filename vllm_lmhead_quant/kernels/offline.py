"""Compile the weight-only kernels for a GPU that is not here: Triton ships ptxas, so a CPU machine can tell what
each config needs on every NVIDIA architecture (shared memory, registers, spills) before anyone launches it.

Used by tests/test_kernel_compile.py (every shipped table compiles and fits its targets) and by
``benchmarks/compile_offline.py`` (a report with the instruction mix).
"""

from __future__ import annotations

from typing import NamedTuple

from vllm_lmhead_quant.kernels import device, tables, weight_only


class Target(NamedTuple):
    backend: str  # "cuda" or "hip"
    arch: int | str  # 90 for sm_90; "gfx942" on ROCm
    smem_per_block: int  # opt-in bytes per block (CUDA guide "Technical Specifications"; AMD: LDS per workgroup)
    sm_count: int
    example: str

    @property
    def name(self) -> str:
        return f"sm_{self.arch}" if self.backend == "cuda" else str(self.arch)


TARGETS = {
    t.name: t
    for t in (
        Target("cuda", 80, 163 * 1024, 108, "A100"),
        Target("cuda", 86, 99 * 1024, 84, "RTX 3090 / A10"),
        Target("cuda", 89, 99 * 1024, 142, "L40S / RTX 4090 / L4"),
        Target("cuda", 90, 227 * 1024, 132, "H100 / H200"),
        Target("cuda", 100, 227 * 1024, 148, "B200"),
        Target("cuda", 120, 99 * 1024, 170, "RTX 5090"),
        Target("hip", "gfx942", 64 * 1024, 304, "MI300X"),
        Target("hip", "gfx90a", 64 * 1024, 110, "MI250X"),
    )
}
_TRITON = {"int8": "i8", "fp8": "fp8e4nv", "fp8-bits": "u8", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def path_for(target: Target, table: tables.Table | None = None) -> device.KernelPath:
    hip = target.backend == "hip"
    capability = (9, 4) if hip else (target.arch // 10, target.arch % 10)
    facts = device.DeviceFacts(target.name, capability, target.smem_per_block, target.sm_count, hip)
    return device.path_for(facts, table)


def compile_config(cfg: tables.KernelConfig, fmt: str, target: Target, path: device.KernelPath | None = None,
                   act: str = "bf16", out: str = "fp32", group: int = 0):  # fmt: skip
    """The compiled kernel (``.metadata.shared``, ``.asm``) that a launch of ``cfg`` would run on ``target``
    (through ``path``, by default the one that target's facts give); ``group``: fp16 group scales of that size."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    path = path or path_for(target)
    q = "fp8-bits" if fmt == "fp8" and not path.fp8_convert else fmt
    a, w, y = _TRITON[act], _TRITON[q], _TRITON[out]
    token_scale = (cfg.fp16_math or q == "fp8-bits" or group > 0) and act == "bf16"  # as weight_only._plan decides
    if token_scale:
        a = "fp16"
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SWAP_AB": cfg.swap_ab}
    if cfg.tma and path.tma:
        fn = weight_only._wo_tma_kernel
        sig = {
            "x_desc": f"tensordesc<{a}[{cfg.block_m}, {cfg.block_k}]>",
            "q_desc": f"tensordesc<{w}[{cfg.block_n}, {cfg.block_k}]>",
            "s_ptr": "*fp32", "t_ptr": "*fp32", "g_ptr": "*fp16", "y_ptr": f"*{y}",
            "M": "i32", "N": "i32", "stride_ym": "i32", "K": "i32", "stride_gn": "i32",
        }  # fmt: skip
    else:
        fn = weight_only._wo_kernel
        sig = {
            "x_ptr": f"*{a}", "q_ptr": f"*{w}", "s_ptr": "*fp32", "t_ptr": "*fp32", "g_ptr": "*fp16", "y_ptr": f"*{y}",
            "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_gn": "i32",
            "stride_ym": "i32",
        }  # fmt: skip
        consts["EVEN_K"] = True
    consts["TOKEN_SCALE"] = token_scale
    consts["PTX"] = path.ptx
    consts["GROUP"] = group
    # What a real launch specializes on: 16-byte aligned pointers and ints divisible by 16 (all but M). Without
    # these hints Triton cannot vectorize the loads, skips the shared-memory pipeline and reports far less memory.
    hinted = [n for n, t in sig.items() if t.startswith("*") or (t == "i32" and n != "M")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    sig.update({name: "constexpr" for name in consts})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    warp = 64 if target.backend == "hip" else 32
    return triton.compile(src, target=GPUTarget(target.backend, target.arch, warp), options=options)


def report() -> list[dict]:
    """Every row of every shipped table compiled for each target that can get that table: the target's own table
    (the one its facts select) and, for sm_90, the tables tuned on Hopper GPUs."""
    rows = []
    for target in TARGETS.values():
        own = path_for(target)
        tuned = [tables.load(p) for p in sorted(tables.SHIPPED.glob("NVIDIA_*.json"))] if target.arch == 90 else []
        for table in [own.table, *tuned]:
            path = path_for(target, table)
            for fmt, fmt_rows in table.rows.items():
                # INT8 rows also run with group scales (group_size 32, the accuracy default of docs/accuracy.md)
                for max_m, cfg, group in [(*row, g) for row in fmt_rows for g in ((0, 32) if fmt == "int8" else (0,))]:
                    entry = {"target": target.name, "table": table.source, "format": fmt, "max_m": max_m,
                             "config": list(cfg), "group": group, "budget": target.smem_per_block}  # fmt: skip
                    try:
                        entry["smem"] = compile_config(cfg, fmt, target, path, group=group).metadata.shared
                    except Exception as e:  # reported, and failed by the test
                        entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                    rows.append(entry)
    return rows


def decode_check() -> dict:
    """The portable e4m3 decoder over all 256 bytes against PyTorch's cast (run with TRITON_INTERPRET=1: CPU)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _decode(b_ptr, o_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(o_ptr + offs, weight_only._e4m3_bits_triton(tl.load(b_ptr + offs)))

    byte = torch.arange(256, dtype=torch.uint8)
    out = torch.empty(256, dtype=torch.float16)
    _decode[(1,)](byte, out, 256)
    expected = byte.view(torch.float8_e4m3fn).float() / 256  # the decoder returns 2^-8 times the value
    nan = torch.isnan(expected)
    return {
        "nan_match": bool(torch.equal(torch.isnan(out), nan)),
        "mismatches": int((out.float()[~nan] != expected[~nan]).sum()),
        "subnormals": int(((byte & 0x78) == 0).sum()),
    }


def group_check() -> list[dict]:
    """The pointer kernel with fp16 group scales, run by Triton's interpreter (TRITON_INTERPRET=1: CPU, portable
    conversions): per case, the largest error against fp64 sums of the same fp16 weight products
    ``fp16(q * scale)``, relative to the sum of magnitudes (fp32 accumulation: a few 2^-24)."""
    import torch

    from vllm_lmhead_quant.quant import INT8, dequantize_rows, quantize_rows

    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, n, k, group, block_k, swap_ab in ((3, 40, 1056, 32, 64, True), (17, 33, 512, 128, 64, True),
                                             (5, 40, 256, 16, 64, False), (2, 24, 512, 64, 64, False)):  # fmt: skip
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        w = torch.randn(n, k, generator=gen) * torch.rand(n, k // group, 1, generator=gen).repeat_interleave(
            group, 1).view(n, k)  # groups of different magnitude  # fmt: skip
        q, g = quantize_rows(w, INT8, group_size=group)
        y = torch.empty(m, n, dtype=torch.float32)
        s = torch.ones(n, dtype=torch.float32)
        bm, bn = 16, 32
        grid = (-(-m // bm) * -(-n // bn),)
        weight_only._wo_kernel[grid](
            x, q, s, s, g, y, m, n, k, x.stride(0), q.stride(0), g.stride(0), y.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, SWAP_AB=swap_ab, EVEN_K=k % block_k == 0, TOKEN_SCALE=False,
            PTX=False, GROUP=group,
        )  # fmt: skip
        w16 = dequantize_rows(q, g, torch.float16)  # fp16(q * scale), rounded once, as the kernel
        ref = x.double() @ w16.double().T
        bound = x.double().abs() @ w16.double().abs().T
        rows.append({"m": m, "n": n, "k": k, "group": group, "block_k": block_k, "swap_ab": swap_ab,
                     "rel": float(((y.double() - ref).abs() / bound).max())})  # fmt: skip
    return rows


if __name__ == "__main__":  # the CPU tests run this in a venv that has Triton (tools/bootstrap.sh)
    import json
    import sys

    mode = {"--decode": decode_check, "--groups": group_check}.get(sys.argv[1] if sys.argv[1:] else "", report)
    print(json.dumps(mode()))
