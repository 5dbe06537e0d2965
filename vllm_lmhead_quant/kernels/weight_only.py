"""Weight-only FP8/INT8 LM-head GEMM for GPUs: ``y = (x @ q.T) * scale`` in one Triton kernel.

Why a kernel of our own: at decode the head GEMM is a pure weight stream (V x H bytes), so a one-byte weight
halves the bytes only if nothing re-materializes it in bf16. ``torch._scaled_mm`` would need the *activation*
in FP8 too (w8a8), which costs ~0.1 nats of logprob error; dequantizing per call costs 8x the bf16 GEMM. Here
each FP8 tile is converted to the activation dtype in registers (e4m3 -> bf16/fp16 is exact: 3 mantissa bits,
exponent range inside both), multiplied on the 16-bit tensor cores with fp32 accumulation, and the per-row
fp32 scale is applied to the fp32 accumulator in the epilogue. One rounding, at the final store. fp16 group scales
(one per G weights of a row) are applied to the converted tile instead, before the MMA (``_group_scaled``).

INT8 weights (``q`` int8, same layout and scales) take the same kernels; only the tile conversion differs. Triton's
plain int8 -> bf16 convert is three scalar instructions per weight, which made the INT8 head 0.81-0.88x bf16 at
decode on an H200 against FP8's 0.56-0.66x. ``_INT8_TO_FP16`` / ``_INT8_TO_BF16`` convert two packed
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

Devices without an e4m3 convert (SM 8.0/8.6, ROCm) get the FP8 weight as raw bytes and decode them with integer
ops (``_E4M3_BITS_TO_FP16``, the Marlin kernels' trick); ROCm also casts INT8 plainly (no PTX). Which path and
which config table a GPU gets is decided in ``device.py`` from what it reports (shared memory, SM count, convert
and TMA support); the tables are JSON per GPU model (``tables.py``). A config that still does not fit is shrunk
once, with one warning.

There is no autotuning at run time (``python -m vllm_lmhead_quant.tune`` writes a table ahead), so the first call
per config compiles and every later call, inside CUDA-graph capture included, is one or two launches with no host
sync and no allocation other than the output (and, with fp16 math, the converted activations). Every config
accumulates K in the same order, so a token's logits do not depend on the batch size it was computed in (tested).
Under vLLM's batch-invariant mode that does not rest on the tables: one config serves every M (``pick_config``).

Triton is imported under a guard: this module imports on CPU-only machines (CI), where :func:`is_supported`
returns False.
"""

from __future__ import annotations

import logging

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

from vllm_lmhead_quant.kernels import device, tables  # noqa: E402
from vllm_lmhead_quant.kernels.device import KernelPath  # noqa: E402
from vllm_lmhead_quant.kernels.tables import KernelConfig  # noqa: E402,F401 - re-exported

