"""Logging: one INFO line per engine saying which layer got which method and what it saved."""

from __future__ import annotations

import logging

from vllm_lmhead_quant import _compat

# A child of vLLM's "vllm" logger, so lines appear with vLLM's own handler and format.
logger = logging.getLogger("vllm.lmhead_quant")
_said: set[tuple] = set()


def once(level: int, key: tuple, msg: str, *args) -> None:
    """Log ``msg`` once per process for ``key`` (and only on tensor-parallel rank 0)."""
    if key in _said or _compat.tp_rank() != 0:
        return
    _said.add(key)
    logger.log(level, f"[vllm_lmhead_quant] {msg}", *args)


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"
