"""Which weight-only kernel path a GPU gets, decided from what the device reports, not from its name.

The facts that matter: shared memory per block (which configs fit), SM count (how many vocab tiles fill the GPU),
whether Triton converts e4m3 in hardware (SM 8.9+; elsewhere the kernel decodes the bits with integer ops),
whether tiles can arrive by TMA (SM 9.0+), and whether inline PTX runs (NVIDIA only). ``path_for`` is pure
Python so every family's choice is tested on CPU (tests/test_kernel_table.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

from vllm_lmhead_quant.kernels import tables


class DeviceFacts(NamedTuple):
    name: str
    capability: tuple[int, int]  # CUDA compute capability (ROCm: what torch reports)
    smem_per_block: int  # bytes a block may opt in to
    sm_count: int
    hip: bool = False


@dataclass(frozen=True, eq=False)
class KernelPath:
    """How the kernel runs on one device. ``picked`` memoizes configs per (m, n, k, weight dtype): the head asks
    every decode step."""

    family: str  # for log lines: "hopper", "ada", "ampere", "blackwell", "rocm"
    table: tables.Table
    fp8_convert: bool  # e4m3 -> 16-bit by a hardware convert; False: decoded from the bits (exact, ~4 ops)
    tma: bool  # configs that ask for TMA get it
    ptx: bool  # INT8 converts with inline PTX (NVIDIA); False: Triton's plain cast
    min_tiles: int  # fewer vocab x token tiles than this under-fill the GPU: narrower vocab tiles
    batch_invariant: bool = False  # vLLM's batch-invariant mode: one config for every M (tables.BATCH_INVARIANT_M)
    picked: dict = field(default_factory=dict, repr=False)

    def describe(self, fmt: str | None = None) -> str:
        """One line for the logs; ``fmt`` ("fp8"/"int8"): name only that format's pinned config."""
        fp8 = "hardware e4m3 convert" if self.fp8_convert else "e4m3 decoded from its bits"
        line = f"{self.family} path ({fp8}, {'TMA' if self.tma else 'pointer'} loads, table {self.table.source})"
        if self.batch_invariant:
            rows = self.pinned_rows()
            pins = "; ".join(f"{name} {pinned(cfg)}" for name, cfg in rows.items() if fmt in (None, name))
            line += (
                f"; vLLM batch-invariant mode: one config for every M, the table's M = {tables.BATCH_INVARIANT_M} row "
                f"({pins}; block_n halved only where the vocab shard has too few tiles, fp16 maths only at hidden "
                ">= 2048)"
            )
        return line

    def pinned_rows(self) -> dict[str, tables.KernelConfig]:
        """Per weight format, the row every M runs in batch-invariant mode."""
        return {fmt: tables.batch_invariant_row(rows) for fmt, rows in self.table.rows.items()}


def pinned(cfg: tables.KernelConfig) -> str:
    """A config as the start-up line names it."""
    named = (("swap AB", cfg.swap_ab), ("TMA", cfg.tma), ("fp16 maths", cfg.fp16_math))
    flags = "".join(f", {name}" for name, on in named if on)
    return f"block {cfg.block_m}x{cfg.block_n}x{cfg.block_k}, {cfg.num_warps} warps, {cfg.num_stages} stages{flags}"


_FAMILIES = {8: "ampere", 9: "hopper", 10: "blackwell", 11: "blackwell", 12: "blackwell-consumer"}


def path_for(
    facts: DeviceFacts, table: tables.Table | None = None, *, batch_invariant: bool = False
) -> KernelPath | None:
    """The kernel path for a device, or None where the fused kernel cannot run (NVIDIA before SM 8.0: no bf16
    tensor cores in Triton). ``batch_invariant``: one config for every M (vLLM's batch-invariant mode)."""
    table = table or tables.for_device(facts.name, facts.smem_per_block)
    min_tiles = 2 * max(facts.sm_count, 1)  # two programs per SM hide one's epilogue behind the other's loads
    if facts.hip:
        return KernelPath(
            "rocm", table, fp8_convert=False, tma=False, ptx=False, min_tiles=min_tiles, batch_invariant=batch_invariant
        )
    if facts.capability < (8, 0):
        return None
    family = "ada" if facts.capability == (8, 9) else _FAMILIES.get(facts.capability[0], "nvidia")
    return KernelPath(
        family,
        table,
        fp8_convert=facts.capability >= (8, 9),
        tma=facts.capability[0] >= 9,
        ptx=True,
        min_tiles=min_tiles,
        batch_invariant=batch_invariant,
    )


@functools.cache
def facts(index: int) -> DeviceFacts:
    """The current process's view of GPU ``index`` (cached: asked once per device)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    # Triton's driver reports the opt-in maximum per block (what a kernel may use); torch only the per-SM total.
    smem = props.shared_memory_per_multiprocessor - 1024
    try:
        from triton.runtime import driver

        smem = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except Exception:  # no Triton: the fused kernel does not run anyway
        pass
    hip = torch.version.hip is not None
    return DeviceFacts(props.name, (props.major, props.minor), int(smem), props.multi_processor_count, hip)


@functools.cache
def device_path(index: int) -> KernelPath | None:
    return path_for(facts(index), batch_invariant=batch_invariant_mode())


def batch_invariant_mode() -> bool:
    """vLLM's batch-invariant mode (``VLLM_BATCH_INVARIANT``, read as vLLM reads it). False in a process that has not
    imported vLLM (offline kernel compiles, the kernel benchmarks): only vLLM can switch its mode on, and this module
    does not import it."""
    import sys

    if "vllm" not in sys.modules:
        return False
    from vllm_lmhead_quant import _compat

    return _compat.batch_invariant_enabled()
