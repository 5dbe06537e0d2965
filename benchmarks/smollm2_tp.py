"""The real model (SmolLM2-135M-Instruct, rebuilt from PyPI's GGUF) at tensor parallel 3 on the CPU engine (its 9
attention heads rule out 2): does sharding the head change any head's accuracy? Teacher-forced prompt logprobs (top-5)
of 4 x 200 tokens of real text, each head against vLLM's ``head_dtype=float32`` oracle at the same TP size; the
quantized heads quantize the tied table (``tied: quantize``: SmolLM2 is tied, and ``keep`` would leave it bf16).
Prints one JSON line after ``@@`` (docs/results/smollm2_tp.json).

    .venv/bin/python benchmarks/smollm2_tp.py      # about three minutes on 2 cores
"""

from __future__ import annotations

import json
import time

from smollm2_online_body import smollm2_and_prompts  # this directory is on sys.path when run as a script

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "VLLM_NO_USAGE_STATS": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1",
       "VLLM_CPU_OMP_THREADS_BIND": "0|1|0"}  # fmt: skip  (TP 3 on 2 cores; vLLM's auto binding needs NUMA)
QUANTIZE_TIED = {"additional_config": {"lm_head_quant": {"tied": "quantize"}}}
RUNS = {
    "oracle": {"hf_overrides": {"head_dtype": "float32"}},
    "bf16_last_layer_fp32": {"quantization": "bf16_last_layer_fp32"},
    "int8_lm_head": {"quantization": "int8_lm_head", **QUANTIZE_TIED},
    "fp8_lm_head": {"quantization": "fp8_lm_head", **QUANTIZE_TIED},
}
TP = 3  # SmolLM2-135M has 9 attention heads (3 KV heads): TP 2 is refused by vLLM, TP 3 is the smallest that divides
QUANTIZED = ("int8_lm_head", "fp8_lm_head")


def main() -> None:
    path, prompts = smollm2_and_prompts(ENV)
    from vllm_lmhead_quant.check import logprob_errors, run_llm

    t0 = time.time()
    # max_num_seqs=1 at both sizes: a multi-process engine core batches requests as they arrive; one at a time keeps
    # the body's numerics independent of that timing.
    runs = {(name, tp): run_llm(path, prompts=prompts, tensor_parallel_size=tp, max_num_seqs=1, **kw)
            for tp in (1, TP) for name, kw in RUNS.items()}  # fmt: skip
    res = {"n": len(runs["oracle", 1].flat())}
    for tp in (1, TP):
        oracle, fp32 = runs["oracle", tp], runs["bf16_last_layer_fp32", tp]
        res[f"tp{tp}"] = {
            "fp32_bitwise_oracle": fp32.flat() == oracle.flat() and fp32.tokens == oracle.tokens,
            **{name: logprob_errors(runs[name, tp], oracle, prompt_only=True) for name in QUANTIZED},
            "head_bytes_rank0": {name: runs[name, tp].head.get("param_bytes") for name in RUNS},
        }
    res[f"oracle_tp{TP}_vs_tp1"] = logprob_errors(runs["oracle", TP], runs["oracle", 1], prompt_only=True)
    res["seconds"] = round(time.time() - t0)
    print("@@" + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
