"""bf16_last_layer_fp32 on a real vLLM engine: bitwise equal to vLLM's own fp32 head (the oracle)."""

from __future__ import annotations

import pytest
from helpers import ORACLE, cached_run, methods_except, run_llm

pytestmark = pytest.mark.engine


MODELS = [("llama", False), ("llama", True), ("qwen3", True), ("qwen2", False)]
FP32 = "vllm_lmhead_quant.methods.fp32_head.FP32HeadMethod"
UNQUANT_EMBED = "vllm.model_executor.layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod"


@pytest.mark.parametrize(("arch", "tied"), MODELS, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in MODELS])
def test_bitwise_equal_to_head_dtype_oracle(tiny, arch, tied):
    path = tiny(arch, tied=tied)
    base = cached_run(path)
    oracle = cached_run(path, **ORACLE)
    ours = run_llm(path, quantization="bf16_last_layer_fp32")

    # Prompt and sampled logprobs (top-5 each step) and tokens: bit for bit the oracle's.
    assert ours.flat() == oracle.flat()
    assert ours.tokens == oracle.tokens
    # ...and not the bf16 head's: the flag really changed the logits.
    assert ours.flat() != base.flat()
    assert len(ours.flat()) > 100

    # The head got our method; every other module the class it gets without the flag.
    assert ours.methods["lm_head"] == FP32
    assert methods_except(ours, "lm_head") == methods_except(base, "lm_head")
    assert ours.methods["model.embed_tokens"] == UNQUANT_EMBED
    # No fp32 copy, no prepacked copy: the head holds its bf16 weight only (tied: the very same Parameter).
    assert ours.head["dtype"] == "torch.bfloat16"
    assert ours.head["shares_embed_weight"] is tied
    assert not ours.head["cpu_linear"]


def test_fp16_model(tiny):
    path = tiny("llama", tied=False)
    oracle = run_llm(path, dtype="float16", hf_overrides={"head_dtype": "float32"})
    ours = run_llm(path, dtype="float16", quantization="bf16_last_layer_fp32")
    assert ours.flat() == oracle.flat()


def test_fp32_model_warns_and_runs(tiny, caplog):
    path = tiny("llama", tied=False)
    base = run_llm(path, dtype="float32")
    with caplog.at_level("WARNING", logger="vllm.lmhead_quant"):
        ours = run_llm(path, dtype="float32", quantization="bf16_last_layer_fp32")
    assert ours.flat() == base.flat()  # nothing to change: vLLM's own fp32 maths
    assert any("already runs in float32" in r.getMessage() for r in caplog.records)


def test_combined_with_head_dtype_override(tiny, caplog):
    path = tiny("qwen3", tied=True)
    oracle = cached_run(path, **ORACLE)
    with caplog.at_level("WARNING", logger="vllm.lmhead_quant"):
        both = run_llm(path, quantization="bf16_last_layer_fp32", hf_overrides={"head_dtype": "float32"})
    assert both.flat() == oracle.flat()
    assert any("both request fp32 logits" in r.getMessage() for r in caplog.records)
