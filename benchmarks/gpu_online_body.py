"""vLLM's online quantization for the body + our head, on a GPU host (vLLM 0.26, one H200; about 5 minutes).

    python benchmarks/gpu_online_body.py --out DIR [--schemes fp8_per_channel,fp8_per_tensor] [--skip-throughput]

``--quantization HEAD --additional-config '{"lm_head_quant": {"body": SCHEME}}'`` (vllm_lmhead_quant/body.py) against
vLLM's ``--quantization SCHEME`` alone:

1. ``accuracy`` (one process, eager engines in turn, the tiny untied Llama of gpu_checkpoints.py: hidden 256, vocab
   4096, 2 layers): for each scheme, vLLM alone, vLLM alone + its ``head_dtype=float32`` oracle, then each head with
   the body. (a) every module but the head has the method class of vLLM alone; (b) ``bf16_last_layer_fp32`` is
   bitwise equal to the oracle over the same online body (prompt + sampled logprobs and tokens); the quantized heads'
   errors against it; the head's storage and bytes. Then (a) for MoE experts on a tiny Qwen3-MoE (first scheme,
   vLLM alone vs INT8 head + body).
2. ``throughput`` (one engine per process, CUDA graphs, Qwen3-8B shape with vLLM's dummy weights, as gpu_e2e.py):
   online-FP8 body alone vs online-FP8 body + INT8 head (``--throughput-heads`` adds FP8): head bytes, KV-cache
   tokens (vLLM's log line and ``num_gpu_blocks x block_size``), decode tokens/s at batch 1 and 64 (128 new tokens,
   ignore_eos, median of 3).

The package need not be installed: this script and its subprocesses put the checkout on ``sys.path`` and call
``vllm_lmhead_quant.register()`` (TP=1, in-process engines: no worker process needs the entry point). Writes
``DIR/gpu_online_body.json`` after every engine; a failing engine is recorded and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the checkout (package not installed) and gpu_e2e.py
for _key, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_NO_USAGE_STATS": "1",
}.items():
    os.environ.setdefault(_key, _value)

HEADS = ("bf16_last_layer_fp32", "int8_lm_head", "fp8_lm_head")
THROUGHPUT_MODEL = "qwen3-8b-shape-dummy"


def body(scheme: str) -> dict:
    return {"additional_config": {"lm_head_quant": {"body": scheme}}}


def env_facts() -> dict:
    import torch
    import vllm

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "torch": torch.__version__, "vllm": vllm.__version__}


def layer0(run) -> dict:
    """Method class names of the first decoder layer's modules (a check.Run)."""
    return {k: v.rsplit(".", 1)[-1] for k, v in run.methods.items() if ".layers.0." in k}


