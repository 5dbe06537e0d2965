"""A real trained model (SmolLM2-135M-Instruct, built offline from PyPI's GGUF by real_model.py) on the CPU engine:
the fp32 head is bitwise vLLM's oracle on real text, and the parity CLI measures every head against an fp64 head,
with bounds from docs/accuracy.md. Random tiny models (the other tests) hide what real heads do."""

from __future__ import annotations

import json

import pytest
from helpers import ORACLE, run_llm

from vllm_lmhead_quant import parity, real_model

pytestmark = pytest.mark.engine

# Measured with these settings on the CPU engine (2 chunks x 256 tokens, 510 positions, tied table quantized): int8
# RMS 0.078 nats, 2.9 % top-1 flips, KL 2.6e-3; fp8 0.29, 11.4 %, 2.9e-2. Bounds leave room, not doubt.
INT8_RMS, INT8_FLIPS, INT8_KL = 0.15, 0.06, 6e-3


@pytest.fixture(scope="module")
def smollm2():
    return real_model.smollm2()


def test_fp32_head_is_bitwise_the_oracle_on_real_text(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    text = [tokenizer.decode(c[1:]) for c in real_model.token_chunks(tokenizer, chunk_len=128, max_chunks=3)]
    prompts = ["The capital of France is", *text]
    oracle = run_llm(smollm2, prompts=prompts, max_tokens=8, **ORACLE)
    ours = run_llm(smollm2, prompts=prompts, max_tokens=8, quantization="bf16_last_layer_fp32")
    assert tokenizer.decode(oracle.tokens[0]).startswith(" Paris")  # a trained model, not random weights
    assert ours.head["logits_dtype"] == "torch.float32"
    assert ours.flat() == oracle.flat() and ours.tokens == oracle.tokens


def test_parity_cli_on_the_real_model(smollm2, tmp_path, capsys):
    out_json, out_png = tmp_path / "parity.json", tmp_path / "parity.png"
    argv = [str(smollm2), "--chunk-len", "256", "--max-chunks", "2", "--greedy-prompts", "2", "--greedy-tokens", "16",
            "--heads", "bf16,fp32,fp8,int8", "--json", str(out_json), "--png", str(out_png)]  # fmt: skip
    assert parity.main(argv) == 0
    assert "| int8 |" in capsys.readouterr().out
    by = {r["head"]: r for r in json.loads(out_json.read_text())}
    assert set(by) == {"bf16", "vllm-fp32", "fp32", "fp8", "int8"}
    for r in by.values():
        assert r["positions"] == 2 * 255
        assert r["engine_vs_hook_max"] < 1e-4  # the hook scored the very logits the engine returned
    # fp32 logits: the fp64 head's values up to fp32 accumulation, and bitwise vLLM's own fp32 head.
    assert by["fp32"]["rms"] < 1e-4 and by["fp32"]["flip_rate"] == 0 and by["fp32"]["body_identical"]
    assert by["fp32"]["abs_deltas"] == by["vllm-fp32"]["abs_deltas"]
    # bf16 logits alone flip top-1 tokens on a real model.
    assert by["bf16"]["flip_rate"] > 0.005
    int8, fp8 = by["int8"], by["fp8"]
    assert int8["rms"] < INT8_RMS and int8["flip_rate"] < INT8_FLIPS and int8["kl_ref_head"] < INT8_KL, int8
    assert int8["kl_ref_head"] < fp8["kl_ref_head"] / 4 and int8["rms"] < fp8["rms"] / 2
    assert int8["body_identical"] is False  # tied table quantized: input embeddings carry its rounding too
    assert int8["rms_head_only"] < int8["rms"]
    assert abs(int8["k3"] - int8["kl_head_ref"]) < 0.5 * int8["kl_head_ref"]  # the estimator tracks the exact KL
    assert out_png.stat().st_size > 10_000
