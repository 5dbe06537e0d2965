"""Weight-only FP8 LM-head GEMM for CUDA (Hopper/Ada): ``y = (x @ q.T) * scale`` in one Triton kernel.

Why a kernel of our own: at decode the head GEMM is a pure weight stream (V x H bytes), so an FP8 weight
halves the bytes only if nothing re-materializes it in bf16. ``torch._scaled_mm`` would need the *activation*
in FP8 too (w8a8), which costs ~0.1 nats of logprob error; dequantizing per call costs 8x the bf16 GEMM. Here
each FP8 tile is converted to the activation dtype in registers (e4m3 -> bf16/fp16 is exact: 3 mantissa bits,
exponent range inside both), multiplied on the 16-bit tensor cores with fp32 accumulation, and the per-row
fp32 scale is applied to the fp32 accumulator in the epilogue. One rounding, at the final store.

Layout: the kernel computes the transposed product ``y.T[n, m] = sum_k q[n, k] * x[m, k]`` ("swap AB"): the
vocab dimension fills the 64-row side of Hopper's wgmma, so a decode batch of 1..16 tokens pads only the
narrow side (16), and the converted FP8 tile can be the register operand A, skipping a shared-memory trip.

Decode-sized configs load both tiles with TMA (Hopper's bulk tensor copy engine: one instruction per tile,
zero-filled edges), which took the M <= 16 stream from ~81% to ~87% of the copy bandwidth; elsewhere (Ada, odd
strides) the same math runs with pointer loads. Configs come from a fixed table keyed on M (tuned on an H100,
see ``benchmarks/bench_head_gemm.py --tune``); there is no autotuning, so the first call per config compiles
and every later call, inside CUDA-graph capture included, is a single launch with no host sync and no
allocation other than the output.

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

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

FP8_DTYPE = torch.float8_e4m3fn
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


# (max M, config), first match wins. Tuned on H100 80GB HBM3 (torch 2.11, triton 3.6) over
# V x H in {151936x1024, 151936x4096, 131072x5120, 262144x2560} by
# `benchmarks/bench_head_gemm.py --tune --apply`, which rewrites the block between the markers. Decode sizes
# win with TMA loads; from M ~ 192 on every config is slower than cuBLAS bf16 (compute-bound, and the
# in-register conversion serializes wgmma), see docs/bench/. A dequantize-chunks-then-cuBLAS path was measured
# too and lost everywhere (torch's e4m3 -> bf16 copy alone runs at ~1 TB/s), so it is not shipped.
# <tuned-table>
_CONFIG_TABLE: tuple[tuple[int, KernelConfig], ...] = (
    (16, KernelConfig(16, 64, 128, 4, 6, tma=True)),
    (32, KernelConfig(32, 128, 128, 8, 5, tma=True)),
    (64, KernelConfig(64, 128, 128, 4, 4, tma=True)),
    (128, KernelConfig(128, 128, 64, 8, 4, tma=True)),
    (1024, KernelConfig(256, 128, 64, 8, 3)),
    (1 << 62, KernelConfig(256, 128, 64, 8, 4)),
)
# </tuned-table>
# Below this many vocab tiles the GPU is under-filled (132 SMs on H100): halve block_n for small TP shards.
_MIN_TILES = 264


def pick_config(m: int, n: int, k: int) -> KernelConfig:
    """The table's config for ``m`` tokens; ``block_n`` halved (to >= 32) while ``n`` gives too few tiles."""
    cfg = next(c for max_m, c in _CONFIG_TABLE if m <= max_m)
    block_n = cfg.block_n
    m_tiles = -(-m // cfg.block_m)
    while block_n > 32 and m_tiles * -(-n // block_n) < _MIN_TILES:
        block_n //= 2
    return cfg._replace(block_n=block_n)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    """Cached: the head runs every decode step, and a driver query per call showed up in host launch time."""
    return torch.cuda.get_device_capability(device_index)


def _device_capability(t: torch.Tensor) -> tuple[int, int]:
    index = t.device.index
    return _capability(torch.cuda.current_device() if index is None else index)


def is_supported(x: torch.Tensor, q: torch.Tensor | None = None) -> bool:
    """True if the Triton kernel can run on ``x`` (and ``q`` if given): CUDA, Triton, SM >= 8.9, bf16/fp16 x.

    SM 8.9 (Ada) is the first architecture whose Triton backend converts e4m3 in hardware.
    """
    if not (HAS_TRITON and isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in _ACT_DTYPES):
        return False
    if torch.version.hip is not None:  # the e4m3fn (OCP) format is not what ROCm's Triton path expects
        return False
    if q is not None and (q.dtype != FP8_DTYPE or q.device != x.device):
        return False
    return _device_capability(x) >= (8, 9)


if HAS_TRITON:
    # M is not specialized (Triton would otherwise compile M == 1 and M % 16 == 0 variants): one binary per
    # config serves every M of its bucket, so a warm-up with any M covers CUDA-graph capture of the others.
    @triton.jit(do_not_specialize=["M"])
    def _fp8_wo_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
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
            # e4m3 -> bf16/fp16 is exact; the dot accumulates in fp32.
            acc = tl.dot(w.to(act_dtype), xa, acc) if SWAP_AB else tl.dot(xa, w.to(act_dtype), acc)
            q_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        s = tl.load(s_ptr + rn_ld)
        rm64 = rm.to(tl.int64)
        if SWAP_AB:
            acc = acc * s[:, None]
            y_ptrs = y_ptr + rm64[None, :] * stride_ym + rn[:, None]
            mask = (rm[None, :] < M) & (rn[:, None] < N)
        else:
            acc = acc * s[None, :]
            y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn[None, :]
            mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M"])
    def _fp8_wo_tma_kernel(
        x_desc,
        q_desc,
        s_ptr,
        y_ptr,
        M,
        N,
        stride_ym,
        K,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SWAP_AB: tl.constexpr,
    ):
        # Same math as _fp8_wo_kernel; tiles arrive by TMA (one instruction per tile, 128-byte swizzled, no
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
            w = q_desc.load([off_n, kb * BLOCK_K]).to(act_dtype)
            xa = x_desc.load([off_m, kb * BLOCK_K])
            acc = tl.dot(w, xa.T, acc) if SWAP_AB else tl.dot(xa, w.T, acc)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        rm64 = rm.to(tl.int64)
        if SWAP_AB:
            acc = acc * s[:, None]
            y_ptrs = y_ptr + rm64[None, :] * stride_ym + rn[:, None]
            mask = (rm[None, :] < M) & (rn[:, None] < N)
        else:
            acc = acc * s[None, :]
            y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn[None, :]
            mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _tma_ok(x2: torch.Tensor, q: torch.Tensor) -> bool:
    """TMA needs SM 9.0+, 16-byte aligned bases and row strides (else the pointer kernel runs)."""
    return (
        _device_capability(x2) >= (9, 0)
        and x2.data_ptr() % 16 == 0
        and q.data_ptr() % 16 == 0
        and (x2.stride(0) * x2.element_size()) % 16 == 0
        and q.stride(0) % 16 == 0
    )


def fp8_weight_only_mm(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``y[m, n] = scale[n] * sum_k x[m, k] * float(q[n, k])`` with fp32 accumulation, shape ``[M, N]``.

    ``x``: ``[M, K]`` bf16/fp16 CUDA (leading dims are flattened, the result keeps them); ``q``: ``[N, K]``
    float8_e4m3fn; ``scale``: ``[N]`` fp32; ``out_dtype``: bf16/fp16/fp32, default ``x.dtype``. ``config``
    overrides the tuned table (benchmarks and tests only). Graph-capturable once each config has compiled:
    the only allocation is the output.
    """
    if not HAS_TRITON:
        raise RuntimeError("fp8_weight_only_mm needs triton; check is_supported() first")
    out_dtype = out_dtype or x.dtype
    if x.dtype not in _ACT_DTYPES or q.dtype != FP8_DTYPE or out_dtype not in _OUT_DTYPES:
        raise TypeError(f"unsupported dtypes x={x.dtype} q={q.dtype} out={out_dtype}")
    if q.dim() != 2 or x.shape[-1] != q.shape[1] or scale.numel() != q.shape[0]:
        shapes = f"x {tuple(x.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)}"
        raise ValueError(f"shape mismatch: {shapes}")
    lead = x.shape[:-1]
    k = x.shape[-1]
    n = q.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.stride(0) % 8 and x2.shape[0] > 1):  # unit K stride, 16-byte aligned rows
        x2 = x2.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.float().contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if k == 0:
        return y.zero_().reshape(*lead, n)
    cfg = config or pick_config(m, n, k)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    if cfg.tma and _tma_ok(x2, q):
        from triton.tools.tensor_descriptor import TensorDescriptor

        _fp8_wo_tma_kernel[grid](
            TensorDescriptor(x2, [m, k], [x2.stride(0), 1], [cfg.block_m, cfg.block_k]),
            TensorDescriptor(q, [n, k], [q.stride(0), 1], [cfg.block_n, cfg.block_k]),
            scale,
            y,
            m,
            n,
            y.stride(0),
            k,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            SWAP_AB=cfg.swap_ab,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        return y.reshape(*lead, n)
    _fp8_wo_kernel[grid](
        x2,
        q,
        scale,
        y,
        m,
        n,
        k,
        x2.stride(0),
        q.stride(0),
        y.stride(0),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SWAP_AB=cfg.swap_ab,
        EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y.reshape(*lead, n)
