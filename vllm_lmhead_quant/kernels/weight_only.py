"""Weight-only FP8/INT8 LM-head GEMM for CUDA (Hopper/Ada): ``y = (x @ q.T) * scale`` in one Triton kernel.

Why a kernel of our own: at decode the head GEMM is a pure weight stream (V x H bytes), so a one-byte weight
halves the bytes only if nothing re-materializes it in bf16. ``torch._scaled_mm`` would need the *activation*
in FP8 too (w8a8), which costs ~0.1 nats of logprob error; dequantizing per call costs 8x the bf16 GEMM. Here
each FP8 tile is converted to the activation dtype in registers (e4m3 -> bf16/fp16 is exact: 3 mantissa bits,
exponent range inside both), multiplied on the 16-bit tensor cores with fp32 accumulation, and the per-row
fp32 scale is applied to the fp32 accumulator in the epilogue. One rounding, at the final store.

INT8 weights (``q`` int8, same layout and scales) take the same kernels; only the tile conversion differs. Triton's
plain int8 -> bf16 convert is three scalar instructions per weight, which made the INT8 head 0.81-0.88x bf16 at
decode on an H200 against FP8's 0.56-0.66x. :func:`_int8_to_fp16` / :func:`_int8_to_bf16` convert two packed
weights at a time with byte permutes and a subtraction (3 and 6 instructions per pair), the "magic number" trick of
the mixed-input GEMMs (FasterTransformer, CUTLASS): exact, since every int8 is representable in both 16-bit types.
INT8 reaches 0.57-0.65x bf16 at decode there (docs/bench/head_gemm.md).

Layout: the kernel computes the transposed product ``y.T[n, m] = sum_k q[n, k] * x[m, k]`` ("swap AB"): the
vocab dimension fills the 64-row side of Hopper's wgmma, so a decode batch of 1..16 tokens pads only the
narrow side (16), and the converted FP8 tile can be the register operand A, skipping a shared-memory trip.

Decode-sized configs load both tiles with TMA (Hopper's bulk tensor copy engine: one instruction per tile,
zero-filled edges), which took the M <= 16 stream from ~81% to ~87% of the copy bandwidth; elsewhere (Ada, odd
strides) the same math runs with pointer loads. Most table rows use *fp16 math*: Hopper converts e4m3 to fp16
in one instruction but has no e4m3 -> bf16 convert (Triton emits three), and once the GEMM is compute-bound that
conversion is the bottleneck. A small pre-pass scales each bf16 activation row by a power of two into fp16
(exact, see :func:`_to_fp16_pow2`) and the epilogue undoes it; the results are bitwise the bf16 path's (tested),
at 0.54-0.55x of bf16 instead of 0.63-0.67x at M = 64 (hidden >= 2560) (docs/bench/head_gemm_h100.md).

Configs come from a fixed table keyed on M (tuned on an H100, see ``benchmarks/bench_head_gemm.py --tune``; the
INT8 rows that differ were tuned on an H200);
there is no autotuning, so the first call per config compiles and every later call, inside CUDA-graph capture
included, is one or two launches with no host sync and no allocation other than the output (and, with fp16
math, the converted activations). Every config accumulates K in the same order, so a token's logits do not
depend on the batch size it was computed in (tested).

Triton is imported under a guard: this module imports on CPU-only machines (CI), where :func:`is_supported`
returns False.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

try:  # Guarded: CPU CI has no triton; is_supported() reports it.
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TensorDescriptor = None
    HAS_TRITON = False

FP8_DTYPE = torch.float8_e4m3fn
Q_DTYPES = (FP8_DTYPE, torch.int8)  # the weight formats of quant.py
_ACT_DTYPES = (torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class KernelConfig(NamedTuple):
    """One launch shape: ``block_m`` = token side (>= 16, tl.dot's minimum), ``block_n`` = vocab side."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = True
    tma: bool = False  # load tiles with the Hopper bulk tensor copy engine (needs K % 16 == 0, SM 9.0)
    fp16_math: bool = False  # bf16 activations pre-scaled per token by a power of two into fp16 (see below)


# (max M, config), first match wins. Tuned on H100 80GB HBM3 (torch 2.11, triton 3.6) over
# V x H in {151936x1024, 151936x4096, 131072x5120, 262144x2560} by `benchmarks/bench_head_gemm.py --tune`
# (docs/bench/tune.json; `--apply` rewrites the block between the markers). Picked by hand from that sweep: the
# M <= 32 row is the 2026-11-23 sweep's (M = 32 was not re-swept); the M <= 64 row won on all four shapes in the
# interleaved sweep of M in {64, 256, 2048} (docs/bench/tune_interleaved.json: 8 warps, 1-2% faster than 4 at
# hidden >= 2560 and 11% with bf16 math at hidden 1024). Decode sizes win with TMA loads; fp16 math wins wherever
# its pre-pass launch is hidden (see _FP16_MIN_K): by 1-3% at M <= 16, 10-30% from M = 64 on. From M ~ 256 on the
# GEMM is compute-bound and the kernel is behind cuBLAS bf16 (1.03-1.09x at M = 256, 1.16-1.39x at M = 2048).
# Tried there and not shipped (docs/bench/head_gemm_h100.md): a persistent schedule (one program per SM walking the
# tiles) as a nested tile/K loop, 4-9% faster, but Triton 3.6 miscompiled it for 64-wide K tiles (garbage
# logits); as one flat loop it was correct and slower. Also flattened loops, TMA stores, Triton's warp
# specialization (faults on Hopper in 3.6) and dequantize-chunks-then-cuBLAS.
# <tuned-table>
_CONFIG_TABLE: tuple[tuple[int, KernelConfig], ...] = (
    (16, KernelConfig(16, 64, 128, 4, 6, tma=True, fp16_math=True)),
    (32, KernelConfig(32, 128, 128, 8, 5, tma=True)),
    (64, KernelConfig(64, 128, 128, 8, 4, tma=True, fp16_math=True)),
    (128, KernelConfig(128, 128, 64, 8, 4, swap_ab=False, tma=True, fp16_math=True)),
    (1 << 62, KernelConfig(256, 128, 128, 8, 3, tma=True, fp16_math=True)),
)
# </tuned-table>
# INT8 weights use the table above except in these rows (by the row's max M), measured on an H200 (Triton 3.6,
# benchmarks/bench_head_gemm.py --tune --tune-format int8, docs/bench/head_gemm.md). M > 128: the FP8 row's
# 256 x 128 x 128, 3-stage schedule gives wrong INT8 results (Triton 3.6 miscompiles it: its bf16-math FP8 twin is
# wrong too, benchmarks/diag_int8.py); the 128 x 256 tile is the fastest correct one. M <= 128: bf16 math, whose
# INT8 convert is cheap, 0.99x bf16 against 1.10-1.13x for the FP8 row.
_INT8_ROWS: dict[int, KernelConfig] = {
    128: KernelConfig(128, 128, 64, 8, 4, tma=True),
    1 << 62: KernelConfig(128, 256, 128, 8, 3, tma=True, fp16_math=True),
}
# Below this many vocab tiles the GPU is under-filled (132 SMs on H100): halve block_n for small TP shards.
_MIN_TILES = 264
# fp16 math costs a second launch (~30 us of host time). Below this hidden size a GEMM of M <= 128 tokens takes
# ~100 us on the GPU, so in eager decode the extra host time is not hidden: there the table's config runs with
# bf16 math (measured on the H100: 151936 x 1024, M = 64, eager with L2 flush: 0.94x bf16 with fp16 math).
_FP16_MIN_K = 2048


def pick_config(m: int, n: int, k: int, q_dtype: torch.dtype = FP8_DTYPE) -> KernelConfig:
    """The table's config for ``m`` tokens and the weight format; ``block_n`` halved (to >= 32) while ``n`` gives
    too few tiles."""
    global _PICKED_FOR
    if _PICKED_FOR is not _CONFIG_TABLE or len(_PICKED) > 4096:  # memo per table (benchmarks swap it)
        _PICKED.clear()
        _PICKED_FOR = _CONFIG_TABLE
    key = (m, n, k, q_dtype)
    cfg = _PICKED.get(key)
    if cfg is None:
        max_m, cfg = next((max_m, c) for max_m, c in _CONFIG_TABLE if m <= max_m)
        if q_dtype == torch.int8:
            cfg = _INT8_ROWS.get(max_m, cfg)
        block_n = cfg.block_n
        m_tiles = -(-m // cfg.block_m)
        while block_n > 32 and m_tiles * -(-n // block_n) < _MIN_TILES:
            block_n //= 2
        fp16_math = cfg.fp16_math and (k >= _FP16_MIN_K or m > 128)
        cfg = _PICKED[key] = cfg._replace(block_n=block_n, fp16_math=fp16_math)
    return cfg


_PICKED: dict[tuple[int, int, int], KernelConfig] = {}  # memo: the head calls this every decode step
_PICKED_FOR: tuple | None = None


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    """Cached: the head runs every decode step, and a driver query per call showed up in host launch time."""
    return torch.cuda.get_device_capability(device_index)


def _device_capability(t: torch.Tensor) -> tuple[int, int]:
    index = t.device.index
    return _capability(torch.cuda.current_device() if index is None else index)


def is_supported(x: torch.Tensor, q: torch.Tensor | None = None) -> bool:
    """True if the Triton kernel can run on ``x`` (and ``q`` if given): CUDA, Triton, SM >= 8.9, bf16/fp16 x,
    an FP8 or INT8 ``q`` on x's device.

    SM 8.9 (Ada) is the first architecture whose Triton backend converts e4m3 in hardware. INT8 needs no FP8
    hardware, but the tuned table's shared memory is Hopper's; other architectures take the chunked path for now.
    """
    if not (HAS_TRITON and isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in _ACT_DTYPES):
        return False
    if torch.version.hip is not None:  # the e4m3fn (OCP) format is not what ROCm's Triton path expects
        return False
    if q is not None and (q.dtype not in Q_DTYPES or q.device != x.device):
        return False
    return _device_capability(x) >= (8, 9)


if HAS_TRITON:
    # The int8 tile reaches registers in the 16-bit dot operand's layout: each thread holds pairs of weights adjacent
    # in K (one 16-bit shared-memory load each), so the converters take two weights at a time (pack=2, a 16-bit
    # input register) and return them as one 32-bit register of two 16-bit values.
    @triton.jit
    def _int8_to_fp16(w):
        # Put each byte under the fp16 pattern 0x64 (the value 1024 + byte), flip the bytes' sign bits (so the
        # value is 1152 + q), subtract 1152: 3 instructions per pair, exact.
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 u, c;
            cvt.u32.u16 u, $1;
            mov.b32 c, 0x64646464;
            prmt.b32 u, u, c, 0x4140;
            xor.b32 u, u, 0x00800080;
            mov.b32 c, 0x64806480;
            sub.f16x2 $0, u, c;
            }""",
            constraints="=r,h",
            args=[w],
            dtype=tl.float16,
            is_pure=True,
            pack=2,
        )

    @triton.jit
    def _int8_to_bf16(w):
        # bf16 has too few mantissa bits for the fp16 trick: build the fp32 values 2^23 + (q + 128), subtract
        # 2^23 + 128, and keep each exact result's upper half (an int8 has at most 8 significant bits).
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 u, c, f0, f1;
            cvt.u32.u16 u, $1;
            xor.b32 u, u, 0x8080;
            mov.b32 c, 0x4B000000;
            prmt.b32 f0, u, c, 0x7650;
            prmt.b32 f1, u, c, 0x7651;
            sub.f32 f0, f0, 0f4B000080;
            sub.f32 f1, f1, 0f4B000080;
            prmt.b32 $0, f0, f1, 0x7632;
            }""",
            constraints="=r,h",
            args=[w],
            dtype=tl.bfloat16,
            is_pure=True,
            pack=2,
        )

    @triton.jit
    def _to_act(w, act_dtype: tl.constexpr):
        """A weight tile in the activation dtype, exactly (e4m3 and int8 both fit in bf16 and fp16)."""
        if w.dtype == tl.int8:
            if act_dtype == tl.float16:
                return _int8_to_fp16(w)
            else:
                return _int8_to_bf16(w)
        else:
            return w.to(act_dtype)

    # M is not specialized (Triton would otherwise compile M == 1 and M % 16 == 0 variants): one binary per
    # config serves every M of its bucket, so a warm-up with any M covers CUDA-graph capture of the others.
    @triton.jit(do_not_specialize=["M"])
    def _wo_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        t_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_qn,
        stride_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SWAP_AB: tl.constexpr,
        EVEN_K: tl.constexpr,
        TOKEN_SCALE: tl.constexpr,
    ):
        # Token tiles vary fastest: the programs that share one weight tile run together, so at large M the
        # weight is read from DRAM once and the (small) activation stays L2-resident.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_pid_m
        pid_n = pid // num_pid_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows are clamped, not masked: they re-read a valid row (cached) and are never stored,
        # which keeps masks out of the inner loop.
        rm_ld = tl.minimum(rm, M - 1).to(tl.int64)
        rn_ld = tl.minimum(rn, N - 1).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        act_dtype = x_ptr.dtype.element_ty
        if SWAP_AB:
            q_ptrs = q_ptr + rn_ld[:, None] * stride_qn + rk[None, :]  # [BLOCK_N, BLOCK_K]
            x_ptrs = x_ptr + rm_ld[None, :] * stride_xm + rk[:, None]  # [BLOCK_K, BLOCK_M]
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            q_ptrs = q_ptr + rn_ld[None, :] * stride_qn + rk[:, None]  # [BLOCK_K, BLOCK_N]
            x_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                w = tl.load(q_ptrs)
                xa = tl.load(x_ptrs)
            else:
                k_left = K - kb * BLOCK_K
                if SWAP_AB:
                    w = tl.load(q_ptrs, mask=rk[None, :] < k_left, other=0.0)
                    xa = tl.load(x_ptrs, mask=rk[:, None] < k_left, other=0.0)
                else:
                    w = tl.load(q_ptrs, mask=rk[:, None] < k_left, other=0.0)
                    xa = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            # e4m3/int8 -> bf16/fp16 is exact; the dot accumulates in fp32.
            acc = tl.dot(_to_act(w, act_dtype), xa, acc) if SWAP_AB else tl.dot(xa, _to_act(w, act_dtype), acc)
            q_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        s = tl.load(s_ptr + rn_ld)
        rm64 = rm.to(tl.int64)
        if SWAP_AB:
            acc = acc * s[:, None]
            if TOKEN_SCALE:  # exact: a power of two, after the one rounding of acc * s
                acc = acc * tl.load(t_ptr + rm_ld)[None, :]
            y_ptrs = y_ptr + rm64[None, :] * stride_ym + rn[:, None]
            mask = (rm[None, :] < M) & (rn[:, None] < N)
        else:
            acc = acc * s[None, :]
            if TOKEN_SCALE:
                acc = acc * tl.load(t_ptr + rm_ld)[:, None]
            y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn[None, :]
            mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M"])
    def _wo_tma_kernel(
        x_desc,
        q_desc,
        s_ptr,
        t_ptr,
        y_ptr,
        M,
        N,
        stride_ym,
        K,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SWAP_AB: tl.constexpr,
        TOKEN_SCALE: tl.constexpr,
    ):
        # Same math as _wo_kernel; tiles arrive by TMA (one instruction per tile, 128-byte swizzled, no
        # per-thread address math). Out-of-range rows and the K tail are zero-filled by the copy engine.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_pid_m
        pid_n = pid // num_pid_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        act_dtype = x_desc.dtype
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            w = _to_act(q_desc.load([off_n, kb * BLOCK_K]), act_dtype)
            xa = x_desc.load([off_m, kb * BLOCK_K])
            acc = tl.dot(w, xa.T, acc) if SWAP_AB else tl.dot(xa, w.T, acc)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        rm64 = rm.to(tl.int64)
        if TOKEN_SCALE:
            t = tl.load(t_ptr + rm, mask=rm < M, other=0.0)
        if SWAP_AB:
            acc = acc * s[:, None]
            if TOKEN_SCALE:
                acc = acc * t[None, :]
            y_ptrs = y_ptr + rm64[None, :] * stride_ym + rn[:, None]
            mask = (rm[None, :] < M) & (rn[:, None] < N)
        else:
            acc = acc * s[None, :]
            if TOKEN_SCALE:
                acc = acc * t[:, None]
            y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn[None, :]
            mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pow2_fp16_kernel(x_ptr, o_ptr, t_ptr, K, stride_xm, stride_om, BLOCK_K: tl.constexpr):
        # One program per token row: o = fp16(x * 2^p), t = 2^-p, with p putting max|x| in [2^14, 2^15).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
        biased = (tl.max(amax, axis=0).to(tl.int32, bitcast=True) >> 23) & 0xFF  # max|x| in [2^(b-127), 2^(b-126))
        e = tl.minimum(tl.maximum(268 - biased, 1), 253)  # biased exponent of 2^p, p = 141 - b, kept normal
        up = (e << 23).to(tl.float32, bitcast=True)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0)
            tl.store(o_ptr + row * stride_om + k0 + offs, (v.to(tl.float32) * up).to(tl.float16), mask=k0 + offs < K)
        tl.store(t_ptr + row, ((254 - e) << 23).to(tl.float32, bitcast=True))