FP8_DTYPE = torch.float8_e4m3fn
Q_DTYPES = (FP8_DTYPE, torch.int8)  # the weight formats of quant.py
_FORMAT_OF = {FP8_DTYPE: "fp8", torch.int8: "int8"}
_ACT_DTYPES = (torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
logger = logging.getLogger("vllm.lmhead_quant")

# fp16 math costs a second launch (~30 us of host time). Below this hidden size a GEMM of M <= 128 tokens takes
# ~100 us on the GPU, so in eager decode the extra host time is not hidden: there the table's config runs with
# bf16 math (measured on the H100: 151936 x 1024, M = 64, eager with L2 flush: 0.94x bf16 with fp16 math).
_FP16_MIN_K = 2048


class KernelUnavailable(RuntimeError):
    """The fused kernel failed to compile on this device (logged once); callers take the generic path."""


def pick_config(
    m: int, n: int, k: int, q_dtype: torch.dtype = FP8_DTYPE, path: KernelPath | None = None
) -> KernelConfig:
    """The device table's config for ``m`` tokens and the weight format; ``block_n`` halved (to >= 32) while ``n``
    gives too few tiles to fill the GPU. A batch-invariant path (vLLM's mode) gives every ``m`` the same config for
    a given ``(n, k)``: its pinned row, narrowed and switched as for one token tile (tables.BATCH_INVARIANT_M)."""
    path = path or _current_path()
    key = (m, n, k, q_dtype)
    cfg = path.picked.get(key)
    if cfg is None:
        if len(path.picked) > 4096:
            path.picked.clear()
        rows = path.table.rows[_FORMAT_OF[q_dtype]]
        if path.batch_invariant:
            cfg, m_tiles, large_m = tables.batch_invariant_row(rows), 1, False
        else:
            cfg = next(c for max_m, c in rows if m <= max_m)
            m_tiles, large_m = -(-m // cfg.block_m), m > 128
        block_n = cfg.block_n
        while block_n > 32 and m_tiles * -(-n // block_n) < path.min_tiles:
            block_n //= 2
        fp16_math = cfg.fp16_math and (k >= _FP16_MIN_K or large_m)
        cfg = path.picked[key] = cfg._replace(block_n=block_n, fp16_math=fp16_math)
    return cfg


def _current_path() -> KernelPath:
    path = device.device_path(torch.cuda.current_device())
    if path is None:
        raise RuntimeError("no weight-only kernel path for this GPU; check is_supported() first")
    return path


_BROKEN: set[int] = set()  # devices where the kernel failed to compile (never retried)


def is_supported(x: torch.Tensor, q: torch.Tensor | None = None) -> bool:
    """True if the Triton kernel can run on ``x`` (and ``q`` if given): CUDA/ROCm with Triton, bf16/fp16 ``x``,
    an FP8 or INT8 ``q`` on x's device, and a kernel path for the device (kernels/device.py)."""
    if not (HAS_TRITON and isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in _ACT_DTYPES):
        return False
    if q is not None and (q.dtype not in Q_DTYPES or q.device != x.device):
        return False
    return _runs_on(_index(x))


def _runs_on(index: int) -> bool:
    """A kernel path exists for GPU ``index`` and the kernel did not fail to compile there."""
    return index not in _BROKEN and device.device_path(index) is not None


def _index(t: torch.Tensor) -> int:
    return torch.cuda.current_device() if t.device.index is None else t.device.index


if HAS_TRITON:
    # The weight tile reaches registers in the 16-bit dot operand's layout: each thread holds pairs of weights adjacent
    # in K (one 16-bit shared-memory load each), so the converters take two weights at a time (pack=2, a 16-bit
    # input register) and return them as one 32-bit register of two 16-bit values.
    @triton.jit
    def _convert_pairs(w, asm: tl.constexpr, dtype: tl.constexpr):
        return tl.inline_asm_elementwise(asm=asm, constraints="=r,h", args=[w], dtype=dtype.value, is_pure=True, pack=2)

    # int8 -> fp16: put each byte under the fp16 pattern 0x64 (the value 1024 + byte), flip the bytes' sign bits (so
    # the value is 1152 + q), subtract 1152: 3 instructions per pair, exact.
    _INT8_TO_FP16 = tl.constexpr("""{
            .reg .b32 u, c;
            cvt.u32.u16 u, $1;
            mov.b32 c, 0x64646464;
            prmt.b32 u, u, c, 0x4140;
            xor.b32 u, u, 0x00800080;
            mov.b32 c, 0x64806480;
            sub.f16x2 $0, u, c;
            }""")
    # int8 -> bf16: bf16 has too few mantissa bits for the fp16 trick: build the fp32 values 2^23 + (q + 128),
    # subtract 2^23 + 128, and keep each exact result's upper half (an int8 has at most 8 significant bits).
    _INT8_TO_BF16 = tl.constexpr("""{
            .reg .b32 u, c, f0, f1;
            cvt.u32.u16 u, $1;
            xor.b32 u, u, 0x8080;
            mov.b32 c, 0x4B000000;
            prmt.b32 f0, u, c, 0x7650;
            prmt.b32 f1, u, c, 0x7651;
            sub.f32 f0, f0, 0f4B000080;
            sub.f32 f1, f1, 0f4B000080;
            prmt.b32 $0, f0, f1, 0x7632;
            }""")
    # Devices without an e4m3 convert get the FP8 weight as raw bytes. Both decoders return the value times 2^-8
    # (fp16's exponent bias is e4m3's plus 8, so the bits only need moving) and the epilogue multiplies the row
    # scale by 256, exactly (the Marlin kernels' trick). Normals and subnormals decode alike; 0x7F/0xFF are NaN.
    # In PTX: each byte under the high byte of one fp16 half, magnitude shifted right by one and the sign kept
    # (4 instructions per pair), then halves whose magnitude is 0x7F get an all-ones exponent: NaN.
    _E4M3_BITS_TO_FP16 = tl.constexpr("""{
            .reg .b32 u, m, t, z;
            cvt.u32.u16 u, $1;
            mov.b32 z, 0;
            prmt.b32 u, u, z, 0x1404;
            and.b32 m, u, 0x7F007F00;
            shr.b32 t, m, 1;
            lop3.b32 t, u, 0x80008000, t, 0xEA;
            add.u32 m, m, 0x01000100;
            prmt.b32 m, m, z, 0xBB99;
            lop3.b32 $0, t, m, 0x7E007E00, 0xF8;
            }""")

    @triton.jit
    def _e4m3_bits_triton(b):
        # The same decoding in portable Triton (ROCm: no PTX).
        u = b.to(tl.uint16)
        f = (((u & 0x80) << 8) | ((u & 0x7F) << 7)).to(tl.float16, bitcast=True)
        return tl.where((u & 0x7F) == 0x7F, float("nan"), f)

    @triton.jit
    def _to_act(w, act_dtype: tl.constexpr, PTX: tl.constexpr):
        """A weight tile in the activation dtype, exactly (e4m3 and int8 both fit in bf16 and fp16). uint8 tiles
        are e4m3 bits (devices without an e4m3 convert), which decode to fp16 (bf16 activations then run as fp16)."""
        if w.dtype == tl.uint8:  # e4m3 bits, decoded to 2^-8 times their value (the epilogue scales by 256)
            if PTX:
                return _convert_pairs(w, _E4M3_BITS_TO_FP16, tl.float16).to(act_dtype)
            else:
                return _e4m3_bits_triton(w).to(act_dtype)
        elif w.dtype == tl.int8 and PTX:
            if act_dtype == tl.float16:
                return _convert_pairs(w, _INT8_TO_FP16, tl.float16)
            else:
                return _convert_pairs(w, _INT8_TO_BF16, tl.bfloat16)
        else:
            return w.to(act_dtype)

    @triton.jit
    def _group_scaled(w, g_ptr, rn_ld, stride_gn, kb, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP: tl.constexpr, SWAP_AB: tl.constexpr):
        """The converted fp16 weight tile times its fp16 group scales, rounded once to fp16 (scale before the MMA,
        as Marlin does): ``[BLOCK_N, BLOCK_K]`` with SWAP_AB, else ``[BLOCK_K, BLOCK_N]``. ``GROUP`` is a power of two
        that divides BLOCK_K or is a multiple of it."""
        if GROUP >= BLOCK_K:  # one scale per row for the whole tile
            g = tl.load(g_ptr + rn_ld * stride_gn + (kb * BLOCK_K) // GROUP)
            return w * (g[:, None] if SWAP_AB else g[None, :])
        else:
            NG: tl.constexpr = BLOCK_K // GROUP
            cols = kb * NG + tl.arange(0, NG)
            # The K tail's columns past K / GROUP hold zero weights; masking keeps their scales in bounds.
            g = tl.load(g_ptr + rn_ld[:, None] * stride_gn + cols[None, :], mask=cols[None, :] < K // GROUP, other=0.0)
            if SWAP_AB:
                w3 = tl.reshape(w, (BLOCK_N, NG, GROUP)) * g[:, :, None]
                return tl.reshape(w3, (BLOCK_N, BLOCK_K))
            else:
                w3 = tl.reshape(w, (NG, GROUP, BLOCK_N)) * tl.trans(g)[:, None, :]
                return tl.reshape(w3, (BLOCK_K, BLOCK_N))

    @triton.jit
    def _scale_and_store(acc, s, t, y_ptr, rm, rn, M, N, stride_ym, SWAP_AB: tl.constexpr, TOKEN_SCALE: tl.constexpr):
        """Both kernels' epilogue: the per-row scales ``s``, then (fp16 math) the per-token powers of two ``t``, exact
        after the one rounding of acc * s; one store in y's dtype, masked to [M, N]."""
        rm64 = rm.to(tl.int64)
        if SWAP_AB:  # acc is [BLOCK_N, BLOCK_M]
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

    # M is not specialized (Triton would otherwise compile M == 1 and M % 16 == 0 variants): one binary per
    # config serves every M of its bucket, so a warm-up with any M covers CUDA-graph capture of the others.
    @triton.jit(do_not_specialize=["M"])
    def _wo_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        t_ptr,
        g_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_qn,
        stride_gn,
        stride_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SWAP_AB: tl.constexpr,
        EVEN_K: tl.constexpr,
        TOKEN_SCALE: tl.constexpr,
        PTX: tl.constexpr,
        GROUP: tl.constexpr,
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
            w = _to_act(w, act_dtype, PTX)
            if GROUP > 0:
                w = _group_scaled(w, g_ptr, rn_ld, stride_gn, kb, K, BLOCK_N, BLOCK_K, GROUP, SWAP_AB)
            acc = tl.dot(w, xa, acc) if SWAP_AB else tl.dot(xa, w, acc)
            q_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if GROUP > 0:  # noqa: SIM108 - the group scales went into the weight tile (_group_scaled)
            s = tl.full((BLOCK_N,), 1.0, tl.float32)
        else:
            s = tl.load(s_ptr + rn_ld)
        if q_ptr.dtype.element_ty == tl.uint8:  # decoded e4m3 is 2^-8 times its value
            s = s * 256.0
        t = s  # placeholder, unused without TOKEN_SCALE
        if TOKEN_SCALE:
            t = tl.load(t_ptr + rm_ld)
        _scale_and_store(acc, s, t, y_ptr, rm, rn, M, N, stride_ym, SWAP_AB, TOKEN_SCALE)

    @triton.jit(do_not_specialize=["M"])
    def _wo_tma_kernel(
        x_desc,
        q_desc,
        s_ptr,
        t_ptr,
        g_ptr,
        y_ptr,
        M,
        N,
        stride_ym,
        K,
        stride_gn,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SWAP_AB: tl.constexpr,
        TOKEN_SCALE: tl.constexpr,
        PTX: tl.constexpr,
        GROUP: tl.constexpr,
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
        rn = off_n + tl.arange(0, BLOCK_N)
        rn_ld = tl.minimum(rn, N - 1).to(tl.int64)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            w = _to_act(q_desc.load([off_n, kb * BLOCK_K]), act_dtype, PTX)
            if GROUP > 0:  # the descriptor's tile is [BLOCK_N, BLOCK_K] either way
                w = _group_scaled(w, g_ptr, rn_ld, stride_gn, kb, K, BLOCK_N, BLOCK_K, GROUP, True)
            xa = x_desc.load([off_m, kb * BLOCK_K])
            acc = tl.dot(w, xa.T, acc) if SWAP_AB else tl.dot(xa, w.T, acc)
        rm = off_m + tl.arange(0, BLOCK_M)
        if GROUP > 0:  # noqa: SIM108 - a constexpr branch: Triton compiles only one side
            s = tl.full((BLOCK_N,), 1.0, tl.float32)
        else:
            s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        if q_desc.dtype == tl.uint8:  # decoded e4m3 is 2^-8 times its value
            s = s * 256.0
        t = s  # placeholder, unused without TOKEN_SCALE
        if TOKEN_SCALE:
            t = tl.load(t_ptr + rm, mask=rm < M, other=0.0)
        _scale_and_store(acc, s, t, y_ptr, rm, rn, M, N, stride_ym, SWAP_AB, TOKEN_SCALE)

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


def _to_fp16_pow2(x2: torch.Tensor, runner=None) -> tuple[torch.Tensor, torch.Tensor]:
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
    args = (x2, x16, inv, k, x2.stride(0), k)
    if runner is not None:  # a plan's kept launcher (BoundKernel): same signature, so no key and no lookup
        runner(*args, _POW2_BLOCK_K)
    else:
        _launch(_pow2_fp16_kernel, m, args, {"BLOCK_K": _POW2_BLOCK_K}, _pow2_key(x2), 4, 3)
    return x16, inv


_POW2_BLOCK_K = 1024


def _pow2_key(x2: torch.Tensor) -> tuple:
    """The pre-pass binary's launch key: what Triton specializes it on besides the dtypes (always bf16 -> fp16)."""
    return ("pow2_fp16", x2.device.index, x2.shape[1], x2.stride(0), x2.data_ptr() % 16 == 0)


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


def weight_only_mm(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    config: KernelConfig | None = None,
    path: KernelPath | None = None,
) -> torch.Tensor:
    """``y[m, n] = scale[n] * sum_k x[m, k] * float(q[n, k])`` with fp32 accumulation, shape ``[M, N]``.

    ``x``: ``[M, K]`` bf16/fp16 CUDA (leading dims are flattened, the result keeps them); ``q``: ``[N, K]``
    float8_e4m3fn or int8; ``scale``: ``[N]`` fp32, or fp16 group scales ``[N, K / G]`` (G a power of two >= 16;
    ``y[m, n] = sum_k x[m, k] * fp16(q[n, k] * scale[n, k // G])``, see ``_group_scaled``); ``out_dtype``:
    bf16/fp16/fp32, default ``x.dtype``. ``config`` overrides the device's table and ``path`` the device's kernel
    path (benchmarks and tests: e.g. the Ampere path on a Hopper GPU). Graph-capturable once each config has
    compiled: the only allocation is the output.
    """
    return _mm(x, q, scale, out_dtype, config, path)[0]


def group_of(q: torch.Tensor, scale: torch.Tensor) -> int:
    """0 for per-row scales (``[N]``), else the group size G of fp16 group scales ``[N, K / G]`` (quant.py), which
    the kernel takes when G is a power of two from 16 up; ``ValueError``/``TypeError`` otherwise."""
    if scale.dim() < 2:
        return 0
    groups = scale.shape[1]
    g = q.shape[1] // groups if groups and q.shape[1] % groups == 0 else 0
    if g < 16 or g & (g - 1):
        raise ValueError(f"group scales {tuple(scale.shape)} for q {tuple(q.shape)}: the group size must be a power "
                         "of two >= 16 that divides K")  # fmt: skip
    if scale.dtype != torch.float16:
        raise TypeError(f"group scales must be float16 (quant.quantize_rows stores them so), got {scale.dtype}")
    return g


def _mm(x, q, scale, out_dtype, config=None, path=None) -> tuple[torch.Tensor, _Plan | None]:
    """weight_only_mm, and the plan it launched when ``x`` went in as is (None if it needed a copy or was empty)."""
    if not HAS_TRITON:
        raise RuntimeError("weight_only_mm needs triton; check is_supported() first")
    out_dtype = out_dtype or x.dtype
    if x.dtype not in _ACT_DTYPES or q.dtype not in Q_DTYPES or out_dtype not in _OUT_DTYPES:
        raise TypeError(f"unsupported dtypes x={x.dtype} q={q.dtype} out={out_dtype}")
    if q.dim() != 2 or x.shape[-1] != q.shape[1] or scale.shape[0] != q.shape[0] or scale.dim() > 2:
        shapes = f"x {tuple(x.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)}"
        raise ValueError(f"shape mismatch: {shapes}")
    group = group_of(q, scale)
    k = x.shape[-1]
    n = q.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.stride(0) % 8 and x2.shape[0] > 1):  # unit K stride, 16-byte aligned rows
        x2 = x2.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if group:
        scale = scale if scale.stride(-1) == 1 else scale.contiguous()
    elif scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.float().contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0 or k == 0:
        return _like_x(y.zero_() if k == 0 else y, x), None
    path = path or device.device_path(_index(x2))
    plan = _gemm(x2, q, scale, y, config or pick_config(m, n, k, q.dtype, path), path)
    return _like_x(y, x), plan if x2 is x else None


class BoundKernel:
    """The fused kernel bound to one quantized weight and its scales: what :func:`weight_only_mm` works out per
    call (validation, config pick, alignment, the weight's TMA descriptor, the binary lookup) is done on the first
    call per activation signature and kept. Activations must be bf16/fp16 (callers check; ``weight_only_mm`` raises).

    Why: vLLM runs ``compute_logits`` eagerly every decode step, outside its CUDA graphs, and at tensor parallel 2
    each rank's share of the head GEMM is small enough that the call's host time is most of the head's cost
    (docs/tp.md). The head's method owns one (not a module-level cache), so a replaced weight is released together
    with its plans; an in-place update (our weight loader) keeps the same storage and so the same plans.
    """

    MAX_PLANS = 1024  # one per batch size in practice; cleared when full (prefill can bring many sizes)

    @classmethod
    def bind(cls, q: torch.Tensor, scale: torch.Tensor) -> BoundKernel | None:
        """A BoundKernel for this weight, or None where the kernel does not run (no Triton, not a CUDA/ROCm FP8 or
        INT8 weight, no kernel path for its GPU, or the kernel failed to compile there)."""
        if not (HAS_TRITON and q.is_cuda and q.dtype in Q_DTYPES and _runs_on(_index(q))):
            return None
        return cls(q, scale)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale
        self.n = q.shape[0]
        self.device = q.device
        self.plans: dict[tuple, _Plan] = {}
        self.hits = 0  # calls served by a kept plan (tests and benchmarks read it)

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        key = None
        if x.dim() == 2:
            key = (x.shape[0], x.shape[1], x.dtype, out_dtype, x.stride(0), x.stride(1), x.data_ptr() % 16 == 0)
            plan = self.plans.get(key)
            if plan is not None:
                y = torch.empty((key[0], self.n), dtype=out_dtype, device=self.device)
                plan.launch(x, y)
                self.hits += 1
                return y
        if self.device.index in _BROKEN:  # did not compile on this device: the caller takes the generic path
            raise KernelUnavailable("the weight-only kernel did not compile on this device")
        y, plan = _mm(x, self.q, self.scale, out_dtype)
        if key is not None and plan is not None and plan.runner is not None:  # a kept plan must skip the binder
            if len(self.plans) >= self.MAX_PLANS:
                self.plans.clear()
            self.plans[key] = plan
        return y


# Configs that did not fit this device's shared memory or registers, and the smaller ones that replaced them.
_FITS: dict[tuple[int, KernelConfig], KernelConfig] = {}


def _gemm(
    x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, cfg: KernelConfig, path: KernelPath | None
) -> _Plan:
    """``y = (x2 @ q.T) * scale`` with validated, non-empty 2-D operands (``q`` FP8 or INT8, or fp16 for the
    benchmark's no-conversion ceiling)."""
    path = path or _current_path()
    index = x2.device.index
    wanted = cfg
    cfg = _FITS.get((index, wanted), wanted)
    while True:
        try:
            plan = _run(x2, q, scale, y, cfg, path)
            break
        except triton.runtime.errors.OutOfResources as e:
            smaller = _shrink(cfg)
            if smaller is None:
                raise
            cfg, why = smaller, str(e).strip()
    if cfg != _FITS.get((index, wanted), wanted):  # shrunk just now: remember it, say it once
        _FITS[(index, wanted)] = cfg
        logger.warning(
            "[vllm_lmhead_quant] kernel config %s does not fit %s (%s); using %s. Tune this GPU's table to "
            "avoid the retry: python -m vllm_lmhead_quant.tune",
            tuple(wanted), torch.cuda.get_device_name(index), why, tuple(cfg),
        )  # fmt: skip
    return plan


def _shrink(cfg: KernelConfig) -> KernelConfig | None:
    """The next smaller config: fewer pipeline stages first (same tile, same accumulation order), then tiles."""
    if cfg.num_stages > 2:
        return cfg._replace(num_stages=cfg.num_stages - 1)
    for field, floor in (("block_k", 32), ("block_n", 32), ("block_m", 16)):
        if getattr(cfg, field) > floor:
            return cfg._replace(**{field: getattr(cfg, field) // 2})
    return None


class _Plan:
    """Everything ``_run`` derives from a call's shapes, dtypes, alignment and config, minus the activation and the
    output: reused by :class:`BoundKernel` for later calls with the same signature."""

    __slots__ = ("kernel", "key", "consts", "grid0", "tma", "token_scale", "group", "q", "q_desc", "scale", "m", "n",
                 "k", "block_x", "num_warps", "num_stages", "runner", "pre_runner", "_x_desc")  # fmt: skip

    def args(self, x2: torch.Tensor, y: torch.Tensor) -> tuple:
        tscale = self.scale  # placeholder pointer, never read without TOKEN_SCALE
        if self.token_scale:
            x2, tscale = _to_fp16_pow2(x2, self.pre_runner)
        m, n, k = self.m, self.n, self.k
        s = self.scale  # group scales are read through g_ptr; s_ptr is then a placeholder, never read
        sg = s.stride(0) if self.group else 0
        if self.tma:
            return (self._desc(x2), self.q_desc, s, tscale, s, y, m, n, n, k, sg)
        return (x2, self.q, s, tscale, s, y, m, n, k, x2.stride(0), self.q.stride(0), sg, n)

    def _desc(self, x2: torch.Tensor):
        template = self._x_desc
        if template is None:  # the first call validates (alignment, strides, block shape) through the constructor
            desc = self._x_desc = TensorDescriptor(x2, [self.m, self.k], [x2.stride(0), 1], self.block_x)
            return desc
        # Later calls have the same signature (BoundKernel's key: shape, strides, 16-byte alignment), so only the
        # base differs; skipping __post_init__'s re-validation saves ~2 us a call.
        desc = object.__new__(TensorDescriptor)
        desc.__dict__.update(template.__dict__)
        desc.base = x2
        return desc

    def launch(self, x2: torch.Tensor, y: torch.Tensor) -> None:
        args = self.args(x2, y)
        if self.runner is not None:
            self.runner(*args, *self.consts.values())
            return
        _launch(self.kernel, self.grid0, args, self.consts, self.key, self.num_warps, self.num_stages)
        compiled = _COMPILED.get(self.key)
        pre = _COMPILED.get(_pow2_key(x2)) if self.token_scale else None
        if compiled is not None and (pre is not None or not self.token_scale):
            # fp16 maths' pre-pass launcher is kept too, so a kept plan builds no launch key per call.
            self.runner = compiled[(self.grid0, 1, 1)]
            self.pre_runner = pre[(self.m, 1, 1)] if pre is not None else None


def _plan(x2, q, scale, out_dtype: torch.dtype, cfg: KernelConfig, path: KernelPath) -> _Plan:
    (m, k), n = x2.shape, q.shape[0]
    p = _Plan()
    bits = q.dtype == FP8_DTYPE and not path.fp8_convert
    if bits:
        q = q.view(torch.uint8)  # the kernel decodes the e4m3 bits, to fp16: bf16 activations go in as fp16
    p.grid0 = -(-m // cfg.block_m) * -(-n // cfg.block_n)  # (triton.cdiv costs ~3 us a call in Triton 3.6)
    p.group = q.shape[1] // scale.shape[1] if scale.dim() == 2 else 0  # checked by group_of in _mm
    # Group scales multiply the weight tile in fp16 before the MMA, which needs fp16 maths: in bf16 the product's
    # rounding (2^-9) would cost most of what the groups gain (docs/accuracy.md, "Per-group scales").
    p.token_scale = (cfg.fp16_math or bits or p.group > 0) and x2.dtype == torch.bfloat16
    p.consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SWAP_AB": cfg.swap_ab}
    # With TOKEN_SCALE the kernel reads a fresh fp16 copy (aligned, row stride k) instead of x2.
    x_dtype, sx = (torch.float16, k) if p.token_scale else (x2.dtype, x2.stride(0))
    x_aligned = True if p.token_scale else x2.data_ptr() % 16 == 0
    sq = q.stride(0)
    aligned = (x_aligned, *(t.data_ptr() % 16 == 0 for t in (q, scale)))
    # TMA: where the device has it, 16-byte aligned bases and row strides (else the pointer kernel runs)
    p.tma = cfg.tma and path.tma and aligned[0] and aligned[1] and sx % 8 == 0 and (sq * q.element_size()) % 16 == 0
    if p.tma:
        p.kernel = _wo_tma_kernel
        p.q_desc = TensorDescriptor(q, [n, k], [sq, 1], [cfg.block_n, cfg.block_k])
    else:
        p.kernel = _wo_kernel
        p.q_desc = None
        p.consts["EVEN_K"] = k % cfg.block_k == 0
    p.consts["TOKEN_SCALE"] = p.token_scale
    p.consts["PTX"] = path.ptx
    p.consts["GROUP"] = p.group
    # y is fresh from the caching allocator (aligned, row stride n); the rest is what Triton specializes on.
    # The device too: a binary is loaded per device (one process may drive several GPUs).
    p.key = (x2.device.index, cfg, p.tma, p.token_scale, path.ptx, x_dtype, q.dtype, out_dtype, n, k, sx, sq, aligned,
             p.group, scale.dtype, scale.stride(0))  # fmt: skip
    p.q, p.scale, p.m, p.n, p.k = q, scale, m, n, k
    p.block_x = [cfg.block_m, cfg.block_k]
    p.num_warps, p.num_stages = cfg.num_warps, cfg.num_stages
    p.runner = p.pre_runner = p._x_desc = None
    return p


def _run(x2, q, scale, y, cfg: KernelConfig, path: KernelPath) -> _Plan:
    p = _plan(x2, q, scale, y.dtype, cfg, path)
    try:  # the first launch of a specialization compiles it
        p.launch(x2, y)
    except (triton.runtime.errors.OutOfResources, torch.cuda.OutOfMemoryError):
        raise
    except triton.compiler.errors.CompilationError as e:
        index = x2.device.index
        _BROKEN.add(index)
        logger.warning(
            "[vllm_lmhead_quant] the weight-only kernel does not compile on %s (%s path): %s. The quantized head "
            "falls back to the generic path (slower than the bf16 head); please report it with this line.",
            torch.cuda.get_device_name(index), path.family, str(e).strip().splitlines()[-1][:300],
        )  # fmt: skip
        raise KernelUnavailable(str(e)) from e
    return p


def _like_x(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
