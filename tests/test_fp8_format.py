"""The FP8 format helper (quantize_rows / dequantize_rows) against fp64, edge rows included."""

from __future__ import annotations

import pytest
import torch

from vllm_lmhead_quant.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, dequantize_rows, fp8_bytes, quantize_rows

E4M3_HALF_ULP = 2.0**-4  # 3 mantissa bits: relative rounding error of a normal value is at most 2^-4
E4M3_HALF_SUBNORMAL = 2.0**-10  # smallest subnormal is 2^-9


def _check_roundtrip(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    ref = w.double() / scale.double()[:, None]  # exact scaled value
    got = q.double()
    bound = torch.maximum(ref.abs() * E4M3_HALF_ULP, torch.full_like(ref, E4M3_HALF_SUBNORMAL))
    assert bool(((got - ref).abs() <= bound * (1 + 1e-6)).all())
    deq = dequantize_rows(q, scale, torch.float64)
    assert bool(torch.isfinite(deq).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_roundtrip_error_bound(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1000, 256, generator=g) * torch.logspace(-3, 2, 1000)[:, None]).to(dtype)
    q, scale = quantize_rows(w, chunk_rows=128)  # several chunks, last one ragged
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (1000,)
    # Each row's largest magnitude maps to the top of the e4m3 range.
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((1000,), FP8_MAX))
    _check_roundtrip(w, q, scale)
    rel_rms = ((dequantize_rows(q, scale, torch.float64) - w.double()).norm() / w.double().norm()).item()
    assert rel_rms < 0.03  # measured ~0.02 for Gaussian rows


def test_zero_and_padding_rows_are_safe():
    w = torch.randn(128, 64, dtype=torch.bfloat16)
    w[5] = 0
    w[100:] = 0  # vocab padding rows are zero-filled by vLLM's loader
    q, scale = quantize_rows(w)
    assert bool((scale[100:] == MIN_SCALE).all()) and scale[5] == MIN_SCALE
    deq = dequantize_rows(q, scale)
    assert bool((deq[100:] == 0).all()) and bool((deq[5] == 0).all())
    assert bool(torch.isfinite(deq).all())


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1e6, 1e30, 3.0e38])
def test_huge_and_tiny_rows(magnitude):
    w = (torch.randn(16, 64, dtype=torch.float64) / 4).clamp(-1, 1) * magnitude
    w[0, 0] = magnitude  # pin the row maximum
    w32 = w.float()
    q, scale = quantize_rows(w32)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    _check_roundtrip(w32, q, scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_a_clear_error(bad):
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    w[37, 3] = bad
    with pytest.raises(ValueError, match=r"lm_head: row 37 contains NaN or inf"):
        quantize_rows(w, name="lm_head")


def test_rejects_wrong_shapes_and_dtypes():
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        quantize_rows(torch.zeros(4, 4, dtype=torch.int32))


def test_fp8_bytes():
    assert fp8_bytes(151936, 4096) == 151936 * 4096 + 4 * 151936
