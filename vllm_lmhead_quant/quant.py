"""The one quantize/dequantize helper of the package, for both weight formats of the quantized heads.

Per-output-channel (per vocab row) symmetric quantization: ``w ≈ q.float() * scale[:, None]`` with
``scale = amax(|w_row|) / qmax``:

* ``fp8``: ``q`` is float8_e4m3fn, ``qmax = 448`` (3 mantissa bits: relative rounding error up to 2^-4);
* ``int8``: ``q = round(w / scale)`` in [-127, 127] (symmetric: -128 is never produced), ``qmax = 127``
  (uniform grid: absolute error up to scale / 2). On a real model's head the same byte per weight is 4-5x more
  accurate than e4m3 (docs/accuracy.md).

Per-row scales need no cross-rank reduction under tensor parallelism (each rank owns whole vocab rows) and keep
rows of very different magnitude accurate. Everything that turns a head weight into a quantized one or back (the
method, the kernels' references, the tests, the benchmarks) calls these functions.

``group_size=G`` gives each run of G weights of a row along the hidden dimension its own scale (``scale [N, K/G]``,
float16): the same byte per weight plus 2/G bytes, and on small-hidden heads the accuracy of the bf16 head (issue
#32, docs/accuracy.md "Per-group scales": fp16 scales cost 0-4 % KL against fp32 ones, bf16 ones up to a third).
Weights are quantized with the stored (rounded) scale. G is a power of two from 16 up that divides K
(:func:`group_sizes`), the sizes the fused kernel's tiles hold whole.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch


class Format(NamedTuple):
    name: str  # "fp8" or "int8"
    dtype: torch.dtype  # storage dtype of q
    qmax: float  # |q| <= qmax; a row's largest magnitude maps to it


FP8 = Format("fp8", torch.float8_e4m3fn, 448.0)  # torch.finfo(torch.float8_e4m3fn).max
INT8 = Format("int8", torch.int8, 127.0)
FORMATS = {f.name: f for f in (FP8, INT8)}
QUANTIZED_DTYPES = tuple(f.dtype for f in FORMATS.values())
# Smallest scale we ever store: an all-zero row (e.g. vocab padding) gets this scale and quantizes to zeros,
# so dequantization never divides by zero and never produces NaN/inf.
MIN_SCALE = torch.finfo(torch.float32).tiny
GROUP_SCALE_DTYPE = torch.float16
# fp16's normal range starts at 2^-14: a group scale below it (a group whose largest weight is under 0.0078 for INT8)
# keeps fewer significant bits. Its absolute error stays below 2^-25 per scale, far under a typical group's
# rounding, so it is said once, not refused. Real heads sit well above it (SmolLM2: smallest group scale 7.7e-4).
_FP16_NORMAL = torch.finfo(torch.float16).tiny
_FP16_MIN = 2.0**-24  # the smallest fp16 subnormal: an all-zero group keeps this scale and quantizes to zeros
logger = logging.getLogger("vllm.lmhead_quant")


def quantize_rows(
    weight: torch.Tensor,
    fmt: Format = FP8,
    *,
    group_size: int | None = None,
    name: str = "weight",
    chunk_rows: int = 8192,
):
    """Quantize a ``[N, K]`` float weight to ``(q [N, K] fmt.dtype, scale)``: fp32 ``scale [N]`` per row, or fp16
    ``[N, K / group_size]`` with ``group_size``.

    Works in row chunks so the fp32 transient stays small (a 151936x4096 head needs 16 MiB per chunk,
    not 2.4 GiB). Raises ``ValueError`` naming ``name`` if the weight has NaN or inf: quantizing them
    would silently turn whole rows into NaN logits, and if ``group_size`` does not divide K.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point or weight.dtype in QUANTIZED_DTYPES:
        raise ValueError(f"{name}: expected a bf16/fp16/fp32 weight, got {weight.dtype}")
    n, k = weight.shape
    groups = 1 if group_size is None else check_group_size(group_size, k, name)
    q = torch.empty(weight.shape, dtype=fmt.dtype, device=weight.device)
    scale_dtype = torch.float32 if group_size is None else GROUP_SCALE_DTYPE
    scale = torch.empty((n, groups), dtype=scale_dtype, device=weight.device)
    for start in range(0, n, chunk_rows):
        q[start : start + chunk_rows], scale[start : start + chunk_rows] = _quantize_chunk(
            weight[start : start + chunk_rows], fmt, name, start, groups, scale_dtype
        )
    if group_size is None:
        return q, scale[:, 0]
    if bool(torch.isinf(scale).any()):
        raise ValueError(
            f"{name}: a group's largest weight exceeds {torch.finfo(GROUP_SCALE_DTYPE).max * fmt.qmax:.3g}, beyond "
            "what an fp16 group scale holds; drop group_size for per-row fp32 scales"
        )
    small = float((scale < _FP16_NORMAL).float().mean())
    if small > 0.01:
        logger.warning(
            "[vllm_lmhead_quant] %s: %.1f %% of its group scales are below fp16's normal range (groups whose largest "
            "weight is under %.2g) and keep fewer bits; drop group_size for per-row fp32 scales",
            name, 100 * small, _FP16_NORMAL * fmt.qmax,
        )  # fmt: skip
    return q, scale


