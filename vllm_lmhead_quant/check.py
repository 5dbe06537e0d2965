"""Does a model really use our head methods? A check for users' CI, and the engine of our model matrix.

    python -m vllm_lmhead_quant.check MODEL_DIR [--method int8_lm_head ...] [--engine-args JSON] [--body SCHEME]

Loads MODEL_DIR with vLLM without the flag, with vLLM's own fp32 head (``hf_overrides={"head_dtype": "float32"}``,
the oracle) and with each method, then checks inside the worker that the head got our method and every other module
the class it gets without the flag; that ``bf16_last_layer_fp32`` logprobs are bitwise equal to the oracle (eager);
and reports the quantized heads' logprob errors against the oracle. Exit status 0 only if every check passes. Models
whose head vLLM never hands to the quantization config fail with the architecture's name. With an online-quantized
body (``--body SCHEME``, or ``"body"`` in the engine arguments' ``lm_head_quant`` options) the baseline is vLLM's
``--quantization SCHEME`` and the oracle its fp32 head over that same body.

Engines run eagerly, one after another, in this process (vLLM settings for this tool only). vLLM's own output goes
to a log file (its path is printed; ``--vllm-log -`` keeps it on the terminal); the results and our warnings do not.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

from vllm_lmhead_quant._quiet import default_log, vllm_log
from vllm_lmhead_quant.options import KEY

PROMPTS = ["def main():\n    return", "import os\nimport sys\n", "class Cache:\n    def get(self, key"]
# An explicit KV-cache size: engines start without the memory profile, on CPU (where vLLM needs it) and on GPUs,
# where in-process engines that ran before have not returned all their memory.
ENGINE_ARGS = dict(dtype="bfloat16", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20, seed=0)
ORACLE = {"hf_overrides": {"head_dtype": "float32"}}
OURS = "vllm_lmhead_quant."
METHODS = ("bf16_last_layer_fp32", "fp8_lm_head", "int8_lm_head")
# Quantized-head bounds (RMS, max nats vs the fp32 oracle) for a PASS: e4m3 weight rounding on peaked random heads
# reaches ~0.15 RMS (docs/gpu-e2e.md), INT8 about a third of that; a broken quantizer is off by whole nats. The max
# is the same for both: once a greedy path leaves the oracle's, its sampled steps score other contexts.
BOUNDS = {"fp8_lm_head": (0.25, 1.5), "int8_lm_head": (0.1, 1.5)}


@dataclass
class Run:
    tokens: list  # generated token ids per prompt
    sample: list  # per prompt, per step: {token_id: logprob}
    prompt: list  # per prompt, per position (from 1): {token_id: logprob}
    methods: dict  # module name -> quant method class (worker side)
    head: dict  # facts about the head module (worker side)

    @classmethod
    def from_outputs(cls, outs, methods: dict, head: dict) -> Run:
        """A Run from ``LLM.generate`` outputs made with ``logprobs`` and ``prompt_logprobs``."""
        tokens, sample, prompt = [], [], []
        for o in outs:
            c = o.outputs[0]
            tokens.append(list(c.token_ids))
            sample.append([{t: lp.logprob for t, lp in step.items()} for step in c.logprobs])
            prompt.append([{t: lp.logprob for t, lp in step.items()} for step in o.prompt_logprobs[1:]])
        return cls(tokens, sample, prompt, methods, head)

    def flat(self) -> list[float]:
        """Every logprob of the prompt tokens and the sampled tokens, in a fixed order."""
        out = []
        for per_prompt in self.prompt + self.sample:
            for step in per_prompt:
                out.extend(v for _, v in sorted(step.items()))
        return out


def find_head(model):
    """``(head, input_embedding)`` of a vLLM model, found by type because names differ (``lm_head``, ``output``,
    ``output_layer``; ``embed_tokens``, ``wte``, ``word_embeddings``).

    The head is the vocab-parallel module holding one of our methods (our configs hand them to the head only, which
    is the input embedding in models that compute logits from it); without our flag, the model's
    ``ParallelLMHead``; without one, the input embedding. The input embedding is a ``VocabParallelEmbedding`` that
    is not a ``ParallelLMHead`` (a subclass): the head itself or the one sharing its weight, else the first.
    Either is None when the model has no such module.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    vocab = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
    heads = [m for m in vocab if isinstance(m, ParallelLMHead)]
    embeds = [m for m in vocab if not isinstance(m, ParallelLMHead)]
    ours = [m for m in heads + embeds if type(m.quant_method).__module__.startswith(OURS)]
    head = (ours or heads or embeds or [None])[0]
    weight = getattr(head, "weight", None)
    embed = next((m for m in embeds if m is head or m.weight is weight), embeds[0] if embeds else None)
    return head, embed


