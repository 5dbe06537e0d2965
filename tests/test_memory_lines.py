"""The INFO line reports the bytes the engine really holds: where a quantized head cannot share its table with the
input embeddings (a head with a bias, or a model that ties by assigning the weight), quantizing adds a one-byte
copy, and the log says so with a warning instead of claiming a saving. Real vLLM layers, no engine."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

from vllm_lmhead_quant.config import Int8HeadConfig

V, H = 256, 64


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    """Lines are said once per layer id; ids of freed layers come back, so each test starts with none said."""
    from vllm_lmhead_quant import _log

    monkeypatch.setattr(_log, "_said", set())


def _model(bias: bool, tied: str = "keep"):
    from vllm.config import VllmConfig, set_current_vllm_config

    config = Int8HeadConfig()
    with set_current_vllm_config(VllmConfig(additional_config={"lm_head_quant": {"tied": tied}})):
        embed = VocabParallelEmbedding(V, H, params_dtype=torch.bfloat16, quant_config=config, disable_tp=True)
        head = ParallelLMHead(V, H, bias=bias, params_dtype=torch.bfloat16, quant_config=config, prefix="lm_head",
                              disable_tp=True)  # fmt: skip
    with torch.no_grad():
        embed.weight.normal_()
        head.weight.normal_()
    return embed, head


def _process(*modules):
    for m in modules:
        m.quant_method.process_weights_after_loading(m)


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vllm.lmhead_quant"]


def test_an_untied_head_reports_its_saving(caplog):
    embed, head = _model(bias=False)
    with caplog.at_level("INFO", logger="vllm.lmhead_quant"):
        _process(embed, head)
    line = next(m for m in _lines(caplog) if "-> int8_lm_head" in m)
    # bf16 256 x 64 = 32 KiB -> int8 16 KiB + 1 KiB of scales
    assert "0.03 MiB -> 0.02 MiB per rank, saved 0.01 MiB" in line
    assert not any("adds a one-byte copy" in m for m in _lines(caplog))


def test_tied_is_seen_from_the_built_modules_and_kept_by_default(caplog):
    """The config says untied; the model ties by assignment: the default "keep" hands over to the bf16 tied method
    instead of adding a copy (the decision comes from the modules, not from tie_word_embeddings)."""
    embed, head = _model(bias=False)
    head.weight = embed.weight
    with caplog.at_level("INFO", logger="vllm.lmhead_quant"):
        _process(embed, head)
    assert type(head.quant_method).__name__ == "TiedBF16HeadMethod" and head.weight is embed.weight
    assert head.weight.dtype == torch.bfloat16
    assert any('"tied": "quantize"' in m and "0 bytes saved" in m for m in _lines(caplog))
    assert not any("-> int8_lm_head" in m for m in _lines(caplog))


def test_a_head_tied_by_assignment_reports_the_extra_copy(caplog):
    """With "tied": "quantize", a head that cannot take over the shared table (the model assigns the weight instead of
    calling tie_weights, so the embeddings never get the method) is quantized on its own: the log says it adds
    memory."""
    embed, head = _model(bias=False, tied="quantize")
    head.weight = embed.weight
    with caplog.at_level("INFO", logger="vllm.lmhead_quant"):
        _process(embed, head)
    assert embed.weight.dtype == torch.bfloat16 and head.weight.dtype == torch.int8  # two tables now
    lines = _lines(caplog)
    warning = next(m for m in lines if "adds a one-byte copy" in m)
    assert "instead of calling tie_weights" in warning and "+0.02 MiB per rank" in warning
    assert "Run without the flag" in warning
    info = next(m for m in lines if "-> int8_lm_head" in m)
    assert "holds 0.02 MiB per rank next to the bfloat16 table it is tied to: adds 0.02 MiB" in info
    assert "saved" not in info and "shared with the input embeddings" not in info


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_tie_weights_in_quantize_mode_shares_one_table_bias_or_not(caplog, bias):
    """tie_weights keeps the head module (its bias slot too: the Transformers backend registers a bias on it) and
    one quantized table serves both: the saving is real."""
    from vllm.config import VllmConfig, set_current_vllm_config

    config = Int8HeadConfig()
    extra = {"lm_head_quant": {"tied": "quantize"}}
    with set_current_vllm_config(VllmConfig(additional_config=extra)):
        embed = VocabParallelEmbedding(V, H, params_dtype=torch.bfloat16, quant_config=config, disable_tp=True)
        head = ParallelLMHead(V, H, bias=bias, params_dtype=torch.bfloat16, quant_config=config, prefix="lm_head",
                              disable_tp=True)  # fmt: skip
    head.quant_method.shared = True  # what a tied config gives (facts.tied is read from the model config)
    with torch.no_grad():
        embed.weight.normal_()
    tied = head.tie_weights(embed)
    assert tied is head and embed.quant_method is head.quant_method
    with caplog.at_level("INFO", logger="vllm.lmhead_quant"):
        _process(embed, head)
    assert head.weight is embed.weight and head.weight_scale is embed.weight_scale and head.weight.dtype == torch.int8
    ids = torch.tensor([0, 7, 255])
    rows = embed.quant_method.embedding(embed, ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (3, H)
    lines = _lines(caplog)
    assert not any("adds a one-byte copy" in m for m in lines)
    info = next(m for m in lines if "-> int8_lm_head" in m)
    assert "shared with the input embeddings" in info and "saved 0.01 MiB" in info


def test_a_config_that_says_tied_does_not_keep_a_separate_head_in_bf16(caplog):
    """DeepSeek-V2 with tie_word_embeddings true builds a separate head (vLLM does not tie it): the head is
    quantized, because nothing shares its weight once loaded."""
    from types import SimpleNamespace

    from vllm_lmhead_quant.options import HeadOptions

    config = Int8HeadConfig()
    facts = SimpleNamespace(head_dtype=None, dtype=torch.bfloat16, options=HeadOptions(), architecture="DeepseekV2")
    embed, head = _model(bias=False)
    head.quant_method = config._head_method("lm_head", facts, tied=True, module=True)
    head.quant_method.peers = [__import__("weakref").ref(embed)]
    with caplog.at_level("INFO", logger="vllm.lmhead_quant"):
        _process(embed, head)
    assert head.weight.dtype == torch.int8 and embed.weight.dtype == torch.bfloat16
    assert any("DeepseekV2: ParallelLMHead 'lm_head' -> int8_lm_head" in m and "saved" in m for m in _lines(caplog))
