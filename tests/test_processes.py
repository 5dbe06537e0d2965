"""The entry point at work in every vLLM process: a multi-process engine and ``vllm serve`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import PROMPTS, logprob_errors, run_llm

pytestmark = pytest.mark.engine


def test_multiprocess_engine_registers_in_the_worker(tiny, monkeypatch):
    """Engine core and worker are separate spawned processes here; only the entry point can register us there."""
    path = tiny("llama", tied=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    # The oracle runs multi-process too. max_num_seqs=1: a multi-process engine core batches requests as they
    # arrive, so batch composition (and the body's GEMM blocking, in the last ulp) would vary from run to run.
    oracle = run_llm(path, max_num_seqs=1, hf_overrides={"head_dtype": "float32"})
    ours = run_llm(path, max_num_seqs=1, quantization="bf16_last_layer_fp32")
    assert ours.methods["lm_head"] == "vllm_lmhead_quant.methods.fp32_head.FP32HeadMethod"
    assert ours.head["logits_dtype"] == "torch.float32"
    assert ours.flat() == oracle.flat()


def test_default_compile_mode(tiny, monkeypatch):
    """vLLM's default mode (torch.compile of the body; compute_logits runs outside the compiled graph), in fresh
    worker processes where dynamo is enabled: our head binds and returns fp32 logits that agree with the oracle.
    Not asserted bitwise here: two separately compiled CPU bodies differed by 1 ulp in one logprob in CI (the
    body, not the head: eager runs are bitwise equal everywhere, and compiled runs were on the H100)."""
    path = tiny("llama", tied=True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    oracle = run_llm(path, enforce_eager=False, hf_overrides={"head_dtype": "float32"})
    ours = run_llm(path, enforce_eager=False, quantization="bf16_last_layer_fp32")
    assert ours.methods["lm_head"] == "vllm_lmhead_quant.methods.fp32_head.FP32HeadMethod"
    assert ours.head["logits_dtype"] == "torch.float32"
    err = logprob_errors(ours, oracle)
    assert err["max"] < 1e-4 and err["n"] > 100, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _serve_once(path, log_path, method: str, *extra: str) -> tuple[dict, str]:
    """``vllm serve`` (the real CLI and its default multi-process layout), one completion with top-5 logprobs, the
    server's log."""
    port = _free_port()
    vllm_cli = Path(sys.executable).with_name("vllm")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # the real default
    log = open(log_path, "w")  # noqa: SIM115
    cmd = [str(vllm_cli), "serve", str(path), "--quantization", method, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager",
           "--kv-cache-memory-bytes", str(64 << 20), "--served-model-name", "tiny", *extra]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server not healthy in 240 s"
            time.sleep(1)
        out = _post(
            f"http://127.0.0.1:{port}/v1/completions",
            {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "logprobs": 5},
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    logprobs = out["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == 4
    assert all(len(top) == 5 for top in logprobs["top_logprobs"])
    assert all(lp <= 0 and lp == lp for lp in logprobs["token_logprobs"])
    return out, log_path.read_text()


# fp8_lm_head shares int8_lm_head's method class; it is served in-process by the other engine tests.
@pytest.mark.parametrize("method", ["bf16_last_layer_fp32", "int8_lm_head"])
def test_vllm_serve_answers_with_logprobs(tiny, tmp_path, method):
    _, text = _serve_once(tiny("llama", tied=False), tmp_path / "serve.log", method)
    assert f"-> {method}" in text  # our one INFO line, from the server's worker process
    if method != "bf16_last_layer_fp32":  # never silent about a path slower than bf16: here the CPU's chunked one
        assert text.count("on CPU the head converts 4096-row chunks") == 1


def test_data_parallel_replicas_each_bind_the_head(tiny, tmp_path, monkeypatch):
    """``--data-parallel-size 2`` (the RL rollout fleet's layout): two engine cores, each with its own worker, load
    the plugin through the entry point and bind the head, one INFO line per replica, and the server answers."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per replica (vLLM binds per NUMA node)
    path = tiny("llama", tied=False)
    _, text = _serve_once(path, tmp_path / "serve.log", "int8_lm_head", "--data-parallel-size", "2")
    bound = [line for line in text.splitlines() if "-> int8_lm_head" in line]
    pids = {line.split("pid=")[1].split(")")[0] for line in bound}
    assert len(bound) == 2 and len(pids) == 2, bound  # one line per replica, from two processes
    assert "EngineCore_DP0" in text and "EngineCore_DP1" in text
