"""--additional-config '{"lm_head_quant": {...}}' parsing: every bad value is a clear error."""

from __future__ import annotations

import pytest

from vllm_lmhead_quant.options import HeadOptions


def test_defaults():
    assert HeadOptions.from_additional_config({}) == HeadOptions("auto", "keep")
    assert HeadOptions.from_additional_config({"other_plugin": 1}) == HeadOptions()


def test_valid():
    opts = HeadOptions.from_additional_config({"lm_head_quant": {"logits_dtype": "float32", "tied": "quantize"}})
    assert opts == HeadOptions("float32", "quantize")


def test_body_takes_vllms_online_scheme_names():
    from vllm_lmhead_quant import _compat

    for scheme in _compat.online_quant_shorthands():
        assert HeadOptions.from_additional_config({"lm_head_quant": {"body": scheme}}).body == scheme
    assert HeadOptions().body is None


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("float32", "must be a JSON object"),
        (
            {"logit_dtype": "float32"},
            r"unknown key\(s\) \['logit_dtype'\]; allowed: \['body', 'group_size', 'logits_dtype', 'tied'\]",
        ),
        ({"logits_dtype": "bfloat16"}, r"must be one of \['auto', 'float32', 'model'\]"),
        ({"tied": True}, r"must be one of \['keep', 'quantize'\]"),
        ({"body": "fp8"}, r"body\" must be one of vLLM's online quantization schemes \[.*'fp8_per_channel'.*got 'fp8'"),
        ({"body": ["fp8_per_channel"]}, "online quantization schemes"),
        ({"group_size": "32"}, r"group_size\" must be a positive integer such as 32 .* got '32'"),
        ({"group_size": 0}, "must be a positive integer"),
        ({"group_size": True}, "must be a positive integer"),
    ],
)
def test_invalid(raw, match):
    with pytest.raises(ValueError, match=match):
        HeadOptions.from_additional_config({"lm_head_quant": raw})


def test_parity_merges_the_users_head_options_into_each_head():
    """``parity --engine-args '{"additional_config": {"lm_head_quant": {"group_size": 32}}}'`` reaches the quantized
    heads next to their own ``tied: quantize`` (it was replaced by it, silently)."""
    from vllm_lmhead_quant.parity import head_engine_args

    user = {"additional_config": {"lm_head_quant": {"group_size": 32}}, "max_model_len": 512}
    int8 = head_engine_args("int8", user)
    assert int8["quantization"] == "int8_lm_head" and int8["max_model_len"] == 512
    assert int8["additional_config"] == {"lm_head_quant": {"tied": "quantize", "group_size": 32}}
    assert head_engine_args("int8", {})["additional_config"] == {"lm_head_quant": {"tied": "quantize"}}
    assert head_engine_args("bf16", user) == user