def inspect_model(model) -> tuple[dict, dict]:
    """Runs inside the worker (LLM.apply_model): method class per module, and the head's storage."""
    import torch

    methods, head = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        method = getattr(module, "quant_method", None)
        if method is not None:
            methods[name] = type(method).__module__ + "." + type(method).__qualname__
    lm_head, embed = find_head(model)
    if lm_head is not None:
        w = getattr(lm_head, "weight", None)
        if not isinstance(w, torch.Tensor):  # a checkpoint's quantized head (GPTQ qweight, CPU W8A8 repacked)
            w = max(lm_head.parameters(recurse=False), key=torch.Tensor.numel)
        scale = getattr(lm_head, "weight_scale", None)
        head = {
            "class": type(lm_head).__name__,
            "method": type(lm_head.quant_method).__module__ + "." + type(lm_head.quant_method).__qualname__,
            "dtype": str(w.dtype),
            "shape": (lm_head.num_embeddings_per_partition, lm_head.embedding_dim),
            "param_bytes": sum(p.numel() * p.element_size() for p in lm_head.parameters(recurse=False)),
            "scale_shape": tuple(scale.shape) if scale is not None else None,
            "scale_dtype": str(scale.dtype) if scale is not None else None,
            "is_embed_module": lm_head is embed,
            "shares_embed_weight": embed is not None and embed.weight is w,
            "embed_dtype": str(embed.weight.dtype) if embed is not None else None,
            "cpu_linear": hasattr(lm_head, "cpu_linear"),
        }
        # What the sampler receives: logits for two hidden states through the model's own compute_logits. The
        # hidden states have the dtype vLLM built the embeddings with (params_dtype), also once a table is quantized.
        act_dtype = (embed if embed is not None else lm_head).params_dtype
        hidden = torch.randn(2, lm_head.embedding_dim, generator=torch.Generator().manual_seed(0))
        hidden = hidden.to(w.device, act_dtype)
        head["logits_dtype"] = str(model.compute_logits(hidden).dtype)
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
    return Run.from_outputs(outs, methods, head)


def logprob_errors(run: Run, ref: Run, *, prompt_only: bool = False) -> dict:
    """RMS and max |Δ logprob| over the reference's top logprobs (prompt and sampled), and greedy agreement.

    ``prompt_only``: teacher-forced prompt positions only. Once two greedy runs diverge, their sampled steps score
    different contexts, so the sampled part measures divergence rather than the head's arithmetic."""
    deltas = []
    pairs = zip(run.prompt, ref.prompt) if prompt_only else zip(run.prompt + run.sample, ref.prompt + ref.sample)
    for per_r, per_ref in pairs:
        for step_r, step_ref in zip(per_r, per_ref):
            deltas.extend(step_r[tok] - lp for tok, lp in step_ref.items() if tok in step_r)
    rms = math.sqrt(sum(d * d for d in deltas) / len(deltas))
    agree = sum(a == b for a, b in zip(run.tokens, ref.tokens)) / len(ref.tokens)
    return {"rms": rms, "max": max(abs(d) for d in deltas), "n": len(deltas), "greedy_agree": agree}


def methods_except(run: Run, *names: str) -> dict:
    return {k: v for k, v in run.methods.items() if k not in names}


@dataclass
class MethodResult:
    method: str
    ok: bool
    head_method: str = ""
    head_dtype: str = ""
    head_bytes: int = 0
    others_unchanged: bool = False
    bitwise_oracle: bool | None = None
    errors: dict = field(default_factory=dict)  # every top-5 logprob, prompt positions and generated steps
    prompt_errors: dict = field(default_factory=dict)  # teacher-forced prompt positions only: the head's arithmetic
    diverged: list = field(default_factory=list)  # per prompt: first generated step unlike the oracle's, or None
    error: str = ""
    note: str = ""  # what the reference was, where it is not vLLM's fp32 oracle


