"""The format helper (quant.quantize_rows / dequantize_rows) for FP8 and INT8, against fp64, edge rows included."""

from __future__ import annotations

import pytest
import torch

from vllm_lmhead_quant.quant import FORMATS, FP8, INT8, MIN_SCALE, dequantize_rows, quantize_rows, quantized_bytes

E4M3_HALF_ULP = 2.0**-4  # 3 mantissa bits: relative rounding error of a normal value is at most 2^-4
E4M3_HALF_SUBNORMAL = 2.0**-10  # smallest subnormal is 2^-9


def _check_roundtrip(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Each element is its scaled value rounded to the nearest point of the format's grid."""
    ref = w.double() / scale.double()[:, None]  # exact scaled value
    got = q.double()
    if q.dtype == INT8.dtype:
        # round to nearest integer, of the fp32 quotient (within 2^-24 * 127 of the exact one)
        bound = torch.full_like(ref, 0.5 + 1e-5)
        assert bool((got.abs() <= 127).all())  # symmetric: -128 never appears
    else:
        bound = torch.maximum(ref.abs() * E4M3_HALF_ULP, torch.full_like(ref, E4M3_HALF_SUBNORMAL))
    assert bool(((got - ref).abs() <= bound * (1 + 1e-6) + 1e-6).all())
    deq = dequantize_rows(q, scale, torch.float64)
    assert bool(torch.isfinite(deq).all())


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_roundtrip_error_bound(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1000, 256, generator=g) * torch.logspace(-3, 2, 1000)[:, None]).to(dtype)
    q, scale = quantize_rows(w, fmt, chunk_rows=128)  # several chunks, last one ragged
    assert q.dtype == fmt.dtype and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (1000,)
    # Each row's largest magnitude maps to the top of the format's range.
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((1000,), fmt.qmax))
    _check_roundtrip(w, q, scale)
    rel_rms = ((dequantize_rows(q, scale, torch.float64) - w.double()).norm() / w.double().norm()).item()
    # Gaussian rows, 256 wide: e4m3 ~0.02; INT8's uniform grid ~amax/127/sqrt(12) per element ~0.008.
    assert rel_rms < {"fp8": 0.03, "int8": 0.012}[fmt.name], rel_rms


def test_int8_is_more_accurate_than_fp8_on_gaussian_rows():
    """The reason int8_lm_head exists: the same byte per weight, a uniform grid beats 3 mantissa bits on rows whose
    values are bell-shaped (docs/accuracy.md has the real-model numbers)."""
    w = torch.randn(4096, 576, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    errors = {}
    for fmt in (FP8, INT8):
        q, scale = quantize_rows(w, fmt)
        errors[fmt.name] = ((dequantize_rows(q, scale, torch.float64) - w.double()).norm() / w.double().norm()).item()
    assert errors["int8"] < 0.5 * errors["fp8"], errors


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)
def test_zero_and_padding_rows_are_safe(fmt):
    w = torch.randn(128, 64, dtype=torch.bfloat16)
    w[5] = 0
    w[100:] = 0  # vocab padding rows are zero-filled by vLLM's loader
    q, scale = quantize_rows(w, fmt)
    assert bool((scale[100:] == MIN_SCALE).all()) and scale[5] == MIN_SCALE
    deq = dequantize_rows(q, scale)
    assert bool((deq[100:] == 0).all()) and bool((deq[5] == 0).all())
    assert bool(torch.isfinite(deq).all())


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)
@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1e6, 1e30, 3.0e38])
def test_huge_and_tiny_rows(fmt, magnitude):
    w = (torch.randn(16, 64, dtype=torch.float64) / 4).clamp(-1, 1) * magnitude
    w[0, 0] = magnitude  # pin the row maximum
    w32 = w.float()
    q, scale = quantize_rows(w32, fmt)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    _check_roundtrip(w32, q, scale)


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_a_clear_error(fmt, bad):
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    w[37, 3] = bad
    with pytest.raises(
        ValueError, match=rf"lm_head: row 37 contains NaN or inf; cannot quantize it to {fmt.name.upper()}"
    ):
        quantize_rows(w, fmt, name="lm_head")


