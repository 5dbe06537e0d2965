"""The main job on a built-in tiny model: the same prompts through five LM heads, logprobs side by side.

    python -m vllm_lmhead_quant.demo [--arch llama] [--tied]

No download and no GPU: the tiny checkpoint and its tokenizer are built offline (vllm_lmhead_quant.tiny). Runs
vLLM's bf16 head, ``--quantization bf16_last_layer_fp32``, vLLM's own ``hf_overrides={"head_dtype": "float32"}``
(the oracle), ``--quantization int8_lm_head`` and ``--quantization fp8_lm_head``, then prints per-token logprobs
and error summaries against the oracle (``python -m vllm_lmhead_quant.parity smollm2`` does this on a real model).
Exit status 1 if bf16_last_layer_fp32 is not bitwise equal to the oracle.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys

# In-process eager engines start in ~3 s instead of ~20 s (vLLM settings for this demo only).
for _k, _v in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_k, _v)

PROMPTS = ["def main():\n    return", "import os\nimport sys\n"]
VARIANTS = {
    "bf16 head (vLLM default)": {},
    "bf16_last_layer_fp32": {"quantization": "bf16_last_layer_fp32"},
    'oracle: head_dtype="float32"': {"hf_overrides": {"head_dtype": "float32"}},
    "int8_lm_head": {"quantization": "int8_lm_head"},
    "fp8_lm_head": {"quantization": "fp8_lm_head"},
}


def _run(path: str, **kwargs):
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=64 << 20, seed=0, **kwargs)  # fmt: skip
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, logprobs=1), use_tqdm=False)
        tok = llm.get_tokenizer()
    finally:
        del llm
        gc.collect()
    rows = []
    for o in outs:
        c = o.outputs[0]
        rows.append([(tok.decode([t]), step[t].logprob) for t, step in zip(c.token_ids, c.logprobs)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", help="tiny architecture (see vllm_lmhead_quant.tiny.ARCHS)")
    parser.add_argument("--tied", action="store_true", help="tie the head to the input embeddings")
    args = parser.parse_args(argv)

    from vllm_lmhead_quant.tiny import cached_model

    path = str(cached_model(args.arch, tied=args.tied))
    print(f"tiny {args.arch} ({'tied' if args.tied else 'untied'}) at {path}\n", flush=True)
    results = {name: _run(path, **kw) for name, kw in VARIANTS.items()}

    names = list(results)
    for p, prompt in enumerate(PROMPTS):
        print(f"prompt {p}: {prompt!r}")
        print("  " + "".join(f"{n[:26]:>28}" for n in names))
        for i in range(len(results[names[0]][p])):
            cells = [f"{results[n][p][i][0]!r:>10} {results[n][p][i][1]:>+.8f}" for n in names]
            print("  " + "".join(f"{c:>28}" for c in cells))
        print()

    oracle = results[names[2]]

    def errors(name):
        d = [a[1] - b[1] for pa, pb in zip(results[name], oracle) for a, b in zip(pa, pb) if a[0] == b[0]]
        return math.sqrt(sum(x * x for x in d) / len(d)), max(abs(x) for x in d)

    exact = results["bf16_last_layer_fp32"] == oracle
    print(f"bf16_last_layer_fp32 bitwise equal to the head_dtype oracle: {exact}")
    for name in (names[0], "int8_lm_head", "fp8_lm_head"):
        rms, mx = errors(name)
        print(f"{name:>28} vs oracle: RMS {rms:.2e} nats, max {mx:.2e} nats (same-token steps)")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