def baseline_kwargs(engine_kwargs: dict) -> dict:
    """The engine arguments of the runs ours are compared with: ours without our options, and with an online
    ``body`` scheme, vLLM's own ``--quantization SCHEME`` (which gives every layer but the head what ``body`` gives
    it). Without this, an FP8 body would be compared with a bf16 one and could never be bitwise."""
    kw = dict(engine_kwargs)
    extra = dict(kw.pop("additional_config", None) or {})
    options = extra.pop(KEY, None)
    if extra:
        kw["additional_config"] = extra
    if isinstance(options, dict) and options.get("body"):
        kw["quantization"] = options["body"]
    return kw


def check_model(path, methods=METHODS, runner=run_llm, **engine_kwargs) -> list:
    """One MethodResult per method. ``runner`` lets tests share memoized baseline runs."""
    baseline = baseline_kwargs(engine_kwargs)
    base = runner(path, **baseline)
    # A head the checkpoint stores quantized: vLLM refuses its head_dtype oracle there, so the reference is the
    # checkpoint's own head (checkpoint.py says what each flag does with such a head).
    quantized_head = not base.head.get("method", "").endswith(("UnquantizedEmbeddingMethod", "UnquantizedLinearMethod"))
    oracle = base if quantized_head else runner(path, **{**ORACLE, **baseline})
    results = []
    for method in methods:
        try:
            ours = runner(path, quantization=method, **engine_kwargs)
        except Exception as exc:  # noqa: BLE001 - reported, and the check fails
            results.append(MethodResult(method, ok=False, error=f"{type(exc).__name__}: {exc}"))
            continue
        if quantized_head:
            results.append(_over_quantized_head(method, ours, base))
            continue
        res = _measure(method, ours, base, oracle, [n for n, m in ours.methods.items() if m.startswith(OURS)])
        bound = res.head_method.startswith(OURS)
        if method == "bf16_last_layer_fp32":
            res.bitwise_oracle = ours.flat() == oracle.flat() and ours.tokens == oracle.tokens
            res.ok = bound and res.others_unchanged and res.bitwise_oracle
        else:
            rms_bound, max_bound = BOUNDS[method]
            within = res.errors["rms"] < rms_bound and res.errors["max"] < max_bound
            res.ok = bound and res.others_unchanged and within
        results.append(res)
    return results


def _measure(method: str, ours: Run, base: Run, ref: Run, head_names: list) -> MethodResult:
    """What every check reports: where the head's method went, whether the other modules kept theirs, and the
    logprob errors against ``ref`` (ok is decided by the caller)."""
    return MethodResult(
        method,
        ok=False,
        head_method=ours.head.get("method", ""),
        head_dtype=ours.head.get("dtype", ""),
        head_bytes=ours.head.get("param_bytes", 0),
        others_unchanged=methods_except(ours, *head_names) == methods_except(base, *head_names),
        errors=logprob_errors(ours, ref),
        prompt_errors=logprob_errors(ours, ref, prompt_only=True),
        diverged=[next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), None)
                  for r, o in zip(ours.tokens, ref.tokens)],  # fmt: skip
    )


