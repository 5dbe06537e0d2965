"""conftest's leak check itself: it sees an unmapped vLLM segment and a live child process, and ignores a segment
that a live process still maps (another run's engine on the same machine)."""

from __future__ import annotations

import mmap
import subprocess
import sys
import uuid

import pytest
from leftovers import SHM, children, left_behind, segments

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")


def test_an_unmapped_segment_is_a_leak_and_is_removed():
    before = segments()
    name = f"vllm_dist_{uuid.uuid4().hex}-tp:0-[0-1]-cpushm_0"
    (SHM / name).write_bytes(b"\0" * 4096)
    leaked, procs = left_behind(before, wait_s=0)
    assert leaked == {name} and procs == []
    assert not (SHM / name).exists()


def test_a_mapped_segment_is_in_use_not_leaked():
    before = segments()
    path = SHM / f"psm_{uuid.uuid4().hex[:8]}"
    path.write_bytes(b"\0" * 4096)
    try:
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096):
            assert left_behind(before, wait_s=0) == (set(), [])
    finally:
        path.unlink(missing_ok=True)


def test_a_live_child_is_reported():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert [p.pid for p in children()] == [child.pid]
        _, procs = left_behind(segments(), wait_s=0)
        assert procs and procs[0].startswith(f"pid {child.pid}:")
    finally:
        child.terminate()
        child.wait()
    assert children() == []
