"""Pipeline and data parallel on a two-GPU host (vLLM 0.26): where the head is bound, and what each rank holds.

    source benchmarks/device_env.sh     # the entry point: PP workers and DP engine cores load the plugin through it
    python benchmarks/gpu_pp_dp.py --out DIR [--parts pp,dp]

pp: the Qwen3-0.6B-shaped random checkpoint of ``gpu_e2e.py`` (vocab 151936, untied), eager, at pipeline parallel 2
for vLLM's fp32 head (``head_dtype`` oracle), ``bf16_last_layer_fp32``, ``int8_lm_head`` and ``fp8_lm_head``, plus the
oracle at PP 1: per stage, the head's module, method and bytes, every module holding one of our methods, and the
plugin's log lines; logprobs vs the oracle at PP 2 and PP 2 vs PP 1.
dp: ``vllm serve`` of a tiny checkpoint (with its tokenizer) at ``--data-parallel-size 2`` with ``int8_lm_head``: the
plugin's log lines per replica and one completion with logprobs. (vLLM 0.26 refuses offline ``LLM`` data parallel
for dense models, so the server is the way users run it.) Writes ``gpu_pp_dp.json`` into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_e2e  # noqa: E402

MODEL = "qwen3-0.6b-shape-untied"
PP_RUNS = {
    "oracle_pp2": {**gpu_e2e.ORACLE, "pipeline_parallel_size": 2},
    "fp32_pp2": {**gpu_e2e.FP32, "pipeline_parallel_size": 2},
    "int8_pp2": {**gpu_e2e.INT8, "pipeline_parallel_size": 2},
    "fp8_pp2": {**gpu_e2e.FP8, "pipeline_parallel_size": 2},
    "oracle_pp1": gpu_e2e.ORACLE,
}


def stage_facts(model) -> dict:
    """Runs on every worker: this stage's head (a PPMissingLayer off the last stage) and our methods."""
    from vllm.distributed import get_pp_group

    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    return {
        "pp_rank": get_pp_group().rank_in_group,
        "head_class": type(head).__name__,
        "head_method": type(method).__name__ if method is not None else None,
        "head_dtype": str(head.weight.dtype) if hasattr(head, "weight") else None,
        "head_bytes": sum(p.numel() * p.element_size() for p in head.parameters(recurse=False)) if head else 0,
        "ours": sorted(n for n, m in model.named_modules()
                       if type(getattr(m, "quant_method", None)).__module__.startswith("vllm_lmhead_quant")),
    }  # fmt: skip


def run_pp(path: str, kw: dict) -> dict:
    from vllm import LLM

    llm = LLM(model=path, skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.5,
              max_model_len=2048, seed=0, distributed_executor_backend="mp", **kw)  # fmt: skip
    return {**gpu_e2e.greedy_logprobs(llm), "stages": llm.apply_model(stage_facts)}


def isolated(kw: dict, path: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps({"path": path, "kw": kw})],
                          capture_output=True, text=True)  # fmt: skip
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or "@@RESULT@@" not in log:
        raise RuntimeError(f"{kw} failed:\n{log[-3000:]}")
    res = json.loads(log.split("@@RESULT@@")[1])
    res["plugin_lines"] = [ln[:220] for ln in log.splitlines() if "[vllm_lmhead_quant]" in ln]
    return res


def part_pp(root: str) -> dict:
    path = gpu_e2e.build(MODEL, root)
    runs, out = {}, {}
    for name, kw in PP_RUNS.items():
        t0 = time.time()
        try:
            runs[name] = r = isolated(kw, path)
        except RuntimeError as e:
            out[name] = {"error": str(e)[-1500:]}
            print(name, "FAILED", str(e)[-600:], flush=True)
            continue
        out[name] = {"stages": r["stages"], "plugin_lines": r["plugin_lines"], "run_s": round(time.time() - t0)}
        print(name, json.dumps(out[name])[:900], flush=True)
    for a, b in [("fp32_pp2", "oracle_pp2"), ("int8_pp2", "oracle_pp2"), ("fp8_pp2", "oracle_pp2"),
                 ("oracle_pp2", "oracle_pp1")]:  # fmt: skip
        if a in runs and b in runs:
            out[f"{a}_vs_{b}"] = gpu_e2e.compare(runs[a], runs[b])
            print(f"{a}_vs_{b}", json.dumps(out[f"{a}_vs_{b}"]), flush=True)
    return out


def part_dp(root: str, port: int = 8431) -> dict:
    from vllm_lmhead_quant.tiny import cached_model

    path = str(cached_model("qwen3", tied=False, root=root))
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", path, "--quantization", "int8_lm_head",
           "--data-parallel-size", "2", "--enforce-eager", "--max-model-len", "512", "--gpu-memory-utilization",
           "0.3", "--port", str(port), "--seed", "0"]  # fmt: skip
    log_path = os.path.join(root, "dp_serve.log")
    # The GPU host's vLLM bundle lacks `jmespath`, which vLLM 0.26's API server imports (through its SageMaker
    # routes) but never calls for completions: a stub module stands in for it (test plumbing, not the plugin).
    stub = os.path.join(root, "stub")
    os.makedirs(os.path.join(stub, "jmespath"), exist_ok=True)
    with open(os.path.join(stub, "jmespath", "__init__.py"), "w") as f:
        f.write("def search(*a, **k):\n    raise NotImplementedError\n\ndef compile(*a, **k):\n"
                "    raise NotImplementedError\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": stub + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    res: dict = {"cmd": " ".join(cmd[2:])}
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(2)
        res["ready_s"] = round(300 - (deadline - time.time()))
        body = {"model": path, "prompt": "The capital of", "max_tokens": 8, "temperature": 0, "logprobs": 2}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
            choice = reply["choices"][0]
            res["completion"] = {"text": choice["text"], "token_logprobs": choice["logprobs"]["token_logprobs"]}
        except OSError as e:
            res["completion_error"] = str(e)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    with open(log_path) as f:
        log = f.read()
    lines = [ln[:240] for ln in log.splitlines() if "[vllm_lmhead_quant]" in ln]
    res["plugin_lines"] = lines
    res["bound_lines_per_replica"] = {
        tag: sum(1 for ln in lines if tag in ln and "-> int8_lm_head" in ln)
        for tag in sorted({m.group(0) for ln in lines for m in [re.search(r"DP\d", ln)] if m})
    }
    res["log_tail"] = log[-2500:] if "completion" not in res else ""
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--parts", default="pp,dp")
    ap.add_argument("--models", default="/tmp/lmhq-models")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        import vllm_lmhead_quant

        vllm_lmhead_quant.register()
        spec = json.loads(args.one)
        print("@@RESULT@@" + json.dumps(run_pp(spec["path"], spec["kw"])) + "@@RESULT@@", flush=True)
        return 0
    import torch
    import vllm

    os.makedirs(args.out, exist_ok=True)
    report = {"gpu": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}", "torch": torch.__version__,
              "vllm": vllm.__version__}  # fmt: skip
    for part in args.parts.split(","):
        t0 = time.time()
        report[part] = {"pp": part_pp, "dp": part_dp}[part](args.models)
        report[part]["part_s"] = round(time.time() - t0)
        with open(os.path.join(args.out, "gpu_pp_dp.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report.get("dp", {}), indent=1)[:3000], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
