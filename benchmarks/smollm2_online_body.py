"""The real model (SmolLM2-135M-Instruct, rebuilt from PyPI's GGUF) with vLLM's online ``fp8_per_channel`` body, on
the CPU engine: our heads against vLLM's ``head_dtype=float32`` oracle over the same FP8 body (teacher-forced prompt
logprobs, top-5, of 4 x 200 tokens of real text), plus vLLM's bf16 head over that body and the bf16 body's oracle for
scale. Prints one JSON line after ``@@`` (docs/results/smollm2_online_body.json).

    .venv/bin/python benchmarks/smollm2_online_body.py      # about a minute on 2 cores
"""

from __future__ import annotations

import json
import os
import time

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "VLLM_NO_USAGE_STATS": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1"}  # fmt: skip
SCHEME = "fp8_per_channel"


def body(**extra) -> dict:
    return {"additional_config": {"lm_head_quant": {"body": SCHEME, **extra}}}


def smollm2_and_prompts(env: dict) -> tuple[str, list[str]]:
    """The in-process engine settings, the plugin registered, SmolLM2 built, and 4 x 200 tokens of real text (shared
    with smollm2_tp.py)."""
    for key, value in env.items():
        os.environ.setdefault(key, value)
    import vllm_lmhead_quant
    from vllm_lmhead_quant.real_model import smollm2, text_prompts

    vllm_lmhead_quant.register()
    path = str(smollm2())
    return path, text_prompts(path)


def main() -> None:
    path, prompts = smollm2_and_prompts(ENV)
    from vllm_lmhead_quant.check import logprob_errors, run_llm

    t0 = time.time()
    oracle = run_llm(path, prompts=prompts, quantization=SCHEME, hf_overrides={"head_dtype": "float32"})
    runs = {
        "bf16_head": run_llm(path, prompts=prompts, quantization=SCHEME),
        "bf16_last_layer_fp32": run_llm(path, prompts=prompts, quantization="bf16_last_layer_fp32", **body()),
        "int8_lm_head": run_llm(path, prompts=prompts, quantization="int8_lm_head", **body(tied="quantize")),
        "fp8_lm_head": run_llm(path, prompts=prompts, quantization="fp8_lm_head", **body(tied="quantize")),
        "bf16_body_oracle": run_llm(path, prompts=prompts, hf_overrides={"head_dtype": "float32"}),
    }
    fp32 = runs["bf16_last_layer_fp32"]
    res = {
        "fp32_bitwise_oracle": fp32.flat() == oracle.flat() and fp32.tokens == oracle.tokens,
        "n": len(oracle.flat()),
        **{name: logprob_errors(r, oracle, prompt_only=True) for name, r in runs.items() if r is not fp32},
        "head_bytes": {name: r.head.get("param_bytes") for name, r in [("oracle", oracle), *runs.items()]},
        "body_layer0": {k: v.rsplit(".", 1)[-1] for k, v in runs["int8_lm_head"].methods.items() if ".layers.0." in k},
        "seconds": round(time.time() - t0),
    }
    print("@@" + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
