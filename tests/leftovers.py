"""What a test module may not leave behind: vLLM's shared-memory segments in /dev/shm and child processes.

Checked around every module by conftest's autouse fixture. The multi-process tests (test_processes.py,
test_pipeline_parallel.py, the TP 2 tests of test_model_matrix.py and test_padded_vocab.py, test_examples.py) are the
ones that can leak: each tensor- or pipeline-parallel engine maps one 4 MiB ``vllm_dist_*-cpushm_<rank>`` segment
per rank, which its worker unlinks only while its interpreter exits normally. A worker killed during that exit (vLLM
sends SIGTERM when a worker takes longer than ``VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS``; the exit alone takes 5-8 s
on 2 busy cores) leaves its segment for good: 34 of them after one suite run with a 1 s timeout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SHM = Path("/dev/shm")
# Named by vLLM (CPU all-reduce, message queues) and by Python's multiprocessing.shared_memory (psm_*).
PREFIXES = ("vllm_dist_", "psm_")
# The segments our settings decide (VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS): a leak of these fails the module. vLLM's
# psm_* message queues are unlinked in ``__del__``, which a ``vllm serve --data-parallel-size 2`` shutdown skips now
# and then (one CI run in ~10) whatever the tests do: those are removed and reported as a warning.
OURS = ("vllm_dist_",)


def segments() -> set[str]:
    try:
        return {p.name for p in SHM.iterdir() if p.name.startswith(PREFIXES)}
    except OSError:  # no /dev/shm (not Linux)
        return set()


def mapped_anywhere(names: set[str]) -> set[str]:
    """The segments some live process still maps: in use (another test run on this machine), not leaked."""
    used = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process exited meanwhile, or is not ours to read
            continue
        used |= {n for n in names if f"/dev/shm/{n}" in text}
    return used


def children() -> list:
    """Our live child processes, except multiprocessing's resource tracker (one per interpreter, by design)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def left_behind(before: set[str], wait_s: float = 15.0) -> tuple[set[str], list[str]]:
    """New unmapped segments and live children after a module, once they had ``wait_s`` to go away (engines
    shut down asynchronously). Leaked segments are removed, so that the next module starts clean."""
    deadline = time.monotonic() + wait_s
    while True:
        leaked = segments() - before
        leaked -= mapped_anywhere(leaked)
        procs = children()
        if (not leaked and not procs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name in leaked:
        with_name = SHM / name
        if with_name.exists():
            os.unlink(with_name)
    return leaked, [f"pid {p.pid}: {' '.join(p.cmdline())[:120]}" for p in procs]
