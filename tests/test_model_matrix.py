"""The model matrix on a real vLLM engine: every architecture the CPU engine runs, tied and untied, every method.

Each cell uses vllm_lmhead_quant.check (the same code as the users' check CLI): the head is bound, every other
module keeps its method class, bf16_last_layer_fp32 is bitwise equal to vLLM's head_dtype oracle, fp8_lm_head and
int8_lm_head are within their bounds. Cohere, Cohere2, Gemma2, OPT, Bloom, GPT-OSS and Qwen3-Next run through our
subclasses (vllm_lmhead_quant/models/), because vLLM builds their heads without the quantization config; without them
those models fail loudly (tests/test_models.py).
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
from helpers import cached_run

from vllm_lmhead_quant.check import check_model
from vllm_lmhead_quant.tiny import ARCHS

pytestmark = pytest.mark.engine

IN_MATRIX = {a: s for a, s in ARCHS.items() if s.cpu_ok and s.matrix}
# Cells that add no coverage (CI time): untied Bloom rebuilds its head exactly as untied OPT does.
SAME_AS_ANOTHER = {("bloom", False)}
CELLS = [
    (a, t)
    for a, s in IN_MATRIX.items()
    for t in ([s.tied, not s.tied] if s.can_untie else [s.tied])
    if (a, t) not in SAME_AS_ANOTHER
]


@pytest.mark.parametrize(("arch", "tied"), CELLS, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CELLS])
def test_cell(tiny, matrix_results, arch, tied):
    results = check_model(tiny(arch, tied=tied), runner=cached_run)
    matrix_results.append(
        {"arch": arch, "hf_class": ARCHS[arch].hf_class, "tied": tied, "tp": 1, "results": [asdict(r) for r in results]}
    )
    for r in results:
        assert r.ok, r
        assert r.others_unchanged
    fp32, fp8, int8 = results
    assert fp32.bitwise_oracle is True
    # tied heads stay bf16 unless opted in
    assert fp8.head_dtype == ("torch.bfloat16" if tied else "torch.float8_e4m3fn")
    assert int8.head_dtype == ("torch.bfloat16" if tied else "torch.int8")


def test_tensor_parallel_2(tiny, matrix_results, monkeypatch):
    """TP=2 on the CPU engine (two worker processes, one core each): each rank computes its vocab shard with our
    method and vLLM's gather is unchanged; fp32 stays bitwise equal to the oracle at the same TP size."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM's auto binding needs one NUMA node per rank
    path = tiny("llama", tied=False)
    # max_num_seqs=1: requests reach a multi-process engine core asynchronously; batching them one at a time keeps
    # the body's numerics identical between the runs being compared.
    results = check_model(path, tensor_parallel_size=2, max_num_seqs=1)
    matrix_results.append(
        {"arch": "llama", "hf_class": ARCHS["llama"].hf_class, "tied": False, "tp": 2,
         "results": [asdict(r) for r in results]}
    )  # fmt: skip
    fp32, fp8, int8 = results
    assert fp32.ok and fp32.bitwise_oracle, fp32
    assert fp8.ok, fp8
    assert int8.ok, int8
    # Per-rank head shard: half the (padded) vocab. Quantized bytes = V/2 * H + 4 * V/2.
    assert fp8.head_dtype == "torch.float8_e4m3fn" and int8.head_dtype == "torch.int8"
    v_half, h = 2048 // 2, 128
    assert fp8.head_bytes == int8.head_bytes == v_half * h + 4 * v_half
    assert fp32.head_bytes == 2 * v_half * h
