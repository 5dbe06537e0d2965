"""Shared helpers for engine tests. The run/inspect logic lives in the package (vllm_lmhead_quant.check), which the
users' check CLI and the model matrix use too."""

from __future__ import annotations

import functools

from vllm_lmhead_quant.check import (  # noqa: F401 - re-exported for the tests
    ENGINE_ARGS,
    ORACLE,
    PROMPTS,
    Run,
    inspect_model,
    logprob_errors,
    methods_except,
    run_llm,
)


def _thaw(value):
    return {k: _thaw(v) for k, v in value} if isinstance(value, tuple) else value


def _freeze(value):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items())) if isinstance(value, dict) else value


@functools.cache
def _cached(path, frozen) -> Run:
    return run_llm(path, **{k: _thaw(v) for k, v in frozen})


def cached_run(path, **kwargs) -> Run:
    """Memoized run_llm for baselines shared by several tests (same process, same arguments)."""
    return _cached(str(path), tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())))


def run_harness(script, python, arg, **env) -> dict:
    """Run a harness script (its own process: its own process group, or another venv's vLLM) with ``arg`` as JSON,
    and return the JSON it prints between ``@@RESULT@@`` marks."""
    import json
    import os
    import subprocess

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}, **env}
    proc = subprocess.run([str(python), str(script), json.dumps(arg)], capture_output=True, text=True, timeout=900,
                          env=env)  # fmt: skip
    assert proc.returncode == 0 and "@@RESULT@@" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.split("@@RESULT@@")[1])


def capture(fn):
    """``fn`` run once (compiles and keeps its plan), then captured into a CUDA graph: ``(graph, its static output)``.
    The kernels' graph tests replay it after changing the static inputs."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
