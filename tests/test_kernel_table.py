"""Kernel paths and config tables (pure Python: runs without CUDA or Triton). Expectations come from the documented
rules (tables.py, device.py), written out here, not from calls to the same helpers."""

from __future__ import annotations

import json

import pytest

from vllm_lmhead_quant.kernels import device, tables
from vllm_lmhead_quant.kernels import weight_only as wo
from vllm_lmhead_quant.kernels.tables import NO_LIMIT, KernelConfig

KIB = 1024
# (name, capability, opt-in shared memory per block, SMs, hip) as the devices report them
GPUS = {
    "V100": ("Tesla V100-SXM2-32GB", (7, 0), 96 * KIB, 80, False),
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0), 163 * KIB, 108, False),
    "A10": ("NVIDIA A10", (8, 6), 99 * KIB, 72, False),
    "L40S": ("NVIDIA L40S", (8, 9), 99 * KIB, 142, False),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), 227 * KIB, 132, False),
    "H200": ("NVIDIA H200", (9, 0), 227 * KIB, 132, False),
    "B200": ("NVIDIA B200", (10, 0), 227 * KIB, 148, False),
    "RTX 5090": ("NVIDIA GeForce RTX 5090", (12, 0), 99 * KIB, 170, False),
    "MI300X": ("AMD Instinct MI300X", (9, 4), 64 * KIB, 304, True),
}
# gpu -> (family, table file, e4m3 by hardware convert, TMA, inline PTX)
EXPECTED = {
    "A100": ("ampere", "generic_smem_163k.json", False, False, True),
    "A10": ("ampere", "generic_smem_99k.json", False, False, True),
    "L40S": ("ada", "generic_smem_99k.json", True, False, True),
    "H100": ("hopper", "NVIDIA_H100_80GB_HBM3.json", True, True, True),
    "H200": ("hopper", "NVIDIA_H200.json", True, True, True),
    "B200": ("blackwell", "generic_smem_227k.json", True, True, True),
    "RTX 5090": ("blackwell-consumer", "generic_smem_99k.json", True, True, True),
    "MI300X": ("rocm", "generic_smem_64k.json", False, False, False),
}


def _path(gpu: str) -> device.KernelPath | None:
    return device.path_for(device.DeviceFacts(*GPUS[gpu]))


@pytest.mark.parametrize("gpu", list(EXPECTED))
def test_each_family_gets_its_path_and_table(gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(tables, "USER", tmp_path)  # no user-tuned tables on this machine
    path = _path(gpu)
    family, table, fp8_convert, tma, ptx = EXPECTED[gpu]
    assert (path.family, path.table.source, path.fp8_convert, path.tma, path.ptx) == EXPECTED[gpu]
    assert path.min_tiles == 2 * GPUS[gpu][3]
    if path.table.smem_bytes is not None:  # a generic table never needs more shared memory than the device has
        assert path.table.smem_bytes <= GPUS[gpu][2]
    assert table in path.describe()


def test_no_path_before_sm80():
    assert _path("V100") is None


def test_a_users_tuned_table_wins(monkeypatch, tmp_path):
    monkeypatch.setattr(tables, "USER", tmp_path)
    rows = {"fp8": ((NO_LIMIT, KernelConfig(16, 32, 64, 4, 2)),), "int8": ((NO_LIMIT, KernelConfig(16, 32, 64, 4, 3)),)}
    tables.dump(tables.Table("", rows), tmp_path / "NVIDIA_H200.json", device="NVIDIA H200")
    assert _path("H200").table.source == "NVIDIA_H200.json"
    assert wo.pick_config(5, 4096, 1024, path=_path("H200")) == KernelConfig(16, 32, 64, 4, 2)


@pytest.mark.parametrize("name", sorted(p.name for p in tables.SHIPPED.glob("*.json")))
def test_shipped_tables_are_well_formed(name):
    data = json.loads((tables.SHIPPED / name).read_text())
    assert data["measured_on"] and data["device"]  # every table says where its numbers come from
    for fmt in ("fp8", "int8"):
        bounds = [row["max_m"] for row in data[fmt]]
        assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])
        for row in data[fmt]:
            for block in ("block_m", "block_n", "block_k"):
                assert row[block] & (row[block] - 1) == 0  # powers of two (tl.arange)
            assert row["block_m"] >= 16 and row["block_k"] >= 16  # tl.dot minimum
    assert tables.load(tables.SHIPPED / name).source == name


H100_FP8 = [  # NVIDIA_H100_80GB_HBM3.json, fp8, written out: (max M, block_m)
    (16, 16), (32, 32), (64, 64), (128, 128), (NO_LIMIT, 256),
]  # fmt: skip


@pytest.mark.parametrize("m", [1, 16, 17, 32, 33, 64, 65, 128, 129, 2048, 100_000])
def test_pick_config_takes_the_first_row_whose_max_m_holds_m(m):
    path = _path("H100")
    expected_block_m = next(bm for max_m, bm in H100_FP8 if m <= max_m)
    got = wo.pick_config(m, 151936, 4096, path=path)
    assert got.block_m == expected_block_m
    assert wo.pick_config(m, 151936, 4096, path=path) is got  # memoized: asked every decode step


def test_int8_rows_avoid_the_miscompiled_tile():
    """Triton 3.6 gives wrong INT8 results with the 256 x 128 x 128, 3-stage tile (docs/bench/head_gemm.md)."""
    for path in tables.SHIPPED.glob("*.json"):
        for _, cfg in tables.load(path).rows["int8"]:
            assert (cfg.block_m, cfg.num_stages) != (256, 3), path.name


def test_small_vocab_shards_get_narrower_vocab_tiles():
    path = _path("H100")
    wide = wo.pick_config(1, 151936, 4096, path=path)
    narrow = wo.pick_config(1, 151936 // 32, 4096, path=path)  # a TP-32-sized shard: too few tiles for 132 SMs
    assert narrow.block_n < wide.block_n and narrow.block_n >= 32
    assert -(-151936 // 32 // narrow.block_n) >= 264 or narrow.block_n == 32


def test_fp16_math_only_where_its_extra_launch_pays():
    """fp16 math adds a pre-pass launch: kept for hidden >= 2048 or M > 128, dropped for small heads."""
    path = _path("H100")  # its M <= 16 and M > 128 rows ask for fp16 math
    assert wo.pick_config(1, 151936, 4096, path=path).fp16_math
    assert not wo.pick_config(1, 151936, 1024, path=path).fp16_math
    assert wo.pick_config(2048, 151936, 1024, path=path).fp16_math


def test_shrinking_drops_stages_first_then_tiles():
    cfg = KernelConfig(256, 256, 128, 8, 4, tma=True)
    seen = []
    while cfg is not None:
        seen.append(cfg)
        cfg = wo._shrink(cfg)
    assert [c.num_stages for c in seen[:3]] == [4, 3, 2]
    assert seen[3] == KernelConfig(256, 256, 64, 8, 2, tma=True)  # then K, N, M tiles
    assert seen[-1] == KernelConfig(16, 32, 32, 8, 2, tma=True)  # the smallest legal tile ends it
