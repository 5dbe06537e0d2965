"""The FP8/INT8 heads' weight-update loader against vLLM's own vocab-parallel loader (the reference: vLLM's real
``VocabParallelEmbedding.weight_loader`` and shard layout), chunk by chunk, with padding and uneven TP shards; and its
transient memory (bounded by ``UPDATE_CHUNK_BYTES``, not by the head's size)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.nn import Parameter
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding, pad_vocab_size

from vllm_lmhead_quant.methods.quantized_head import _RequantizingLoader
from vllm_lmhead_quant.quant import FORMATS, quantize_rows


def _layer(vocab: int, hidden: int, tp_rank: int, tp_size: int):
    """What the loader reads from a vLLM head: the shard layout vLLM computes for this rank, and the quantized
    parameters that process_weights_after_loading leaves."""
    padded = pad_vocab_size(vocab, 64 * tp_size)  # vLLM pads the vocabulary to a multiple of 64 per rank
    indices = VocabParallelEmbedding._get_indices(padded, padded, vocab, vocab, tp_rank, tp_size)
    rows = indices.num_elements_padded
    layer = SimpleNamespace(shard_indices=indices, org_vocab_size=vocab, orig_dtype=torch.bfloat16)
    layer.weight_scale = Parameter(torch.zeros(rows), requires_grad=False)
    return layer, rows


def _vllm_reference(layer, rows: int, hidden: int, w: torch.Tensor, fmt):
    """vLLM's own loader into a full staging tensor, then one quantization: the pre-chunking path."""
    staging = Parameter(torch.empty(rows, hidden, dtype=torch.bfloat16), requires_grad=False)
    staging.output_dim = 0
    VocabParallelEmbedding.weight_loader(layer, staging, w)
    return quantize_rows(staging.data, fmt)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("vocab,tp_size", [(2048, 1), (2001, 1), (2001, 2), (2050, 4)])
def test_chunked_update_equals_vllms_loader_then_quantize(fmt, vocab, tp_size):
    fmt, hidden = FORMATS[fmt], 96
    w = (torch.randn(vocab, hidden) * torch.exp(torch.randn(vocab, 1))).to(torch.bfloat16)
    padding = 0
    for rank in range(tp_size):
        layer, rows = _layer(vocab, hidden, rank, tp_size)
        param = Parameter(torch.zeros(rows, hidden, dtype=fmt.dtype), requires_grad=False)
        param.output_dim = 0
        loader = _RequantizingLoader(layer, None, "lm_head", fmt, chunk_bytes=37 * hidden * 18)  # 37-row chunks
        loader(param, w)
        q_ref, s_ref = _vllm_reference(layer, rows, hidden, w, fmt)
        assert torch.equal(param.data.view(torch.uint8), q_ref.view(torch.uint8)), (vocab, tp_size, rank)
        assert torch.equal(layer.weight_scale.data, s_ref)
        real = layer.shard_indices.num_org_elements
        padding += rows - real
        assert bool((param.data[real:].view(torch.uint8) == 0).all())  # padding rows: zeros with finite scales
        assert bool(torch.isfinite(layer.weight_scale[real:]).all() and (layer.weight_scale > 0).all())
    assert padding == pad_vocab_size(vocab, 64 * tp_size) - vocab


def test_a_bad_update_changes_nothing_and_names_the_row():
    fmt, hidden = FORMATS["int8"], 64
    layer, rows = _layer(2001, hidden, 1, 2)
    param = Parameter(torch.ones(rows, hidden, dtype=torch.int8), requires_grad=False)
    param.output_dim = 0
    w = torch.randn(2001, hidden).to(torch.bfloat16)
    w[1500, 3] = float("nan")  # in rank 1's share (rows 1024...), in a late chunk
    loader = _RequantizingLoader(layer, None, "lm_head", fmt, chunk_bytes=50 * hidden * 18)
    with pytest.raises(ValueError, match=r"row numbers from 1474\): row 26 contains NaN"):
        loader(param, w)
    assert bool((param.data == 1).all()) and bool((layer.weight_scale == 0).all())  # untouched
    with pytest.raises(ValueError, match=r"shape \(2000, 64\), expected the full-vocabulary head \(2001, 64\)"):
        loader(param, w[:2000])


PEAK_SCRIPT = """
import sys, torch
from torch.nn import Parameter
sys.path.insert(0, {tests!r})
from test_update_loader import _layer
from vllm_lmhead_quant.methods.quantized_head import _RequantizingLoader
from vllm_lmhead_quant.quant import INT8
vocab, hidden = {vocab}, {hidden}
layer, rows = _layer(vocab, hidden, 0, 1)
param = Parameter(torch.ones(rows, hidden, dtype=torch.int8), requires_grad=False)  # resident before we measure
param.output_dim = 0
layer.weight_scale.data.fill_(1)
w = torch.empty(vocab, hidden, dtype=torch.bfloat16).normal_(0, 0.02)
loader = _RequantizingLoader(layer, lambda p, t: p.data.copy_(t), "lm_head", INT8)
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS: imports do not count
before = status("VmRSS:")
loader._staged(param, w) if {staged} else loader(param, w)
print(status("VmHWM:") - before)
"""


def update_peak_mib(vocab: int, hidden: int, staged: bool) -> float:
    """Peak RSS added by one update of a [vocab, hidden] INT8 head, in a fresh process (CPU)."""
    code = PEAK_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent), vocab=vocab, hidden=hidden,
                              staged=staged)  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # /proc reports KiB


def test_an_update_needs_a_chunk_not_a_copy_of_the_head():
    """32000 x 4096 (a 250 MiB bf16 head): the staged path adds a bf16 copy plus quantization transients, the
    chunked one stays under UPDATE_CHUNK_BYTES plus allocator slack (docs/weight-sync.md has the 151936 x 4096 run)."""
    staged = update_peak_mib(32000, 4096, staged=True)
    chunked = update_peak_mib(32000, 4096, staged=False)
    print(f"peak RSS added by one update: staged {staged:.0f} MiB, chunked {chunked:.0f} MiB")
    assert staged > 250 and chunked < 128, (staged, chunked)  # 64 MiB chunks plus allocator and thread-pool slack


def test_a_weight_replaced_outside_load_weights_warns_once_and_stays_correct(caplog, monkeypatch):
    """``param.data = bf16`` bypasses the loader: the head says so once and computes with what it now holds."""
    from vllm_lmhead_quant import _log
    from vllm_lmhead_quant.methods.quantized_head import QuantizedHeadMethod

    monkeypatch.setattr(_log, "_said", set())  # said once per layer id, and ids of freed layers come back
    method = QuantizedHeadMethod("lm_head", "TestForCausalLM", fmt=FORMATS["int8"], method_name="int8_lm_head",
                                 logits_dtype=torch.float32)  # fmt: skip
    layer = torch.nn.Module()
    q, scale = quantize_rows(torch.randn(300, 64).to(torch.bfloat16), FORMATS["int8"])
    layer.weight, layer.weight_scale = Parameter(q, requires_grad=False), Parameter(scale, requires_grad=False)
    new = torch.randn(300, 64).to(torch.bfloat16)
    layer.weight.data = new  # what a broadcast into named_parameters() or a direct assignment does
    x = torch.randn(3, 64).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="vllm.lmhead_quant"):
        for _ in range(3):
            y = method.apply(layer, x)
    assert torch.equal(y, x.float() @ new.float().T)
    said = [r.getMessage() for r in caplog.records if "outside model.load_weights" in r.getMessage()]
    assert len(said) == 1 and "now runs unquantized, holding 0.04 MiB" in said[0]
