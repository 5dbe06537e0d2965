"""The version shims in _compat.py, pinned on the installed vLLM: each probe must find the real vLLM attribute it
was written for (a shim that silently took its fallback would otherwise pass), and behave as documented."""

from __future__ import annotations

import dataclasses
import types

import torch
import vllm

from vllm_lmhead_quant import _compat


def test_the_attention_base_is_vllms_own():
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    assert _compat.AttentionLayerBase is AttentionLayerBase  # not the older-layout fallback


def test_current_config_is_read_through_vllms_getter():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config import vllm as config_vllm

    assert hasattr(config_vllm, "get_current_vllm_config_or_none")  # the >= 0.30 branch is the one taken here
    assert _compat.current_vllm_config() is None  # outside model construction
    config = VllmConfig()
    with set_current_vllm_config(config):
        assert _compat.current_vllm_config() is config


def test_batch_invariant_reads_vllms_env_flag():
    import vllm.envs as envs

    assert hasattr(envs, "VLLM_BATCH_INVARIANT")  # the >= 0.30 branch
    assert _compat.batch_invariant_enabled() is bool(envs.VLLM_BATCH_INVARIANT) is False


def test_parallel_probes_use_vllms_groups():
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank  # what the probes call

    assert callable(get_pp_group) and callable(get_tensor_model_parallel_rank)
    assert _compat.is_last_pp_rank() is True and _compat.tp_rank() == 0  # no distributed state: single process


def test_head_dtype_is_a_model_config_field():
    from vllm.config import ModelConfig

    assert "head_dtype" in {f.name for f in dataclasses.fields(ModelConfig)} or hasattr(ModelConfig, "head_dtype")
    mc = types.SimpleNamespace(dtype=torch.bfloat16, head_dtype=torch.float32)
    assert _compat.head_dtype(mc) == torch.float32
    assert _compat.head_dtype(types.SimpleNamespace(dtype=torch.bfloat16, head_dtype=None)) == torch.bfloat16


def test_additional_config_is_a_vllm_config_field():
    from vllm.config import VllmConfig

    assert _compat.additional_config(VllmConfig(additional_config={"a": 1})) == {"a": 1}
    assert _compat.additional_config(types.SimpleNamespace(additional_config=object())) == {}
    assert _compat.additional_config(None) == {}


def test_installed_version_is_one_we_support():
    assert vllm.__version__.startswith(("0.26.", "0.32.", "0.33."))


def test_registered_model_reads_the_registrys_lazy_entries():
    """models/__init__.py registers our subclass only over the vLLM class it extends, read through this probe."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _VLLM_MODELS, _LazyRegisteredModel

    assert isinstance(ModelRegistry.models["LlamaForCausalLM"], _LazyRegisteredModel)
    assert _VLLM_MODELS["LlamaForCausalLM"] == ("llama", "LlamaForCausalLM")
    assert _compat.registered_model("LlamaForCausalLM") == ("vllm.model_executor.models.llama", "LlamaForCausalLM")
    assert _VLLM_MODELS["Cohere2ForCausalLM"] == ("commandr", "CohereForCausalLM")  # what models/ extends
    assert _compat.registered_model("NoSuchForCausalLM") is None
