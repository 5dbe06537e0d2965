"""Every example runs as the README says (after ``bash tools/bootstrap.sh``) and ends with a line that explains its
numbers; none force-kills a process or leaves shared memory behind (conftest's ``no_leftovers`` checks /dev/shm and
child processes after this module).

Each runs in the environment a user has: without conftest's settings for the suite's engines (in-process engines, a
long worker shutdown timeout), so the offline example and serve.sh run vLLM's default multi-process layout. Kept
short: the tiny model, a few tokens, two weight updates.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]
USER_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "VIRTUAL_ENV")
}
# What an unclean exit prints: vLLM killing its engine processes, Python finding their shared memory orphaned.
UNCLEAN = ("force killing", "leaked shared_memory")
VLLM_LOG = re.compile(r"\(\S+ pid=\d+\) (DEBUG|INFO|WARNING|ERROR) ")


def run(*cmd: str, env: dict | None = None) -> list[str]:
    """The example's own stdout lines (vLLM logs to stdout too: those go); fails on a non-zero exit or an unclean
    shutdown, showing its output."""
    proc = subprocess.run(cmd, cwd=ROOT, env={**USER_ENV, **(env or {})}, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert not [u for u in UNCLEAN if u in out], out[-4000:]
    return [line for line in proc.stdout.strip().splitlines() if not VLLM_LOG.match(line)]


def test_offline_fp32_logprobs_with_any_python():
    """``python examples/offline_fp32_logprobs.py`` with a Python that has no vLLM: it restarts itself with .venv."""
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter .venv was made from
    lines = run(base, "examples/offline_fp32_logprobs.py")
    assert lines[0].split() == ["token", "id", "text", "logprob", "(fp32)"]
    assert len(lines) == 1 + 8 + 1, lines
    assert lines[-1].startswith("Each logprob is log softmax of fp32 logits"), lines[-1]


def test_rl_weight_sync():
    lines = run(sys.executable, "examples/rl_weight_sync.py", "--steps", "2")
    assert "  logprobs bitwise equal to a fresh engine on the final weights: True" in lines, lines
    assert lines[-1].startswith("Each update reached the head in place"), lines[-1]


def test_trainer_twin_names_the_body():
    lines = run(sys.executable, "examples/trainer_twin.py", "--tokens", "8")
    assert lines[-1].startswith("is the body, not the head: vLLM's and transformers' kernels"), lines[-1]


def test_serve_sh(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    lines = run("bash", "examples/serve.sh", env={"PORT": str(port), "LOG": str(log)})
    server = log.read_text()
    assert "[shutdown] API server: shutdown triggered" in server, server[-3000:]
    assert not [u for u in UNCLEAN if u in server], server[-3000:]  # the server stopped its engine cleanly
    assert any(line.startswith("ready after") for line in lines), lines
    assert any("-> int8_lm_head" in line for line in lines), lines  # the binding line, from the server's log
    table = lines.index(next(line for line in lines if line.startswith("token ")))
    assert len(lines) - table == 1 + 8 + 2, lines  # header, 8 tokens, the two lines of explanation
