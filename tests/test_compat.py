"""The version shims in _compat.py, pinned on the installed vLLM."""

from __future__ import annotations

import types

import torch

from vllm_lmhead_quant import _compat


def test_no_current_config_outside_model_construction():
    assert _compat.current_vllm_config() is None


def test_batch_invariant_default_off():
    assert _compat.batch_invariant_enabled() is False


def test_single_process_defaults():
    assert _compat.is_last_pp_rank() is True
    assert _compat.tp_rank() == 0


def test_additional_config_and_head_dtype():
    assert _compat.additional_config(types.SimpleNamespace(additional_config={"a": 1})) == {"a": 1}
    assert _compat.additional_config(types.SimpleNamespace(additional_config=object())) == {}
    assert _compat.additional_config(None) == {}
    mc = types.SimpleNamespace(dtype=torch.bfloat16, head_dtype=torch.float32)
    assert _compat.head_dtype(mc) == torch.float32
    assert _compat.head_dtype(types.SimpleNamespace(dtype=torch.bfloat16)) == torch.bfloat16


def test_attention_base_is_a_class():
    assert isinstance(_compat.AttentionLayerBase, type)
