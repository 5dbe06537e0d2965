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


def quantize_rows(weight: torch.Tensor, fmt: Format = FP8, *, name: str = "weight", chunk_rows: int = 8192):
    """Quantize a ``[N, K]`` float weight to ``(q [N, K] fmt.dtype, scale [N] float32)``.

    Works in row chunks so the fp32 transient stays small (a 151936x4096 head needs 16 MiB per chunk,
    not 2.4 GiB). Raises ``ValueError`` naming ``name`` if the weight has NaN or inf: quantizing them
    would silently turn whole rows into NaN logits.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point or weight.dtype in QUANTIZED_DTYPES:
        raise ValueError(f"{name}: expected a bf16/fp16/fp32 weight, got {weight.dtype}")
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=fmt.dtype, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, chunk_rows):
        q[start : start + chunk_rows], scale[start : start + chunk_rows] = _quantize_chunk(
            weight[start : start + chunk_rows], fmt, name, start
        )
    return q, scale


def _quantize_chunk(part: torch.Tensor, fmt: Format, name: str, first_row: int):
    rows = part.to(torch.float32, copy=True)  # a copy even for fp32 input: the maths below runs in place
    if not bool(torch.isfinite(rows).all()):
        bad = first_row + int((~torch.isfinite(rows)).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"{name}: row {bad} contains NaN or inf; cannot quantize it to {fmt.name.upper()}. "
            "Fix the checkpoint (or the weight update) before loading it with a quantized head."
        )
    s = (rows.abs().amax(dim=1) / fmt.qmax).clamp_min(MIN_SCALE)
    scaled = rows.div_(s[:, None]).clamp_(-fmt.qmax, fmt.qmax)  # in place: one fp32 copy of the chunk at a time
    if fmt.dtype == torch.int8:
        scaled.round_()  # half to even; the clamp keeps |q| <= 127
    return scaled.to(fmt.dtype), s


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale[:, None]`` cast to ``dtype``: the exact value the format stands for."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantized_bytes(num_rows: int, num_cols: int) -> int:
    """Bytes of a quantized head shard (either format): one byte per weight plus one fp32 scale per row."""
    return num_rows * num_cols + 4 * num_rows
