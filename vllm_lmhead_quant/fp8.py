"""The one FP8 quantize/dequantize helper of the package.

Per-output-channel (per vocab row) symmetric FP8 e4m3: ``w ≈ q.float() * scale[:, None]`` with
``scale = amax(|w_row|) / 448``. Per-row scales need no cross-rank reduction under tensor parallelism (each
rank owns whole vocab rows) and keep rows of very different magnitude accurate.

Everything that turns a head weight into FP8 or back (the method, the kernels' references, the tests, the
benchmarks) calls these functions, so there is one definition of the format.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Smallest scale we ever store: an all-zero row (e.g. vocab padding) gets this scale and quantizes to zeros,
# so dequantization never divides by zero and never produces NaN/inf.
MIN_SCALE = torch.finfo(torch.float32).tiny


def quantize_rows(weight: torch.Tensor, *, name: str = "weight", chunk_rows: int = 8192):
    """Quantize a ``[N, K]`` float weight to ``(q [N, K] float8_e4m3fn, scale [N] float32)``.

    Works in row chunks so the fp32 transient stays small (a 151936x4096 head needs 16 MiB per chunk,
    not 2.4 GiB). Raises ``ValueError`` naming ``name`` if the weight has NaN or inf: quantizing them
    would silently turn whole rows into NaN logits.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point or weight.dtype == FP8_DTYPE:
        raise ValueError(f"{name}: expected a bf16/fp16/fp32 weight, got {weight.dtype}")
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, chunk_rows):
        rows = weight[start : start + chunk_rows].float()
        if not bool(torch.isfinite(rows).all()):
            bad = start + int((~torch.isfinite(rows)).any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"{name}: row {bad} contains NaN or inf; cannot quantize it to FP8. "
                "Fix the checkpoint (or the weight update) before loading it with fp8_lm_head."
            )
        s = (rows.abs().amax(dim=1) / FP8_MAX).clamp_min(MIN_SCALE)
        q[start : start + chunk_rows] = (rows / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale[start : start + chunk_rows] = s
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale[:, None]`` cast to ``dtype``: the exact value the FP8 format stands for."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def fp8_bytes(num_rows: int, num_cols: int) -> int:
    """Bytes of an FP8 head shard: one byte per weight plus one fp32 scale per row."""
    return num_rows * num_cols + 4 * num_rows
