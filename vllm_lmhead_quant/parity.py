"""How far is each head from a trainer's fp64 head, on a real model and real text?

    python -m vllm_lmhead_quant.parity MODEL [--text FILE ...] [--heads bf16,vllm-fp32,fp32,fp8,int8]
                                       [--json OUT.json] [--png OUT.png]
    python -m vllm_lmhead_quant.parity smollm2        # the real model of real_model.py, built offline on first use

Runs MODEL in vLLM once per head (one engine at a time, in this process, eager) and teacher-forces the text through
it in chunks. Inside the worker a forward hook on vLLM's ``LogitsProcessor`` sees, for every prompt position, the
final hidden state and the logits the engine turns into logprobs. The reference is the trainer's view: an fp64 head
(the checkpoint's bf16 weight, read from the unflagged engine) on the *unflagged* engine's hidden states. Per head:

* RMS and max |Δ logprob| of the true next tokens, top-1 flip rate, KL(ref ‖ head), ΔNLL (head - ref, nats/token);
* k3 mismatch KL: ``trainer.logprob_mismatch`` on one token per position sampled from the head's distribution,
  the RL stacks' estimator of KL(head ‖ ref), next to that KL computed exactly;
* greedy continuations equal to vLLM's own fp32 head's (``hf_overrides={"head_dtype": "float32"}``);
* whether the body's hidden states equal the unflagged engine's bit for bit (they do unless a tied table is
  quantized, ``tied: quantize``, which also rounds the input embeddings: then the error includes that, and the
  "head only" RMS scores the head against the fp64 head on the engine's own hidden states).

Heads: ``bf16`` (no flag: vLLM's default), ``vllm-fp32`` (vLLM's head_dtype=float32), ``fp32``
(bf16_last_layer_fp32), ``fp8`` and ``int8`` (fp8_lm_head / int8_lm_head; a tied table is quantized, since otherwise
the head stays bf16), ``fp8-bf16`` / ``int8-bf16`` (the same with bf16 logits). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_lmhead_quant._quiet import default_log, vllm_log
from vllm_lmhead_quant.options import KEY

QUANTIZE_TIED = {"tied": "quantize"}
HEADS = {
    "bf16": {},
    "vllm-fp32": {"hf_overrides": {"head_dtype": "float32"}},
    "fp32": {"quantization": "bf16_last_layer_fp32"},
    "fp8": {"quantization": "fp8_lm_head", "additional_config": {"lm_head_quant": QUANTIZE_TIED}},
    "int8": {"quantization": "int8_lm_head", "additional_config": {"lm_head_quant": QUANTIZE_TIED}},
    "fp8-bf16": {
        "quantization": "fp8_lm_head",
        "additional_config": {"lm_head_quant": {**QUANTIZE_TIED, "logits_dtype": "model"}},
    },
    "int8-bf16": {
        "quantization": "int8_lm_head",
        "additional_config": {"lm_head_quant": {**QUANTIZE_TIED, "logits_dtype": "model"}},
    },
}
DEFAULT_HEADS = ("bf16", "vllm-fp32", "fp32", "fp8", "int8")
GREEDY_REFERENCE = "vllm-fp32"


# Where progress goes: stderr, or the terminal while main() sends vLLM's output to a log file (_quiet.vllm_log).
_STDERR = functools.partial(print, file=sys.stderr, flush=True)
_say = _STDERR


def _log(msg: str) -> None:
    _say(f"[parity] {msg}")


# ---------------------------------------------------------------------------------------------------------------
# Worker side (LLM.apply_model): a forward hook on the LogitsProcessor that scores each prompt chunk.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    tokens: list  # the prompt's token ids
    ref_hidden: object = None  # the unflagged engine's hidden states for this chunk (None: record them)


@dataclass
class _State:
    ref_weight: object = None  # [V, H] bf16, the checkpoint's head (None: take it from this engine's head)
    chunk: _Chunk | None = None
    seed: int = 0
    rows: list = field(default_factory=list)  # per chunk: dict of per-position tensors
    hidden: list = field(default_factory=list)  # per chunk: this engine's hidden states (bf16, CPU)


def _logits_processor(model):
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    found = [m for m in model.modules() if isinstance(m, LogitsProcessor)]
    if len(found) != 1:
        raise RuntimeError(f"expected one LogitsProcessor in {type(model).__name__}, found {len(found)}")
    return found[0]


def _install(state: _State, model) -> None:
    lp = _logits_processor(model)
    lp._parity_state = state
    lp.register_forward_hook(_hook, with_kwargs=True)


def _set_chunk(chunk: _Chunk, model) -> None:
    _logits_processor(model)._parity_state.chunk = chunk


def _results(model) -> tuple[list, list, object]:
    state = _logits_processor(model)._parity_state
    return state.rows, state.hidden, state.ref_weight


def _hook(lp, args, kwargs, logits) -> None:
    import torch

    state: _State = lp._parity_state
    chunk = state.chunk
    head = args[0] if args else kwargs["lm_head"]
    hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
    # Prompt logprobs of one request prefilled in one step: a call with len(prompt) - 1 rows (row i predicts token
    # i + 1). The sampling call (one row) and anything else is not ours to score.
    if chunk is None or logits is None or hidden.shape[0] != len(chunk.tokens) - 1:
        return
    vocab = lp.org_vocab_size
    if state.ref_weight is None:
        state.ref_weight = head.weight.detach()[:vocab].to("cpu", copy=True)
    state.hidden.append(hidden.detach().to("cpu", copy=True))
    ref_hidden = chunk.ref_hidden if chunk.ref_hidden is not None else state.hidden[-1]
    with torch.no_grad():
        lp_ref = _ref_logprobs(lp, ref_hidden, state.ref_weight)
        lp_head = logits.detach()[:, :vocab].to("cpu").double().log_softmax(-1)
        target = torch.tensor(chunk.tokens[1:], dtype=torch.long)[:, None]
        p_ref, p_head = lp_ref.exp(), lp_head.exp()
        gen = torch.Generator().manual_seed(state.seed + len(state.rows))
        sampled = torch.multinomial(p_head, 1, generator=gen)
        same_body = chunk.ref_hidden is None or torch.equal(chunk.ref_hidden, state.hidden[-1])
        # head-only reference: the fp64 head on this engine's own hidden states
        own = lp_ref if same_body else _ref_logprobs(lp, state.hidden[-1], state.ref_weight)
        state.rows.append(
            {
                "same_body": torch.tensor([same_body]),
                "own_ref_true": own.gather(1, target)[:, 0],
                "head_true": lp_head.gather(1, target)[:, 0],
                "ref_true": lp_ref.gather(1, target)[:, 0],
                "flip": lp_head.argmax(-1) != lp_ref.argmax(-1),
                "kl_ref_head": (p_ref * (lp_ref - lp_head)).sum(-1),
                "kl_head_ref": (p_head * (lp_head - lp_ref)).sum(-1),
                "head_sampled": lp_head.gather(1, sampled)[:, 0],
                "ref_sampled": lp_ref.gather(1, sampled)[:, 0],
            }
        )


def _ref_logprobs(lp, hidden, weight):
    """The trainer's head: fp64 logits (with the model's soft cap and scale, as vLLM's LogitsProcessor applies)."""
    import torch

    ref = hidden.double() @ weight.double().T
    if lp.soft_cap is not None:
        ref = torch.tanh(ref / lp.soft_cap) * lp.soft_cap
    return (ref * lp.scale).log_softmax(-1)


