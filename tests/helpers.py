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