# --- 1. accuracy: in one process, eager, tiny model ------------------------------------------------------------------
def accuracy(out_file: str, schemes: list[str]) -> None:
    from vllm_lmhead_quant import check, tiny

    report: dict = {**env_facts(), "model": "tiny llama untied, hidden 256, vocab 4096, 2 layers", "schemes": {}}

    def save():
        Path(out_file).write_text(json.dumps(report, indent=1))

    def run(label: str, entry: dict, path: Path, **kw):
        t0 = time.perf_counter()
        try:
            result = check.run_llm(path, **kw)
        except Exception as exc:  # noqa: BLE001 - recorded; the other engines still run
            entry[label] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-3000:]}
            result = None
        print(label, f"{time.perf_counter() - t0:.1f} s", "error" if result is None else "ok", flush=True)
        save()
        return result

    root = Path(tempfile.mkdtemp(prefix="lmhq-body-"))
    path = tiny.build_model("llama", root / "llama", tied=False, hidden_size=256, vocab_size=4096)
    plain = run("bf16_body_oracle", report, path, **check.ORACLE)  # vLLM's fp32 head over a bf16 body
    for scheme in schemes:
        entry = report["schemes"].setdefault(scheme, {})
        alone = run("vllm_alone", entry, path, quantization=scheme)
        oracle = run("vllm_alone_head_dtype_fp32", entry, path, quantization=scheme, **check.ORACLE)
        if alone is None:
            continue
        entry["vllm_alone"] = {"layer0": layer0(alone), "head": alone.head.get("method", "").rsplit(".", 1)[-1]}
        for head in HEADS:
            ours = run(head, entry, path, quantization=head, **body(scheme))
            if ours is None:
                continue
            names = [n for n, m in ours.methods.items() if m.startswith(check.OURS)]
            res = {
                "head_module": names,
                "head_method": ours.head.get("method", "").rsplit(".", 1)[-1],
                "head_dtype": ours.head.get("dtype"),
                "head_bytes": ours.head.get("param_bytes"),
                "logits_dtype": ours.head.get("logits_dtype"),
                "others_equal_vllm_alone": check.methods_except(ours, *names) == check.methods_except(alone, *names),
                "layer0": layer0(ours),
            }
            if oracle is not None:
                res["bitwise_oracle"] = ours.flat() == oracle.flat() and ours.tokens == oracle.tokens
                res["vs_oracle"] = check.logprob_errors(ours, oracle)
            if plain is not None:  # the body really is quantized: a bf16 body gives other logprobs
                res["differs_from_bf16_body"] = ours.flat() != plain.flat()
            entry[head] = res
            print(scheme, head, json.dumps(res), flush=True)
            save()
    # MoE experts (vLLM 0.26 hands them to the online config through our get_quant_method): dispatch only
    moe_path = tiny.build_model("qwen3_moe", root / "qwen3_moe", tied=False, hidden_size=256, vocab_size=4096)
    moe = report["moe"] = {"model": "tiny qwen3_moe untied, 4 experts top-2, hidden 256, vocab 4096, 2 layers"}
    scheme = schemes[0]
    entry = moe[scheme] = {}
    alone = run("vllm_alone", entry, moe_path, quantization=scheme)
    ours = run("int8_lm_head", entry, moe_path, quantization="int8_lm_head", **body(scheme))
    if alone is not None and ours is not None:
        names = [n for n, m in ours.methods.items() if m.startswith(check.OURS)]
        entry["vllm_alone"] = {"layer0": layer0(alone)}
        entry["int8_lm_head"] = {
            "head_module": names,
            "head_dtype": ours.head.get("dtype"),
            "others_equal_vllm_alone": check.methods_except(ours, *names) == check.methods_except(alone, *names),
            "layer0": layer0(ours),
        }
    save()


# --- 2. throughput: one engine per process, CUDA graphs, Qwen3-8B shape ---------------------------------------------
def layer0_methods(model) -> dict:
    return {n: type(m.quant_method).__name__ for n, m in model.named_modules()
            if ".layers.0." in n and getattr(m, "quant_method", None) is not None}  # fmt: skip


def throughput(path: str, kw: dict, batches=(1, 64), new_tokens: int = 128, repeats: int = 3) -> dict:
    from gpu_e2e import DUMMY_KW, close, decode_rates, engine, inspect_head

    t0 = time.perf_counter()
    llm = engine(path, False, **{**DUMMY_KW, **kw})
    res: dict = {**env_facts(), "start_s": round(time.perf_counter() - t0, 1)}
    res["head"] = llm.apply_model(inspect_head)[0]
    res["layer0"] = llm.apply_model(layer0_methods)[0]
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        res["kv_tokens_from_blocks"] = cache.num_gpu_blocks * cache.block_size
    except Exception as exc:  # noqa: BLE001 - the log line below is the other source
        res["kv_tokens_from_blocks"] = f"{type(exc).__name__}: {exc}"
    res.update(decode_rates(llm, batches, new_tokens, repeats))
    close(llm)
    return res