# ---------------------------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class HeadResult:
    head: str
    engine_kwargs: dict
    positions: int = 0
    rms: float = math.nan
    max_abs: float = math.nan
    rms_head_only: float = math.nan  # vs the fp64 head on this engine's own hidden states
    flip_rate: float = math.nan
    kl_ref_head: float = math.nan
    kl_head_ref: float = math.nan
    k3: float = math.nan
    d_nll: float = math.nan
    nll: float = math.nan
    greedy_equal: int = 0
    greedy_total: int = 0
    body_identical: bool | None = None
    engine_vs_hook_max: float = math.nan  # |engine's own prompt logprob - the hook's|: alignment self-check
    seconds: float = 0.0
    abs_deltas: list = field(default_factory=list, repr=False)


def head_engine_args(name: str, engine_args: dict) -> dict:
    """``LLM(...)`` kwargs of head ``name``: the user's ``--engine-args`` with the head's own on top, except that the
    user's ``lm_head_quant`` options (``group_size``, ``tied``...) are merged into the head's, not replaced by them."""
    head = HEADS[name]
    kwargs = {**engine_args, **head}
    user = engine_args.get("additional_config", {}).get(KEY, {})
    if user and "additional_config" in head:
        extra = {**engine_args.get("additional_config", {}), **head["additional_config"]}
        extra[KEY] = {**head["additional_config"].get(KEY, {}), **user}
        kwargs["additional_config"] = extra
    return kwargs