def _to_fp16_pow2(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``[M, K]`` -> (fp16 ``x * 2^p``, fp32 ``2^-p``) with one power of two per token row.

    Why: Hopper has a one-instruction e4m3 -> fp16 convert but none to bf16 (Triton goes through fp16, then two
    scalar converts), and in the compute-bound regime (M >= ~64) that conversion is what keeps the kernel behind
    cuBLAS. Scaling a row by a power of two and rounding to fp16 is exact for every element within 2^-31 of the
    row's max (fp16 keeps bf16's 8-bit significand down to 2^-17), products with e4m3 stay exact in fp32, and
    the fp32 sums are the bf16 path's sums times 2^p; the epilogue multiplies by 2^-p after the per-row scale.
    So results equal the bf16 path's except for elements below 2^-31 of their row's max, whose lost low bits
    are far below fp32 accumulation error (tests/test_kernel_cuda.py checks bitwise equality).
    """
    m, k = x2.shape
    x16 = torch.empty((m, k), dtype=torch.float16, device=x2.device)
    inv = torch.empty((m,), dtype=torch.float32, device=x2.device)
    key = ("pow2_fp16", x2.device.index, k, x2.stride(0), x2.data_ptr() % 16 == 0)
    args = (x2, x16, inv, k, x2.stride(0), x16.stride(0))
    _launch(_pow2_fp16_kernel, m, args, {"BLOCK_K": 1024}, key, 4, 3)
    return x16, inv


# Launches after the first per specialization skip Triton's Python binder (argument specialization, cache-key
# hashing, global-value checks: ~20 us a call, paid every decode step because vLLM runs the head outside its
# CUDA graphs). The key holds everything the binder specializes on (dtypes, exact ints, 16-byte alignment of every
# pointer, the constexprs), so a cached binary only ever runs with arguments it was compiled for. Uses
# ``CompiledKernel[grid](*args)``, whose calling convention (3-d grid, constexprs passed positionally) is the
# one of Triton 3.6, where it was validated (tests/test_kernel_cuda.py); other versions launch the plain way.
FAST_LAUNCH = HAS_TRITON and triton.__version__.startswith("3.6.")
_COMPILED: dict = {}


def _launch(kernel, grid0: int, args: tuple, consts: dict, key: tuple, num_warps: int, num_stages: int) -> None:
    compiled = _COMPILED.get(key) if FAST_LAUNCH else None
    if compiled is not None:
        compiled[(grid0, 1, 1)](*args, *consts.values())
        return
    compiled = kernel[(grid0,)](*args, **consts, num_warps=num_warps, num_stages=num_stages)
    if FAST_LAUNCH and hasattr(compiled, "function"):  # a real binary (not the interpreter)
        _COMPILED[key] = compiled


def _is_sm90(t: torch.Tensor) -> bool:
    return _device_capability(t) >= (9, 0)


def weight_only_mm(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``y[m, n] = scale[n] * sum_k x[m, k] * float(q[n, k])`` with fp32 accumulation, shape ``[M, N]``.

    ``x``: ``[M, K]`` bf16/fp16 CUDA (leading dims are flattened, the result keeps them); ``q``: ``[N, K]``
    float8_e4m3fn or int8; ``scale``: ``[N]`` fp32; ``out_dtype``: bf16/fp16/fp32, default ``x.dtype``. ``config``
    overrides the tuned table (benchmarks and tests only). Graph-capturable once each config has compiled:
    the only allocation is the output.
    """
    if not HAS_TRITON:
        raise RuntimeError("weight_only_mm needs triton; check is_supported() first")
    out_dtype = out_dtype or x.dtype
    if x.dtype not in _ACT_DTYPES or q.dtype not in Q_DTYPES or out_dtype not in _OUT_DTYPES:
        raise TypeError(f"unsupported dtypes x={x.dtype} q={q.dtype} out={out_dtype}")
    if q.dim() != 2 or x.shape[-1] != q.shape[1] or scale.numel() != q.shape[0]:
        shapes = f"x {tuple(x.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)}"
        raise ValueError(f"shape mismatch: {shapes}")
    k = x.shape[-1]
    n = q.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.stride(0) % 8 and x2.shape[0] > 1):  # unit K stride, 16-byte aligned rows
        x2 = x2.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.float().contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0 or k == 0:
        return _like_x(y.zero_() if k == 0 else y, x)
    _gemm(x2, q, scale, y, config or pick_config(m, n, k, q.dtype))
    return _like_x(y, x)


