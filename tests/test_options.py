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


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("float32", "must be a JSON object"),
        ({"logit_dtype": "float32"}, r"unknown key\(s\) \['logit_dtype'\]; allowed: \['logits_dtype', 'tied'\]"),
        ({"logits_dtype": "bfloat16"}, r"must be one of \['auto', 'float32', 'model'\]"),
        ({"tied": True}, r"must be one of \['keep', 'quantize'\]"),
    ],
)
def test_invalid(raw, match):
    with pytest.raises(ValueError, match=match):
        HeadOptions.from_additional_config({"lm_head_quant": raw})
