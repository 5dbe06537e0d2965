"""Draft-model speculative decoding with each head on a GPU host (vLLM 0.26 bundle, CUDA graphs): issue #30, part 3.

    python benchmarks/gpu_spec_decode.py --out DIR [--model llama-h4096-untied] [--k 3]

The target is a random-weight checkpoint of benchmarks/gpu_e2e.py; the draft is the same checkpoint (a self-draft:
its proposals are the target's own greedy tokens, so the acceptance rate measures how often the draft's head and the
target's head agree, which is what a quantized head can change). Each configuration runs in its own process:
without speculation and with a ``draft_model`` draft, for vLLM's bf16 head, vLLM's fp32 head (``head_dtype``), ours
fp32, and INT8 with the draft's head left to vLLM or given ``"quantization": "int8_lm_head"`` too. Reported: fp32
bitwise equal to the oracle (sampled logprobs and tokens, with and without speculation), INT8 logprob error against
the oracle, acceptance rate (vLLM's spec-decode counters), decode tokens/s at batch 1 and 32 against bf16, and our
start-up lines (one per head). Writes DIR/spec_decode.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

HEADS = {
    "bf16": ({}, None),
    "oracle": ({"hf_overrides": {"head_dtype": "float32"}}, None),
    "fp32": ({"quantization": "bf16_last_layer_fp32"}, "bf16_last_layer_fp32"),
    "int8": ({"quantization": "int8_lm_head"}, "int8_lm_head"),
    "int8-draft-bf16": ({"quantization": "int8_lm_head"}, None),
}


def one(spec: dict) -> dict:
    """One engine: sampled logprobs of 8 greedy prompts, decode rates, spec-decode counters."""
    import gpu_e2e
    from vllm import SamplingParams

    kw = dict(spec["kw"])
    if spec["k"]:
        draft = {"method": "draft_model", "model": spec["path"], "num_speculative_tokens": spec["k"]}
        if spec["draft_quantization"]:
            draft["quantization"] = spec["draft_quantization"]
        kw["speculative_config"] = draft
    llm = gpu_e2e.engine(spec["path"], False, **kw)
    ps = gpu_e2e.prompts(8, 128)
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=1, detokenize=False)
    outs = llm.generate(ps, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    sample_lp = [step[t].logprob for o in outs for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
    rates = {}
    for batch in (1, 32):
        timed = gpu_e2e.prompts(batch, 32, seed=5)
        p = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True, detokenize=False)
        llm.generate(timed, p, use_tqdm=False)  # warm-up
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            llm.generate(timed, p, use_tqdm=False)
            runs.append(batch * 128 / (time.perf_counter() - t0))
        rates[f"batch{batch}_tok_s"] = sorted(runs)[1]
    counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if "spec_decode" in m.name}
    return {"tokens": tokens, "sample_lp": sample_lp, **rates, "spec_counters": counters}


def run(path: str, name: str, k: int) -> dict:
    kw, draft_q = HEADS[name]
    spec = json.dumps({"path": path, "kw": kw, "k": k, "draft_quantization": draft_q})
    proc = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    lines = [ln.split("[vllm_lmhead_quant]")[-1].strip() for ln in log.splitlines() if "[vllm_lmhead_quant]" in ln]
    if proc.returncode != 0 or "@@RESULT@@" not in log:
        return {"error": log[-3000:], "lines": lines}
    return {**json.loads(log.split("@@RESULT@@")[1]), "lines": lines}


def acceptance(counters: dict) -> float | None:
    drafted = counters.get("vllm:spec_decode_num_draft_tokens")
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens")
    return accepted / drafted if drafted else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--out", default="spec-decode-out")
    ap.add_argument("--model", default="llama-h4096-untied")
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()
    if args.one:
        print("@@RESULT@@" + json.dumps(one(json.loads(args.one))) + "@@RESULT@@")
        return
    import gpu_e2e

    os.makedirs(args.out, exist_ok=True)
    path = gpu_e2e.build(args.model, os.path.join(args.out, "models"))
    results = {}
    for k in (0, args.k):
        for name in HEADS:
            if k == 0 and name == "int8-draft-bf16":
                continue
            key = f"{name}/{'spec' if k else 'no-spec'}"
            results[key] = res = run(path, name, k)
            print(key, {a: b for a, b in res.items() if a not in ("tokens", "sample_lp", "error")}, flush=True)
    summary = {}
    for key, res in results.items():
        mode = key.split("/")[1]
        oracle, bf16 = results.get(f"oracle/{mode}", {}), results.get(f"bf16/{mode}", {})
        if "error" in res or "error" in oracle:
            summary[key] = {"error": (res.get("error") or oracle.get("error"))[-500:]}
            continue
        d = [a - b for a, b in zip(res["sample_lp"], oracle["sample_lp"])]
        summary[key] = {
            "bitwise_oracle": res["sample_lp"] == oracle["sample_lp"] and res["tokens"] == oracle["tokens"],
            "rms_vs_oracle": math.sqrt(sum(x * x for x in d) / max(len(d), 1)),
            "greedy_same_as_oracle": sum(a == b for a, b in zip(res["tokens"], oracle["tokens"])),
            "acceptance": acceptance(res["spec_counters"]),
            **{r: res[r] / bf16[r] for r in ("batch1_tok_s", "batch32_tok_s") if r in bf16 and "error" not in bf16},
        }
        print(key, summary[key], flush=True)
    Path(args.out, "spec_decode.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
