"""The main job on a built-in tiny model: the same prompts through five LM heads, logprobs side by side.

    python -m vllm_lmhead_quant.demo [--arch llama] [--tied] [--vllm-log PATH | --vllm-log -]

No download and no GPU: the tiny checkpoint and its tokenizer are built offline (vllm_lmhead_quant.tiny), with
random weights. Runs vLLM's bf16 head, ``--quantization bf16_last_layer_fp32``, vLLM's own
``hf_overrides={"head_dtype": "float32"}`` (the oracle), ``--quantization int8_lm_head`` and ``fp8_lm_head``, then
prints per-token logprobs and what they mean (``python -m vllm_lmhead_quant.parity smollm2`` does this on a real
model). vLLM's own output goes to a log file (its path is printed). Exit status 1 if bf16_last_layer_fp32 is not
bitwise equal to the oracle.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass

# In-process eager engines start in ~3 s instead of ~20 s (vLLM settings for this demo only).
for _k, _v in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_k, _v)

PROMPTS = ["def main():\n    return", "import os\nimport sys\n"]
MAX_TOKENS = 6
ORACLE = "oracle"
# name -> (column header, LLM kwargs). The oracle is vLLM's own fp32 head, the reference for every number.
VARIANTS = {
    "vLLM bf16 head": ("vLLM bf16", {}),
    "bf16_last_layer_fp32": ("fp32 (ours)", {"quantization": "bf16_last_layer_fp32"}),
    ORACLE: ("oracle fp32", {"hf_overrides": {"head_dtype": "float32"}}),
    "int8_lm_head": ("int8 (ours)", {"quantization": "int8_lm_head"}),
    "fp8_lm_head": ("fp8 (ours)", {"quantization": "fp8_lm_head"}),
}
MEANING = {
    "vLLM bf16 head": "logits rounded to bf16",
    "int8_lm_head": "INT8 weights, an fp32 scale per row",
    "fp8_lm_head": "FP8 e4m3 weights: ~3x INT8's error, same bytes",
}


@dataclass
class Step:
    token: int
    text: str
    logprob: float
    top: dict  # token id -> logprob of the step's top-2 (and the chosen token)


def _run(path: str, **kwargs) -> list[list[Step]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=64 << 20, seed=0, **kwargs)  # fmt: skip
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=2)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        tok = llm.get_tokenizer()
    finally:  # in-process engine: freed here, before the next one starts
        del llm
        gc.collect()
    return [
        [
            Step(t, tok.decode([t]), step[t].logprob, {k: v.logprob for k, v in step.items()})
            for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)
        ]
        for o in outs
    ]


def _first_flip(run: list[Step], oracle: list[Step]) -> int | None:
    """Index of the first step where the head chose another token than the oracle (None: never)."""
    return next((i for i, (a, b) in enumerate(zip(run, oracle)) if a.token != b.token), None)


def _model_line(path: str, arch: str, tied: bool) -> str:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return (
        f"Model: a built-in tiny {arch} ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab "
        f"{cfg['vocab_size']}, {'tied' if tied else 'untied'} head) with RANDOM weights,\n"
        f"       built offline at {path}"
    )


def print_tables(results: dict) -> None:
    oracle = results[ORACLE]
    names = list(VARIANTS)
    for p, prompt in enumerate(PROMPTS):
        print(f"prompt {p + 1} of {len(PROMPTS)}: {prompt!r}; per head, the logprob (nats) of the token it chose")
        print(f"  {'step':>4}  {'token':<12}" + "".join(f"{VARIANTS[n][0]:>13}" for n in names))
        notes = []
        for i, ref in enumerate(oracle[p]):
            cells = []
            for n in names:
                step = results[n][p][i]
                flip = _first_flip(results[n][p], oracle[p])
                mark = "*" if flip is not None and i >= flip else " "
                cells.append(f"{step.logprob:>12.6f}{mark}")
                if flip == i:
                    runner_up = sorted(ref.top.values(), reverse=True)[:2]
                    gap = runner_up[0] - runner_up[1] if len(runner_up) == 2 else math.nan
                    notes.append(
                        f"  * {n} chose {step.text!r} at step {i + 1}, the oracle {ref.text!r}: the oracle's top two "
                        f"were {gap:.3f} nats apart.\n    From there on it continues its own text."
                    )
            print(f"  {i + 1:>4}  {ref.text!r:<12.12}" + "".join(cells))
        for note in notes:
            print(note)
        print()


def print_summary(results: dict) -> bool:
    """The numbers against the oracle; returns whether bf16_last_layer_fp32 is bitwise equal to it."""
    oracle = results[ORACLE]
    ours = results["bf16_last_layer_fp32"]
    exact = [(s.token, s.logprob) for r in ours for s in r] == [(s.token, s.logprob) for r in oracle for s in r]
    n = sum(len(r) for r in oracle)
    print('Against the oracle, vLLM\'s own fp32 head (hf_overrides={"head_dtype": "float32"}), in nats:')
    verdict = f"bitwise equal, all {n} logprobs" if exact else "NOT bitwise equal (a bug: please report it)"
    print(f"  {'bf16_last_layer_fp32':<21} {verdict:<34} fp32 logits, as a trainer's fp32 head")
    for name in ("vLLM bf16 head", "int8_lm_head", "fp8_lm_head"):
        deltas = []
        for run, ref in zip(results[name], oracle):
            flip = _first_flip(run, ref)
            deltas += [a.logprob - b.logprob for a, b in zip(run[:flip], ref[:flip])]
        rms = math.sqrt(sum(d * d for d in deltas) / len(deltas)) if deltas else math.nan
        big = max((abs(d) for d in deltas), default=math.nan)
        print(f"  {name:<21} RMS {rms:.1e}  max {big:.1e}  {len(deltas):>2} steps  {MEANING[name]}")
    flips = [n for n in VARIANTS if any(_first_flip(r, o) is not None for r, o in zip(results[n], oracle))]
    print("RMS, max: of |logprob - oracle's| of the chosen token, on the steps before a head's first other token")
    print("(after it, the two texts differ).")
    if flips:
        print(f"* {', '.join(flips)} chose another token: expected where the oracle's top two are closer than the")
        print("  head's rounding, as often on this random model's nearly flat distributions.")
    print("Gibberish tokens: the weights are random. A real model on real text: python -m vllm_lmhead_quant.parity")
    print("smollm2 (after bash tools/bootstrap.sh --tests). Your model: python -m vllm_lmhead_quant.check MODEL_DIR")
    return exact


def main(argv: list[str] | None = None) -> int:
    from vllm_lmhead_quant._quiet import default_log, vllm_log

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", help="tiny architecture (see vllm_lmhead_quant.tiny.ARCHS)")
    parser.add_argument("--tied", action="store_true", help="tie the head to the input embeddings")
    parser.add_argument("--vllm-log", default=str(default_log("demo")), help="vLLM's own output ('-': the terminal)")
    args = parser.parse_args(argv)

    from vllm_lmhead_quant.tiny import cached_model

    with contextlib.redirect_stderr(io.StringIO()):  # on first use it is built: transformers' progress bar
        path = str(cached_model(args.arch, tied=args.tied))
    print(f"Demo: the same {len(PROMPTS)} prompts through 5 LM heads in vLLM (eager), {MAX_TOKENS} greedy tokens each.")
    print(_model_line(path, args.arch, args.tied), flush=True)
    log = None if args.vllm_log == "-" else args.vllm_log
    results = {}
    with vllm_log(log) as term:
        if log:
            term.say(f"vLLM's own output: {log}")
        for i, (name, (_, kwargs)) in enumerate(VARIANTS.items()):
            t0 = time.monotonic()
            results[name] = _run(path, **kwargs)
            term.say(f"  [{i + 1}/{len(VARIANTS)}] {name}: {time.monotonic() - t0:.0f} s")
    print()
    print_tables(results)
    return 0 if print_summary(results) else 1


if __name__ == "__main__":
    sys.exit(main())
