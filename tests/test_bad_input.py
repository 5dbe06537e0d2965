"""Bad input on a real engine: a clear error that names the fix, never a silent no-op."""

from __future__ import annotations

import pytest
from helpers import run_llm

pytestmark = pytest.mark.engine


# A model that never offers its head to the quantization config: tests/test_models.py (vLLM's own Gemma2 class).


@pytest.mark.parametrize("method", ["fp8_lm_head", "int8_lm_head"])
def test_quantized_head_with_head_dtype_override_names_the_fix(tiny, method):
    expected = rf'{method} cannot be combined with hf_overrides .*return float32 logits by default'
    with pytest.raises(ValueError, match=expected):
        run_llm(tiny("llama", tied=False), quantization=method, hf_overrides={"head_dtype": "float32"})


def test_unknown_option_is_an_error(tiny):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tie'\]"):
        run_llm(tiny("llama", tied=False), quantization="fp8_lm_head", additional_config={"lm_head_quant": {"tie": 1}})


def test_quantized_head_options_on_fp32_method_are_an_error(tiny):
    with pytest.raises(ValueError, match="apply to fp8_lm_head and int8_lm_head only"):
        run_llm(
            tiny("llama", tied=False),
            quantization="bf16_last_layer_fp32",
            additional_config={"lm_head_quant": {"logits_dtype": "float32"}},
        )