def run_head(name, model, chunks, greedy_prompts, greedy_tokens, ref, engine_args) -> tuple[HeadResult, list, list]:
    """One engine with head ``name``: scores every chunk and decodes the greedy prompts. ``ref``: (hidden states per
    chunk, weight) of the unflagged engine, or None if this is that engine."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_lmhead_quant.trainer import logprob_mismatch

    kwargs = head_engine_args(name, engine_args)
    res = HeadResult(name, kwargs)  # what the engine got, the user's --engine-args included
    t0 = time.monotonic()
    llm = LLM(model=str(model), **kwargs)
    try:
        llm.apply_model(functools.partial(_install, _State(ref_weight=ref[1] if ref else None)))
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        engine_lp = []
        for i, tokens in enumerate(chunks):
            llm.apply_model(functools.partial(_set_chunk, _Chunk(tokens, ref[0][i] if ref else None)))
            out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
            engine_lp.append([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], tokens[1:])])
            _log(f"{name}: chunk {i + 1}/{len(chunks)}")
        rows, hidden, weight = llm.apply_model(_results)[0]
        greedy = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in greedy_prompts],
            SamplingParams(max_tokens=greedy_tokens, temperature=0.0),
            use_tqdm=False,
        )
    finally:
        del llm
        gc.collect()
    if len(rows) != len(chunks):
        raise RuntimeError(f"{name}: scored {len(rows)} of {len(chunks)} chunks (was the prompt prefilled in pieces?)")
    cat = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    delta = cat["head_true"] - cat["ref_true"]
    res.positions = delta.numel()
    res.rms = delta.square().mean().sqrt().item()
    res.max_abs = delta.abs().max().item()
    res.rms_head_only = (cat["head_true"] - cat["own_ref_true"]).square().mean().sqrt().item()
    res.flip_rate = cat["flip"].double().mean().item()
    res.kl_ref_head = cat["kl_ref_head"].mean().item()
    res.kl_head_ref = cat["kl_head_ref"].mean().item()
    res.k3 = logprob_mismatch(cat["head_sampled"], cat["ref_sampled"])["k3"]
    res.nll = -cat["head_true"].mean().item()
    res.d_nll = res.nll + cat["ref_true"].mean().item()
    res.abs_deltas = delta.abs().tolist()
    hook_true = cat["head_true"]
    engine_true = torch.tensor([x for lp in engine_lp for x in lp], dtype=torch.float64)
    res.engine_vs_hook_max = (engine_true - hook_true).abs().max().item()
    if ref:
        res.body_identical = bool(cat["same_body"].all())
    res.seconds = time.monotonic() - t0
    continuations = [list(o.outputs[0].token_ids) for o in greedy]
    return res, continuations, (hidden, weight)


def run(model, texts=None, heads=DEFAULT_HEADS, *, chunk_len=512, max_chunks=8, greedy_prompts=4, greedy_tokens=32,
        engine_args=None) -> list[HeadResult]:  # fmt: skip
    """Every head in ``heads``, plus the unflagged ``bf16`` engine (always first: it provides the reference) and
    vLLM's fp32 head (the greedy reference)."""
    from transformers import AutoTokenizer

    from vllm_lmhead_quant.real_model import token_chunks

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    chunks = token_chunks(tokenizer, texts, chunk_len=chunk_len, max_chunks=max_chunks)
    if not chunks:
        raise ValueError(f"the texts give no chunk of {chunk_len} tokens")
    prompts = [c[: min(64, len(c) // 2)] for c in chunks[:greedy_prompts]]
    args = {
        "dtype": "bfloat16",
        "enforce_eager": True,
        "max_model_len": chunk_len + greedy_tokens + 8,
        "max_num_batched_tokens": max(chunk_len + greedy_tokens + 8, 2048),  # one prefill step per chunk
        "max_num_seqs": 1,  # one request at a time: the hook scores exactly one prompt per call
        "enable_prefix_caching": False,  # a cached prefix would leave prompt positions unscored
        "kv_cache_memory_bytes": 256 << 20,
        "seed": 0,
        **(engine_args or {}),
    }
    order = ["bf16"] + [h for h in heads if h != "bf16"]
    if GREEDY_REFERENCE not in order:
        order.append(GREEDY_REFERENCE)
    _log(f"{len(chunks)} chunks x {chunk_len} tokens, heads {', '.join(order)}")
    results, continuations, ref = {}, {}, None
    for name in order:
        res, cont, hidden_and_weight = run_head(name, model, chunks, prompts, greedy_tokens, ref, args)
        ref = ref or hidden_and_weight
        results[name], continuations[name] = res, cont
        _log(f"{name}: RMS {res.rms:.3g} nats, flips {100 * res.flip_rate:.2f} %, {res.seconds:.0f} s")
    for res in results.values():
        res.greedy_total = len(prompts)
        res.greedy_equal = sum(a == b for a, b in zip(continuations[res.head], continuations[GREEDY_REFERENCE]))
    return [results[h] for h in order]


def to_markdown(results: list[HeadResult]) -> str:
    lines = [
        (
            "| head | RMS Δlogprob | max Δlogprob | top-1 flips | KL(ref‖head) | KL(head‖ref) | k3 | ΔNLL "
            "| greedy = vLLM fp32 | body bitwise | RMS, head only |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        body = "ref" if r.body_identical is None else ("yes" if r.body_identical else "no (tied table quantized)")
        lines.append(
            f"| {r.head} | {r.rms:.4f} | {r.max_abs:.3f} | {100 * r.flip_rate:.2f} % | {r.kl_ref_head:.2e} "
            f"| {r.kl_head_ref:.2e} | {r.k3:.2e} | {r.d_nll:+.4f} | {r.greedy_equal}/{r.greedy_total} | {body} "
            f"| {r.rms_head_only:.4f} |"
        )
    return "\n".join(lines) + "\n"


def to_json(results: list[HeadResult]) -> str:
    """One line per head; per-token deltas to 4 significant digits (what the plot needs)."""
    rows = [{**r.__dict__, "abs_deltas": [float(f"{d:.4g}") for d in r.abs_deltas]} for r in results]
    return "[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n"


def plot(results: list[HeadResult], path: Path, title: str) -> None:
    """Per head, the distribution of per-token |Δ logprob| (a complementary CDF on log axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        d = np.sort(np.asarray(r.abs_deltas))
        if not d.size or d.max() == 0:
            ax.plot([], [], label=f"{r.head}: all 0 (bitwise the reference's logprobs)")
            continue
        frac = 1.0 - np.arange(d.size) / d.size
        ax.step(np.maximum(d, 1e-9), frac, where="post", label=f"{r.head} (RMS {r.rms:.3g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-7, 10)
    ax.set_xlabel("|Δ logprob| of the true token vs the fp64 head (nats)")
    ax.set_ylabel("fraction of tokens ≥ x")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model directory, or 'smollm2' for the offline real model")
    parser.add_argument("--text", action="append", type=Path, help="text file(s) to score (default: license texts)")
    parser.add_argument("--heads", default=",".join(DEFAULT_HEADS), help=f"comma list of {', '.join(HEADS)}")
    parser.add_argument("--chunk-len", type=int, default=512)
    parser.add_argument("--max-chunks", type=int, default=8)
    parser.add_argument("--greedy-prompts", type=int, default=4)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--engine-args", default="{}", help="extra LLM(...) kwargs as JSON")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--png", type=Path, help="write the |Δ logprob| distributions here")
    parser.add_argument("--vllm-log", default=str(default_log("parity")), help="vLLM's own output ('-': the terminal)")
    args = parser.parse_args(argv)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = sorted(set(heads) - set(HEADS))
    if unknown:
        parser.error(f"unknown head(s) {unknown}; choose from {', '.join(HEADS)}")
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1"}.items():
        os.environ.setdefault(key, value)  # in-process engines: the hook's results come back without pickling
    global _say
    log = None if args.vllm_log == "-" else args.vllm_log
    with vllm_log(log) as term:
        _say = term.say
        if log:
            _log(f"vLLM's own output: {log}")
        import vllm_lmhead_quant

        vllm_lmhead_quant.register()
        model = args.model
        if model == "smollm2":
            from vllm_lmhead_quant.real_model import smollm2

            _log("building/using the SmolLM2-135M-Instruct checkpoint")
            model = smollm2()
        try:
            results = run(
                model, args.text, heads, chunk_len=args.chunk_len, max_chunks=args.max_chunks,
                greedy_prompts=args.greedy_prompts, greedy_tokens=args.greedy_tokens,
                engine_args=json.loads(args.engine_args),
            )  # fmt: skip
        finally:
            _say = _STDERR
    texts = ", ".join(p.name for p in args.text) if args.text else "the default texts (license files, real English)"
    print(f"\n{Path(str(model)).name}: {results[0].positions} positions ({args.chunk_len}-token chunks of {texts}),")
    print("each head against a trainer's head: fp64 logits from the checkpoint's bf16 weight on the unflagged")
    print("engine's hidden states.\n")
    print(to_markdown(results))
    print(EXPLAIN.format(greedy=f"{args.greedy_prompts} prompts x {args.greedy_tokens} tokens"))
    if args.json:
        args.json.write_text(to_json(results))
    if args.png:
        plot(results, args.png, f"{Path(str(model)).name}: {results[0].positions} positions")
    return 0


EXPLAIN = """\
RMS / max Δlogprob: of the true next token, head - reference (nats). top-1 flips: positions whose most likely token
differs from the reference's. KL(ref‖head), KL(head‖ref): exact, averaged over positions; k3: the estimate RL stacks
compute from one sampled token per position. ΔNLL: mean negative log-likelihood, head - reference (nats per token; +:
worse perplexity). greedy = vLLM fp32: continuations ({greedy}) equal to vLLM's own fp32 head's.
body bitwise: the hidden states equal the unflagged engine's; "no" where a tied table was quantized (the input
embeddings change too): "RMS, head only" then scores the head on the engine's own hidden states."""


if __name__ == "__main__":
    sys.exit(main())
