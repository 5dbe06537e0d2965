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


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 128)], ids=["2d", "3d"])
def test_fp32_head_is_bitwise_vllms_own_head_dtype_maths(bias, shape):
    """The oracle's own code: vLLM's LogitsProcessor._apply_head with head_dtype float32, on a real vLLM head."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from vllm_lmhead_quant.methods.fp32_head import FP32HeadMethod

    head = ParallelLMHead(777, 128, params_dtype=torch.bfloat16, disable_tp=True)  # vLLM's unquantized method
    with torch.no_grad():
        head.weight.normal_(0, 0.05)
    oracle = LogitsProcessor.__new__(LogitsProcessor)  # its __init__ reads head_dtype from a running engine's config
    torch.nn.Module.__init__(oracle)
    oracle.head_dtype = torch.float32
    x = (torch.randn(shape) * 2).to(torch.bfloat16)
    b = torch.randn(head.weight.shape[0]).to(torch.bfloat16) if bias else None  # padded to 832 rows
    theirs = oracle._apply_head(head, x, b)
    ours = FP32HeadMethod("lm_head").apply(head, x, b)
    assert theirs.dtype == ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


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


def test_the_head_path_line_names_the_slow_paths(monkeypatch):
    """One start-up line per engine says how the quantized head runs; slower-than-bf16 paths warn with a ratio."""
    import logging

    from vllm_lmhead_quant.kernels import device, weight_only

    level, line = ops.head_path(torch.device("cpu"), torch.int8)
    assert level == logging.WARNING and "chunks" in line and "x the bf16 head" in line

    facts = {"A100": device.DeviceFacts("NVIDIA A100-SXM4-80GB", (8, 0), 163 << 10, 108),
             "H100": device.DeviceFacts("NVIDIA H100 80GB HBM3", (9, 0), 227 << 10, 132),
             "V100": device.DeviceFacts("Tesla V100-SXM2-32GB", (7, 0), 96 << 10, 80)}  # fmt: skip
    monkeypatch.setattr(weight_only, "HAS_TRITON", True)
    for gpu, q_dtype, expected_level, words in (
        ("H100", torch.float8_e4m3fn, logging.INFO, "hopper path (hardware e4m3 convert, TMA loads"),
        ("A100", torch.int8, logging.INFO, "ampere path"),
        ("A100", torch.float8_e4m3fn, logging.WARNING, "int8_lm_head needs no FP8 hardware"),
        ("V100", torch.int8, logging.WARNING, "SM (7, 0) has no kernel path on Tesla V100"),
    ):
        monkeypatch.setattr(device, "device_path", lambda index, g=gpu: device.path_for(facts[g]))
        monkeypatch.setattr(device, "facts", lambda index, g=gpu: facts[g])
        level, line = ops.head_path(torch.device("cuda", 0), q_dtype)
        assert level == expected_level and words in line, (gpu, line)
    monkeypatch.setattr(device, "device_path", lambda index: device.path_for(facts["H100"]))
    level, line = ops.head_path(torch.device("cuda", 0), torch.int8, 32)  # the kernel takes group scales too
    assert level == logging.INFO and line.endswith("fp16 scales per 32 weights, applied to each weight tile in fp16 "
                                                   "before the MMA")  # fmt: skip
    monkeypatch.setattr(weight_only, "HAS_TRITON", False)
    level, line = ops.head_path(torch.device("cuda", 0), torch.int8)
    assert level == logging.WARNING and "Triton is not installed" in line and "H200" in line


@FMTS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_logits_with_group_scales_against_fp64(monkeypatch, fmt, dtype):
    """Group scales (``[N, K/G]``) on the generic path: each chunk dequantized exactly in fp32, fp32 products."""
    monkeypatch.setattr(ops, "CHUNK_ROWS", 256)
    x, w = _inputs(9, 1000, 256, dtype)
    q, scale = quantize_rows(w, fmt, group_size=32)
    deq = dequantize_rows(q, scale, torch.float64)
    out = ops.quantized_logits(x, q, scale, out_dtype=torch.float32)
    rel = ((out.double() - x.double() @ deq.T).abs() / (x.double().abs() @ deq.abs().T)).max()
    assert out.shape == (9, 1000) and rel.item() < 256 * 2.0**-24
    assert scale.dtype == torch.float16 and scale.shape == (1000, 256 // 32)
    assert ops.bind_kernel(q, scale) is None  # no GPU here: the fused kernel (tests/test_kernel_cuda.py) needs one