def test_rejects_wrong_shapes_and_dtypes():
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(torch.randn(4, 4, 4))
    for dtype in (torch.int32, torch.int8, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="bf16/fp16/fp32"):
            quantize_rows(torch.zeros(4, 4).to(dtype), INT8)


def test_quantized_bytes():
    assert quantized_bytes(151936, 4096) == 151936 * 4096 + 4 * 151936


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)
@pytest.mark.parametrize("group_size", [32, 64])
def test_per_group_scales(fmt, group_size):
    """One scale per ``group_size`` weights of a row: each group's largest magnitude maps to the top of the range,
    the round trip is the per-row one applied group by group, and the error is below per-row's on rows whose
    groups differ in magnitude (what per-group scales are for)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 192, generator=g) * torch.logspace(-2, 1, 192)[None, :]  # magnitudes vary along K
    w = w.to(torch.bfloat16)
    q, scale = quantize_rows(w, fmt, group_size=group_size, chunk_rows=128)
    groups = 192 // group_size
    assert q.shape == w.shape and scale.shape == (300, groups) and scale.dtype == torch.float16
    top = q.float().abs().view(300, groups, group_size).amax(dim=2)
    assert torch.equal(top, torch.full_like(top, fmt.qmax))  # fp16's rounding of the scale (2^-11) keeps the top
    for j in range(groups):  # each group is a per-row quantization of that slice with its scale rounded to fp16
        cols = slice(j * group_size, (j + 1) * group_size)
        _, s_j = quantize_rows(w[:, cols], fmt)
        assert torch.equal(scale[:, j], s_j.to(torch.float16))
        q_j = (w[:, cols].float() / scale[:, j].float()[:, None]).clamp(-fmt.qmax, fmt.qmax)
        q_j = (q_j.round() if fmt.dtype == torch.int8 else q_j).to(fmt.dtype)
        assert torch.equal(q[:, cols].view(torch.uint8), q_j.view(torch.uint8))
    err, small = {}, slice(0, group_size)  # the group of the smallest magnitudes
    for gs in (None, group_size):
        qq, ss = quantize_rows(w, fmt, group_size=gs)
        diff = dequantize_rows(qq, ss, torch.float64)[:, small] - w[:, small].double()
        err[gs] = (diff.norm() / w[:, small].double().norm()).item()
    # INT8's uniform grid: a row scale set by the large groups wipes out the small ones. e4m3's grid is relative, so
    # a group scale only lifts the small group's values out of e4m3's coarser subnormals (a few percent).
    assert err[group_size] < {"int8": 0.1, "fp8": 0.95}[fmt.name] * err[None], err
    assert quantized_bytes(300, 192, group_size) == 300 * 192 + 2 * 300 * groups  # fp16 group scales


def test_group_size_must_divide_the_hidden_size():
    w = torch.randn(8, 576, dtype=torch.bfloat16)  # SmolLM2's hidden size: 128 does not divide it
    with pytest.raises(ValueError, match=r"group_size 128 is not a power of two from 16 that divides the hidden size "
                       r"576 .*; group sizes that work: \[16, 32, 64\]"):  # fmt: skip
        quantize_rows(w, INT8, group_size=128, name="lm_head")
    with pytest.raises(ValueError, match=r"group_size 48 is not a power of two"):  # divides 576, but no tile holds it
        quantize_rows(w, INT8, group_size=48, name="lm_head")


def test_a_group_scale_beyond_fp16_is_refused():
    """A group whose largest weight needs a scale above fp16's 65504 would store inf (and dequantize to NaN)."""
    w = torch.full((4, 64), 0.01)
    w[2, 40] = 1e7
    with pytest.raises(ValueError, match=r"lm_head: a group's largest weight exceeds 8.32e\+06, .* drop group_size"):
        quantize_rows(w, INT8, group_size=32, name="lm_head")
    assert quantize_rows(w, INT8, name="lm_head")[1].isfinite().all()  # per-row fp32 scales take it