def isolated(spec: dict, timeout: int, env: dict | None = None) -> dict:
    """One engine in a fresh process (in-process engines keep their GPU memory, which would shrink the next KV
    cache); the KV-cache size and model memory come from vLLM's own log lines."""
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout} s", "log_tail": str(exc.stdout or "")[-3000:]}
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or "@@RESULT@@" not in log:
        return {"error": f"exit {proc.returncode}", "log_tail": log[-4000:]}
    res = json.loads(log.split("@@RESULT@@")[1])
    m = re.search(r"GPU KV cache size: ([\d,]+) tokens", log)
    res["kv_tokens"] = int(m.group(1).replace(",", "")) if m else None
    m = re.search(r"Model loading took ([\d.]+) GiB", log)
    res["model_load_gib"] = float(m.group(1)) if m else None
    res["plugin_lines"] = [ln.split("[vllm_lmhead_quant]")[-1].strip() for ln in log.splitlines()
                           if "[vllm_lmhead_quant]" in ln][:10]  # fmt: skip
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--schemes", default="fp8_per_channel,fp8_per_tensor", help="bodies of the accuracy part")
    ap.add_argument("--throughput-scheme", default="fp8_per_channel")
    ap.add_argument("--throughput-heads", default="none,int8_lm_head", help="'none': the body alone; add fp8_lm_head "
                    "for a third engine (~1.5 min more)")  # fmt: skip
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--models", default="/tmp/lmhq-models")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one engine in this process
    args = ap.parse_args()

    import vllm_lmhead_quant

    vllm_lmhead_quant.register()  # the entry point does this when the package is pip-installed
    if args.one:
        spec = json.loads(args.one)
        if spec["fn"] == "accuracy":
            accuracy(spec["out_file"], spec["schemes"])
            print("@@RESULT@@{}@@RESULT@@", flush=True)
        else:
            print("@@RESULT@@" + json.dumps(throughput(spec["path"], spec["kw"])) + "@@RESULT@@", flush=True)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "gpu_online_body.json"
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "accuracy": None, "throughput": {}}

    def save():
        out_json.write_text(json.dumps(report, indent=1))

    t_all = time.perf_counter()
    if not args.skip_accuracy:
        acc_file = args.out / "gpu_online_body_accuracy.json"
        spec = {"fn": "accuracy", "out_file": str(acc_file), "schemes": args.schemes.split(",")}
        # eager engines only: no dynamo (the sampler's lazily compiled helper would cost seconds per engine)
        done = isolated(spec, timeout=360, env={"TORCHDYNAMO_DISABLE": "1"})
        report["accuracy"] = json.loads(acc_file.read_text()) if acc_file.exists() else {}
        if "error" in done:
            report["accuracy"]["process_error"] = done
        save()
        print("accuracy:", json.dumps(report["accuracy"].get("schemes", {}))[:3000], flush=True)
    if not args.skip_throughput:
        from gpu_e2e import build

        path = build(THROUGHPUT_MODEL, args.models)  # config.json only: vLLM's dummy weights
        scheme = args.throughput_scheme
        report["throughput"]["model"] = THROUGHPUT_MODEL
        report["throughput"]["scheme"] = scheme
        for head in args.throughput_heads.split(","):
            kw = {"quantization": scheme} if head == "none" else {"quantization": head, **body(scheme)}
            key = "body_alone" if head == "none" else f"body_{head}"
            report["throughput"][key] = res = isolated({"fn": "throughput", "path": path, "kw": kw}, timeout=420)
            save()
            print(key, json.dumps({k: v for k, v in res.items() if k not in ("log_tail", "layer0")}), flush=True)
        alone = report["throughput"].get("body_alone", {})
        for key, res in report["throughput"].items():
            if key.startswith("body_") and key != "body_alone" and "layer0" in res and "layer0" in alone:
                res["layer0_equal_body_alone"] = res["layer0"] == alone["layer0"]
                if res.get("kv_tokens") and alone.get("kv_tokens"):
                    res["kv_tokens_gain"] = res["kv_tokens"] - alone["kv_tokens"]
                if res.get("batch64_tok_per_s") and alone.get("batch64_tok_per_s"):
                    res["batch64_vs_alone"] = round(res["batch64_tok_per_s"] / alone["batch64_tok_per_s"], 4)
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    save()
    print("wrote", out_json, f"({report['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
