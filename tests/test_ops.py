"""The head GEMMs (CPU paths here; the CUDA kernels have their own test file run on the GPU host)."""

from __future__ import annotations

import pytest
import torch

from vllm_lmhead_quant import ops
from vllm_lmhead_quant.quant import FORMATS, dequantize_rows, quantize_rows

FMTS = pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)


def _inputs(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 2048, 128), (7, 1000, 512), (33, 4099, 1024)])
def test_fp32_logits_against_fp64(dtype, m, n, k):
    x, w = _inputs(m, n, k, dtype)
    ref = x.double() @ w.double().T
    out = ops.fp32_logits(x, w)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    # Products of bf16/fp16 values are exact in fp32; only the fp32 accumulation rounds.
    err = ((out.double() - ref).abs() / (x.double().abs() @ w.double().abs().T)).max().item()
    assert err < k * 2.0**-24
    # The bf16/fp16-output head is ~1000x worse: the reason this method exists.
    low = torch.nn.functional.linear(x, w).double()
    low_err = ((low - ref).abs() / (x.double().abs() @ w.double().abs().T)).max().item()
    assert low_err > 50 * err


def test_fp32_logits_bias_and_3d():
    x, w = _inputs(6, 300, 64, torch.bfloat16)
    bias = torch.randn(300, dtype=torch.bfloat16)
    out = ops.fp32_logits(x.reshape(2, 3, 64), w, bias)
    ref = (x.double() @ w.double().T + bias.double()).reshape(2, 3, 300)
    assert out.shape == (2, 3, 300)
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_fp32_logits_matches_vllm_head_dtype_maths():
    """Our CPU path is the exact op sequence of vLLM's head_dtype=float32 fallback, so bitwise equal."""
    x, w = _inputs(5, 777, 128, torch.bfloat16)
    vllm_way = torch.nn.functional.linear(x.to(torch.float32), w.to(torch.float32))
    assert torch.equal(ops.fp32_logits(x, w), vllm_way)


@FMTS
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_logits_against_fp64(monkeypatch, fmt, dtype, out_dtype):
    monkeypatch.setattr(ops, "CHUNK_ROWS", 256)  # several chunks, last one ragged
    x, w = _inputs(9, 1000, 256, dtype)
    q, scale = quantize_rows(w, fmt)
    ref = x.double() @ dequantize_rows(q, scale, torch.float64).T  # the exact value of the format
    out = ops.quantized_logits(x, q, scale, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (9, 1000)
    rel = ((out.double() - ref).abs() / (x.double().abs() @ dequantize_rows(q, scale, torch.float64).abs().T)).max()
    # fp32 accumulation, one final rounding to out_dtype.
    assert rel.item() < (2.0**-8 if out_dtype == torch.bfloat16 else 256 * 2.0**-24)


@FMTS
def test_quantized_logits_bias(fmt):
    x, w = _inputs(4, 130, 64, torch.bfloat16)
    q, scale = quantize_rows(w, fmt)
    bias = torch.randn(130)
    out = ops.quantized_logits(x, q, scale, bias, out_dtype=torch.float32)
    ref = x.double() @ dequantize_rows(q, scale, torch.float64).T + bias.double()
    assert (out.double() - ref).abs().max().item() < 1e-4


@FMTS
def test_quantized_logits_never_materializes_the_whole_weight(monkeypatch, fmt):
    """The generic path converts at most CHUNK_ROWS rows at a time."""
    monkeypatch.setattr(ops, "CHUNK_ROWS", 100)
    seen = []
    real = ops._mm_fp32
    monkeypatch.setattr(ops, "_mm_fp32", lambda a, b: seen.append(b.shape[0]) or real(a, b))
    x, w = _inputs(2, 1050, 32, torch.bfloat16)
    q, scale = quantize_rows(w, fmt)
    ops.quantized_logits(x, q, scale)
    assert max(seen) == 100 and sum(seen) == 1050
