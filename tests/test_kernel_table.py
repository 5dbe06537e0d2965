"""The weight-only kernel's config selection (pure Python: runs without CUDA or Triton)."""

from __future__ import annotations

import pytest

from vllm_lmhead_quant.kernels import weight_only as wo
from vllm_lmhead_quant.kernels.weight_only import KernelConfig, pick_config


def test_the_table_is_ordered_and_covers_every_m():
    bounds = [max_m for max_m, _ in wo._CONFIG_TABLE]
    assert bounds == sorted(bounds) and bounds[-1] >= 1 << 62
    for _, cfg in wo._CONFIG_TABLE:
        for block in (cfg.block_m, cfg.block_n, cfg.block_k):
            assert block & (block - 1) == 0, cfg  # powers of two (tl.arange)
        assert cfg.block_m >= 16 and cfg.block_k >= 16  # tl.dot minimum


@pytest.mark.parametrize("m", [1, 16, 17, 32, 33, 64, 65, 128, 129, 2048, 100_000])
def test_pick_config_follows_the_table(m):
    expected = next(c for max_m, c in wo._CONFIG_TABLE if m <= max_m)
    got = pick_config(m, 151936, 4096)
    assert got._replace(block_n=expected.block_n) == expected
    assert pick_config(m, 151936, 4096) is got  # memoized: called every decode step


def test_small_vocab_shards_get_narrower_vocab_tiles():
    wide = pick_config(1, 151936, 4096)
    narrow = pick_config(1, 151936 // 32, 4096)  # a small shard: too few tiles to fill the GPU
    assert narrow.block_n < wide.block_n and narrow.block_n >= 32
    tiles = -(-151936 // 32 // narrow.block_n)
    assert tiles >= wo._MIN_TILES or narrow.block_n == 32


def test_fp16_math_only_where_its_extra_launch_pays():
    """fp16 math adds a pre-pass launch: kept for large hidden sizes or large M, dropped for small heads."""
    fp16_rows = [(max_m, c) for max_m, c in wo._CONFIG_TABLE if c.fp16_math]
    assert fp16_rows, "the tuned table uses fp16 math from some M on"
    m = max(33, min(max_m for max_m, _ in fp16_rows))
    assert pick_config(m, 151936, 4096).fp16_math
    assert not pick_config(m, 151936, 1024).fp16_math  # host-bound at hidden 1024
    assert pick_config(2048, 151936, 1024).fp16_math  # compute-bound: the conversion dominates
    assert not pick_config(1, 151936, 1024).fp16_math  # decode of a small head: one launch
    assert pick_config(1, 151936, 4096).fp16_math  # decode, hidden >= 2048: the pre-pass is hidden, 1-3% faster


def test_swapping_the_table_resets_the_memo(monkeypatch):
    before = pick_config(7, 4096, 1024)
    table = ((1 << 62, KernelConfig(16, 32, 64, 4, 2)),)
    monkeypatch.setattr(wo, "_CONFIG_TABLE", table)
    assert pick_config(7, 4096, 1024) == KernelConfig(16, 32, 64, 4, 2)
    monkeypatch.undo()
    assert pick_config(7, 4096, 1024) == before
