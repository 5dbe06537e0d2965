"""Shared helpers for engine tests: run a tiny model through a real ``vllm.LLM`` and collect what we assert on."""

from __future__ import annotations

import functools
import gc
import math
from dataclasses import dataclass

PROMPTS = ["def main():\n    return", "import os\nimport sys\n", "class Cache:\n    def get(self, key"]
ENGINE_ARGS = dict(dtype="bfloat16", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20, seed=0)


@dataclass
class Run:
    tokens: list  # generated token ids per prompt
    sample: list  # per prompt, per step: {token_id: logprob}
    prompt: list  # per prompt, per position (from 1): {token_id: logprob}
    methods: dict  # module name -> quant method class name (worker side)
    head: dict  # facts about the head module (worker side)

    def flat(self) -> list[float]:
        """Every logprob of the prompt tokens and the sampled tokens, in a fixed order."""
        out = []
        for per_prompt in self.prompt + self.sample:
            for step in per_prompt:
                out.extend(v for _, v in sorted(step.items()))
        return out


def inspect_model(model) -> tuple[dict, dict]:
    """Runs inside the worker (via LLM.apply_model): method class per module, and the head's storage."""
    import torch

    methods, head = {}, {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            methods[name] = type(method).__module__ + "." + type(method).__qualname__
    lm_head = getattr(model, "lm_head", None)
    modules = dict(model.named_modules(remove_duplicate=False))
    embed = modules.get("model.embed_tokens")
    if lm_head is not None and hasattr(lm_head, "weight"):
        w = lm_head.weight
        scale = getattr(lm_head, "weight_scale", None)
        head = {
            "class": type(lm_head).__name__,
            "dtype": str(w.dtype),
            "shape": tuple(w.shape),
            "param_bytes": sum(p.numel() * p.element_size() for p in lm_head.parameters(recurse=False)),
            "scale_shape": tuple(scale.shape) if scale is not None else None,
            "scale_dtype": str(scale.dtype) if scale is not None else None,
            "is_embed_module": lm_head is embed,
            "shares_embed_weight": embed is not None and getattr(embed, "weight", None) is w,
            "embed_dtype": str(embed.weight.dtype) if embed is not None else None,
            "org_vocab_size": getattr(lm_head, "org_vocab_size", None),
            "cpu_linear": hasattr(lm_head, "cpu_linear"),
        }
        # What the sampler receives: logits for two hidden states through vLLM's own compute_logits.
        hidden = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0)).to(embed.weight.device)
        act_dtype = next(
            p.dtype for n, p in model.named_parameters() if n.endswith("norm.weight") and p.dtype.is_floating_point
        )
        head["logits_dtype"] = str(model.compute_logits(hidden.to(act_dtype)).dtype)
    return methods, head


def run_llm(path, prompts=PROMPTS, max_tokens=8, **kwargs) -> Run:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), **{**ENGINE_ARGS, **kwargs})
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=5, prompt_logprobs=5)
        outs = llm.generate(prompts, params, use_tqdm=False)
        methods, head = llm.apply_model(inspect_model)[0]
    finally:
        del llm
        gc.collect()
    tokens, sample, prompt = [], [], []
    for o in outs:
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        sample.append([{t: lp.logprob for t, lp in step.items()} for step in c.logprobs])
        prompt.append([{t: lp.logprob for t, lp in step.items()} for step in o.prompt_logprobs[1:]])
    return Run(tokens, sample, prompt, methods, head)


@functools.cache
def cached_run(path, **frozen_kwargs) -> Run:
    """Memoized run_llm for baselines shared by several tests (kwargs must be hashable)."""
    return run_llm(path, **{k: dict(v) if isinstance(v, tuple) else v for k, v in frozen_kwargs.items()})


def logprob_errors(run: Run, ref: Run) -> dict:
    """RMS and max |Δ logprob| over the reference's sampled and prompt tokens, and greedy agreement."""
    deltas = []
    for per_r, per_ref in zip(run.prompt + run.sample, ref.prompt + ref.sample):
        for step_r, step_ref in zip(per_r, per_ref):
            for tok, lp in step_ref.items():
                if tok in step_r:
                    deltas.append(step_r[tok] - lp)
    rms = math.sqrt(sum(d * d for d in deltas) / len(deltas))
    agree = sum(a == b for a, b in zip(run.tokens, ref.tokens)) / len(ref.tokens)
    return {"rms": rms, "max": max(abs(d) for d in deltas), "n": len(deltas), "greedy_agree": agree}


def methods_except(run: Run, *names: str) -> dict:
    return {k: v for k, v in run.methods.items() if k not in names}