def _gemm(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, cfg: KernelConfig) -> None:
    """``y = (x2 @ q.T) * scale`` with validated, non-empty 2-D operands (``q`` FP8 or INT8, or fp16 for the
    benchmark's no-conversion ceiling)."""
    (m, k), n = x2.shape, q.shape[0]
    grid0 = -(-m // cfg.block_m) * -(-n // cfg.block_n)  # (triton.cdiv costs ~3 us a call in Triton 3.6)
    token_scale = cfg.fp16_math and x2.dtype == torch.bfloat16
    tscale = scale  # placeholder pointer, never read without TOKEN_SCALE
    if token_scale:
        x2, tscale = _to_fp16_pow2(x2)
    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SWAP_AB": cfg.swap_ab}
    sx, sq = x2.stride(0), q.stride(0)
    aligned = tuple(t.data_ptr() % 16 == 0 for t in (x2, q, scale, tscale))
    # TMA: SM 9.0+, 16-byte aligned bases and row strides (else the pointer kernel runs)
    tma = cfg.tma and aligned[0] and aligned[1] and sx % 8 == 0 and (sq * q.element_size()) % 16 == 0
    tma = tma and _is_sm90(x2)
    if tma:
        kernel = _wo_tma_kernel
        x_desc = TensorDescriptor(x2, [m, k], [sx, 1], [cfg.block_m, cfg.block_k])
        q_desc = TensorDescriptor(q, [n, k], [sq, 1], [cfg.block_n, cfg.block_k])
        args = (x_desc, q_desc, scale, tscale, y, m, n, n, k)
    else:
        kernel = _wo_kernel
        args = (x2, q, scale, tscale, y, m, n, k, sx, sq, n)
        consts["EVEN_K"] = k % cfg.block_k == 0
    consts["TOKEN_SCALE"] = token_scale
    # y is fresh from the caching allocator (aligned, row stride n); the rest is what Triton specializes on.
    # The device too: a binary is loaded per device (one process may drive several GPUs).
    key = (x2.device.index, cfg, tma, token_scale, x2.dtype, q.dtype, y.dtype, n, k, sx, sq, aligned)
    _launch(kernel, grid0, args, consts, key, cfg.num_warps, cfg.num_stages)


def _like_x(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
