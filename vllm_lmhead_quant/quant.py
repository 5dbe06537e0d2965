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

``group_size=G`` gives each run of G weights of a row along the hidden dimension its own scale (``scale [N, K/G]``):
the same byte per weight plus 4/G bytes, and on small-hidden heads the accuracy of the bf16 head (issue #32,
docs/accuracy.md "Per-group scales"). G must divide K; :func:`group_sizes` lists the ones that do.
"""

from __future__ import annotations

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


def quantize_rows(
    weight: torch.Tensor,
    fmt: Format = FP8,
    *,
    group_size: int | None = None,
    name: str = "weight",
    chunk_rows: int = 8192,
):
    """Quantize a ``[N, K]`` float weight to ``(q [N, K] fmt.dtype, scale float32)``: ``scale [N]`` per row, or
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
    scale = torch.empty((n, groups), dtype=torch.float32, device=weight.device)
    for start in range(0, n, chunk_rows):
        q[start : start + chunk_rows], scale[start : start + chunk_rows] = _quantize_chunk(
            weight[start : start + chunk_rows], fmt, name, start, groups
        )
    return q, (scale[:, 0] if group_size is None else scale)


def _quantize_chunk(part: torch.Tensor, fmt: Format, name: str, first_row: int, groups: int):
    rows = part.to(torch.float32, copy=True)  # a copy even for fp32 input: the maths below runs in place
    if not bool(torch.isfinite(rows).all()):
        bad = first_row + int((~torch.isfinite(rows)).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"{name}: row {bad} contains NaN or inf; cannot quantize it to {fmt.name.upper()}. "
            "Fix the checkpoint (or the weight update) before loading it with a quantized head."
        )
    grouped = rows.view(rows.shape[0], groups, -1)
    s = (grouped.abs().amax(dim=2) / fmt.qmax).clamp_min(MIN_SCALE)
    scaled = grouped.div_(s[:, :, None]).clamp_(-fmt.qmax, fmt.qmax)  # in place: one fp32 copy of the chunk
    if fmt.dtype == torch.int8:
        scaled.round_()  # half to even; the clamp keeps |q| <= 127
    return scaled.view(rows.shape).to(fmt.dtype), s


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale`` (per row ``[N]`` or per group ``[N, K/G]``) cast to ``dtype``: the exact value the format
    stands for."""
    if scale.dim() == 2:
        n, k = q.shape
        return (q.float().view(n, scale.shape[1], -1) * scale.float()[:, :, None]).view(n, k).to(dtype)
    return (q.float() * scale.float()[:, None]).to(dtype)


def check_group_size(group_size: int, k: int, name: str = "weight") -> int:
    """The number of groups per row, or ``ValueError`` naming the group sizes that divide ``k``."""
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise ValueError(
            f"{name}: group_size {group_size!r} does not divide the hidden size {k}; "
            f"group sizes that do: {group_sizes(k)}"
        )
    return k // group_size


def group_sizes(k: int) -> list[int]:
    """Powers of two from 16 up that divide ``k`` (the group sizes a kernel tile can hold whole)."""
    return [g for g in (16, 32, 64, 128, 256, 512) if k % g == 0]


def quantized_bytes(num_rows: int, num_cols: int, group_size: int | None = None) -> int:
    """Bytes of a quantized head shard (either format): one byte per weight plus one fp32 scale per row (or group)."""
    groups = 1 if group_size is None else num_cols // group_size
    return num_rows * num_cols + 4 * num_rows * groups