def _quantize_chunk(part: torch.Tensor, fmt: Format, name: str, first_row: int, groups: int, scale_dtype):
    rows = part.to(torch.float32, copy=True)  # a copy even for fp32 input: the maths below runs in place
    if not bool(torch.isfinite(rows).all()):
        bad = first_row + int((~torch.isfinite(rows)).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"{name}: row {bad} contains NaN or inf; cannot quantize it to {fmt.name.upper()}. "
            "Fix the checkpoint (or the weight update) before loading it with a quantized head."
        )
    grouped = rows.view(rows.shape[0], groups, -1)
    s = (grouped.abs().amax(dim=2) / fmt.qmax).clamp_min(MIN_SCALE)
    if scale_dtype != torch.float32:  # quantize with the value that is stored
        s = s.clamp_min(_FP16_MIN).to(scale_dtype).float()
    scaled = grouped.div_(s[:, :, None]).clamp_(-fmt.qmax, fmt.qmax)  # in place: one fp32 copy of the chunk
    if fmt.dtype == torch.int8:
        scaled.round_()  # half to even; the clamp keeps |q| <= 127
    return scaled.view(rows.shape).to(fmt.dtype), s.to(scale_dtype)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale`` (per row ``[N]`` or per group ``[N, K/G]``) cast to ``dtype``: the exact value the format
    stands for (the fp32 product is exact). With group scales and ``dtype=torch.float16`` it is the weight the fused
    GPU kernel multiplies, ``fp16(q * scale)`` rounded once (weight_only._group_scaled)."""
    if scale.dim() == 2:
        n, k = q.shape
        return (q.float().view(n, scale.shape[1], -1) * scale.float()[:, :, None]).view(n, k).to(dtype)
    return (q.float() * scale.float()[:, None]).to(dtype)


def check_group_size(group_size: int, k: int, name: str = "weight") -> int:
    """The number of groups per row, or ``ValueError`` naming the group sizes that work for ``k``."""
    if group_size not in group_sizes(k) or isinstance(group_size, bool):
        raise ValueError(
            f"{name}: group_size {group_size!r} is not a power of two from 16 that divides the hidden size {k} (the "
            f"kernel's tiles hold whole groups); group sizes that work: {group_sizes(k)}"
        )
    return k // group_size


def group_sizes(k: int) -> list[int]:
    """Powers of two from 16 up that divide ``k`` (the group sizes a kernel tile can hold whole)."""
    return [g for g in (16, 32, 64, 128, 256, 512) if k % g == 0]


def quantized_bytes(num_rows: int, num_cols: int, group_size: int | None = None) -> int:
    """Bytes of a quantized head shard (either format): one byte per weight plus one fp32 scale per row (or one fp16
    scale per group)."""
    if group_size is None:
        return num_rows * num_cols + 4 * num_rows
    return num_rows * num_cols + 2 * num_rows * (num_cols // group_size)
