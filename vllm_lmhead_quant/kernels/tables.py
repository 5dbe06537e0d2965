"""Kernel config tables as data: one JSON file per GPU model, and generic ones per shared-memory size.

A table maps a token count M to a launch shape, per weight format. Which table a GPU gets (first that exists):

1. ``~/.cache/vllm_lmhead_quant/kernel_configs/<device name>.json``, written by ``python -m vllm_lmhead_quant.tune``
   on that GPU (the user's own measurement wins);
2. ``configs/<device name>.json`` shipped here, tuned on that GPU model (H100, H200);
3. ``configs/generic_smem_<KiB>k.json``: the largest generic table whose shared memory per block fits the device.
   Every config of a generic table is compiled for each target of its family in CI and must fit its budget
   (tests/test_kernel_compile.py), so a GPU nobody tuned still never fails to launch.

File names follow vLLM's tuned-config convention (``torch.cuda.get_device_name()`` with spaces as underscores).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

SHIPPED = Path(__file__).with_name("configs")
USER = Path.home() / ".cache" / "vllm_lmhead_quant" / "kernel_configs"
NO_LIMIT = 1 << 62  # the last row's max M


class KernelConfig(NamedTuple):
    """One launch shape: ``block_m`` = token side (>= 16, tl.dot's minimum), ``block_n`` = vocab side."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = True
    tma: bool = False  # load tiles with the Hopper bulk tensor copy engine (SM 9.0+; ignored elsewhere)
    fp16_math: bool = False  # bf16 activations pre-scaled per token by a power of two into fp16 (weight_only.py)


Rows = tuple[tuple[int, KernelConfig], ...]  # (max M, config), ascending; the first row with m <= max M wins


class Table(NamedTuple):
    source: str  # file name, for the log line
    rows: dict[str, Rows]  # weight format name ("fp8", "int8") -> rows
    smem_bytes: int | None = None  # generic tables: the shared memory per block every config fits in


# vLLM's batch-invariant mode: every M runs the config that the table gives this M. The tuned rows change the
# reduction's shape between M buckets (block_k 64 or 128, swap AB, fp16 maths on or off), so a token's logits could
# depend on how many tokens share its batch; one config for every M removes that by construction (issue #29). Why
# the M = 64 row: it is tuned for the largest decode batch, so decode keeps a memory-bound tile (a large-M row would
# multiply up to 256 padded tokens per tile at M = 1), and at prefill sizes it is still a full tensor-core tile.
BATCH_INVARIANT_M = 64


def batch_invariant_row(rows: Rows) -> KernelConfig:
    """The one config of a format's rows that serves every M in batch-invariant mode."""
    return next(cfg for max_m, cfg in rows if max_m >= BATCH_INVARIANT_M)


def file_name(device_name: str) -> str:
    return device_name.replace(" ", "_") + ".json"


def load(path: Path) -> Table:
    data = json.loads(Path(path).read_text())
    rows = {}
    for fmt in ("fp8", "int8"):
        if fmt not in data:
            raise ValueError(f"{path}: no '{fmt}' rows")
        parsed = []
        for row in data[fmt]:
            row = dict(row)
            max_m = row.pop("max_m")
            parsed.append((NO_LIMIT if max_m is None else int(max_m), KernelConfig(**row)))
        if [m for m, _ in parsed] != sorted(m for m, _ in parsed) or parsed[-1][0] != NO_LIMIT:
            raise ValueError(f"{path}: '{fmt}' rows must ascend in max_m and end with max_m null")
        rows[fmt] = tuple(parsed)
    return Table(Path(path).name, rows, data.get("smem_bytes"))


def dump(table: Table, path: Path, **meta) -> None:
    """Write ``table`` as JSON (``meta``: where and how it was measured)."""
    out = dict(meta)
    if table.smem_bytes is not None:
        out["smem_bytes"] = table.smem_bytes
    for fmt, rows in table.rows.items():
        out[fmt] = [{"max_m": None if m >= NO_LIMIT else m, **cfg._asdict()} for m, cfg in rows]
    # One config per line: tables are read and diffed by people.
    text = json.dumps(out, indent=1)
    for fmt in table.rows:
        rows = ",\n  ".join(json.dumps(r) for r in out[fmt])
        text = text.replace(json.dumps(out[fmt], indent=1).replace("\n", "\n "), f"[\n  {rows}\n ]")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")


@functools.cache
def generic_tables() -> tuple[Table, ...]:
    """The shipped generic tables, largest shared memory first."""
    tables = [load(p) for p in SHIPPED.glob("generic_smem_*.json")]
    return tuple(sorted(tables, key=lambda t: -t.smem_bytes))


def for_device(device_name: str, smem_per_block: int) -> Table:
    for folder in (USER, SHIPPED):
        path = folder / file_name(device_name)
        if path.is_file():
            return load(path)
    fitting = [t for t in generic_tables() if t.smem_bytes <= smem_per_block]
    if not fitting:  # smaller than every generic table: the smallest one (launches shrink configs that do not fit)
        return generic_tables()[-1]
    return fitting[0]
