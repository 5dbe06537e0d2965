"""Every kernel config compiles for every GPU family and fits its shared memory, checked without a GPU: Triton ships
ptxas (and the ROCm linker), so ``vllm_lmhead_quant.kernels.offline`` compiles for sm_80 ... sm_120, gfx90a and
gfx942 on this CPU machine. Triton has no CPU backend and vLLM's CPU venv must not see it, so these run in
``.venv-triton`` (torch from the main venv plus Triton 3.6; tools/bootstrap.sh makes it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_lmhead_quant.kernels import offline, tables

ROOT = Path(__file__).resolve().parents[1]
TRITON_PY = ROOT / ".venv-triton" / "bin" / "python"
if not TRITON_PY.exists():
    pytest.skip("no .venv-triton: run tools/bootstrap.sh, which creates it", allow_module_level=True)


def _offline(*args: str, **env: str):
    done = subprocess.run(
        [str(TRITON_PY), "-m", "vllm_lmhead_quant.kernels.offline", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report() -> list[dict]:
    return _offline()


@pytest.mark.parametrize("target", list(offline.TARGETS))
def test_each_target_compiles_its_table_and_fits(report, target):
    mine = [r for r in report if r["target"] == target]
    own = offline.path_for(offline.TARGETS[target]).table
    assert {r["table"] for r in mine} >= {own.source}
    plain = [r for r in mine if r["table"] == own.source and not r["group"]]
    assert len(plain) == sum(len(rows) for rows in own.rows.values())
    assert len([r for r in mine if r["table"] == own.source and r["group"] == 32]) == len(own.rows["int8"])
    for r in mine:
        assert "error" not in r, r
        assert 0 < r["smem"] <= r["budget"], f"{target} {r['table']} {r['format']} {r['config']}: {r['smem']} B"
    worst = max(r["smem"] for r in mine)
    print(f"{target}: {own.source}, largest config {worst / 1024:.0f} of {mine[0]['budget'] / 1024:.0f} KiB")


def test_the_tuned_hopper_tables_fit_sm90(report):
    tuned = {p.name for p in tables.SHIPPED.glob("NVIDIA_*.json")}
    assert {"NVIDIA_H100_80GB_HBM3.json", "NVIDIA_H200.json"} <= tuned
    compiled = {r["table"] for r in report if r["target"] == "sm_90"}
    assert tuned <= compiled


def test_the_portable_e4m3_decoder_equals_torch_on_all_256_bytes():
    """ROCm's decoder (plain Triton), run by Triton's interpreter on CPU; the PTX one runs on the GPU host
    (tests/test_kernel_cuda.py::test_every_byte_converts_like_torch)."""
    result = _offline("--decode", TRITON_INTERPRET="1")
    assert result == {"nan_match": True, "mismatches": 0, "subnormals": 16}


def test_the_venv_keeps_triton_away_from_vllm():
    """vLLM's CPU engine must not see Triton (tools/bootstrap.sh overrides it out of .venv)."""
    assert subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0


def test_group_scales_in_the_kernel_against_fp64():
    """The pointer kernel with fp16 group scales (G = 16..128, below and above BLOCK_K, a K tail, both operand
    orders), run by Triton's interpreter on CPU: equal to fp64 sums of the fp16 products ``fp16(q * scale)`` up to
    fp32 accumulation. Bitwise checks against the per-row kernel on the same fp16 weight run on the GPU host
    (tests/test_kernel_cuda.py::test_group_scales_are_bitwise_the_fp16_weight)."""
    rows = _offline("--groups", TRITON_INTERPRET="1")
    assert len(rows) == 4 and {r["group"] for r in rows} == {16, 32, 64, 128}
    for r in rows:
        assert r["rel"] < 2.0**-22, r