def _over_quantized_head(method: str, ours: Run, base: Run) -> MethodResult:
    """The checkpoint's head is quantized: bf16_last_layer_fp32 must read it for fp32 logits (within INT8's bounds of
    the checkpoint's own bf16 logits, which may also quantize activations); the quantized heads must keep it as is."""
    res = _measure(method, ours, base, base, [n for n, m in ours.methods.items() if m != base.methods.get(n)])
    res.note = (
        f"the checkpoint stores the head quantized ({base.head.get('method', '?').rsplit('.', 1)[-1]}): "
        "compared with its own head, not vLLM's fp32 oracle (refused on quantized heads)"
    )
    if method == "bf16_last_layer_fp32":
        rms_bound, max_bound = BOUNDS["int8_lm_head"]
        res.ok = (
            res.head_method.startswith(OURS)
            and ours.head.get("logits_dtype") == "torch.float32"
            and res.others_unchanged
            and res.errors["rms"] < rms_bound
            and res.errors["max"] < max_bound
        )
    else:  # kept: the same engine as without the flag
        res.ok = ours.methods == base.methods and ours.flat() == base.flat()
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that vllm_lmhead_quant's methods bind a model's LM head.")
    parser.add_argument("model", help="model directory (or a name vLLM can load)")
    parser.add_argument("--method", action="append", choices=METHODS)
    parser.add_argument("--engine-args", default="{}", help='extra LLM(...) kwargs as JSON, e.g. {"dtype": "float16"}')
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--body", help="an online quantization scheme for the body, e.g. fp8_per_channel")
    parser.add_argument("--vllm-log", default=str(default_log("check")), help="vLLM's own output ('-': the terminal)")
    args = parser.parse_args(argv)
    engine_args = json.loads(args.engine_args)
    if args.body:
        extra = engine_args.setdefault("additional_config", {})
        extra.setdefault(KEY, {})["body"] = args.body
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1"}.items():
        os.environ.setdefault(key, value)
    methods = tuple(args.method or METHODS)
    print(f"check {args.model}: does each method bind the LM head, keep every other layer's method, and match vLLM's")
    print("own fp32 head? One engine at a time, eager: the model without our flag, the oracle (hf_overrides=")
    print(f'{{"head_dtype": "float32"}}), then {", ".join(methods)}; {len(PROMPTS)} prompts, 8 greedy tokens, the')
    print("top-5 logprobs at every prompt position and generated step.", flush=True)
    log = None if args.vllm_log == "-" else args.vllm_log
    with vllm_log(log) as term:
        term.say(f"running {2 + len(methods)} engines, one after another (10-30 s each for a tiny model on 2 CPU cores)"
                 + (f"; vLLM's own output: {log}" if log else ""))  # fmt: skip
        import vllm_lmhead_quant

        vllm_lmhead_quant.register()
        results = check_model(args.model, methods, **engine_args)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    print()
    for r in results:
        print(describe(r))
    print(EXPLAIN)
    return 0 if all(r.ok for r in results) else 1


EXPLAIN = """\
The numbers: |logprob - oracle's| over the oracle's top-5 tokens. At prompt positions both engines read the same text,
so that RMS is the head's rounding alone. Generated steps follow each engine's own greedy text: after a different token
they score other contexts, so the RMS with them is larger (on a random tiny model, where near-ties flip, often 2x).
The demo (python -m vllm_lmhead_quant.demo) reports only the chosen token of generated steps before any divergence,
on 2 of these prompts: its RMS is close to the prompt-position one here, not to the one with the generated steps."""


def describe(r: MethodResult) -> str:
    """A few lines per method: verdict, where the head's method went, and the error numbers with what they cover."""
    if r.error:
        return f"FAIL {r.method}: {r.error}"
    dtype = r.head_dtype.removeprefix("torch.")
    head = f"head: {r.head_method.rsplit('.', 1)[-1]}, {dtype}, {r.head_bytes / 2**20:.2f} MiB"
    others = "every other layer as without the flag" if r.others_unchanged else "OTHER LAYERS CHANGED"
    lines = [f"{'PASS' if r.ok else 'FAIL'} {r.method:<21} {head}; {others}"]
    if r.note:
        lines.append(f"     {'':<21} {r.note}")
    if r.bitwise_oracle is not None:
        lines.append(f"     {'':<21} bitwise equal to the oracle: {'yes' if r.bitwise_oracle else 'NO'}")
        return "\n".join(lines)
    pe, e = r.prompt_errors or r.errors, r.errors
    if not e:
        return "\n".join(lines)
    # The PASS bound of check_model, where it is one of BOUNDS (not over a checkpoint's own quantized head: note).
    bound = "" if r.note or r.method not in BOUNDS else " (PASS needs RMS < {}, max < {})".format(*BOUNDS[r.method])
    lines.append(f"     prompt positions:    RMS {pe['rms']:.1e}, max {pe['max']:.1e} nats over {pe['n']} logprobs")
    lines.append(f"     with generated steps: RMS {e['rms']:.1e}, max {e['max']:.1e} nats over {e['n']}{bound}")
    flips = [f"prompt {p + 1} at step {i + 1}" for p, i in enumerate(r.diverged) if i is not None]
    if flips:
        lines.append(f"     greedy text left the oracle's in {', '.join(flips)}: expected where the oracle's top two")
        lines.append("     are closer than the head's rounding")
    elif r.diverged:
        lines.append("     greedy text: the oracle's, token for token")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
