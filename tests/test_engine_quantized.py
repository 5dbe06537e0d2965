"""fp8_lm_head and int8_lm_head on a real vLLM engine: one-byte storage in the worker, bytes, accuracy against the
fp32 oracle, the logits dtype, tied heads."""

from __future__ import annotations

import pytest
from helpers import ORACLE, cached_run, logprob_errors, methods_except, run_llm

pytestmark = pytest.mark.engine


METHOD = "vllm_lmhead_quant.methods.quantized_head.QuantizedHeadMethod"
TIED_BF16 = "vllm_lmhead_quant.methods.bf16_head.TiedBF16HeadMethod"
QUANTIZE_TIED = {"additional_config": {"lm_head_quant": {"tied": "quantize"}}}
STORAGE = {"fp8_lm_head": "torch.float8_e4m3fn", "int8_lm_head": "torch.int8"}
# Bounds on |Δ logprob| (nats) against the fp32-head oracle, over prompt and sampled top-5 logprobs, measured on these
# tiny models (docs/model-matrix.md): FP8 weight rounding gives RMS ~0.06 nats (e4m3 keeps 3 mantissa bits), INT8
# ~0.02, the bf16 head alone ~3e-3. The exact maths of both formats is pinned against fp64 in test_ops.py.
BOUNDS = {"fp8_lm_head": (0.12, 1.0), "int8_lm_head": (0.05, 0.4)}
QUANTIZED = pytest.mark.parametrize("method", sorted(STORAGE))


@QUANTIZED
def test_untied_head_is_quantized_and_accurate(tiny, record_property, method):
    path = tiny("llama", tied=False)
    base = cached_run(path)
    oracle = cached_run(path, **ORACLE)
    ours = run_llm(path, quantization=method)

    assert ours.methods["lm_head"] == METHOD
    assert methods_except(ours, "lm_head") == methods_except(base, "lm_head")
    assert ours.head["dtype"] == STORAGE[method]
    assert ours.head["embed_dtype"] == "torch.bfloat16"  # input embeddings untouched
    v, h = ours.head["shape"]
    assert ours.head["scale_shape"] == (v,) and ours.head["scale_dtype"] == "torch.float32"
    assert ours.head["param_bytes"] == v * h + 4 * v  # was 2 * v * h in bf16
    assert base.head["param_bytes"] == 2 * v * h
    assert ours.head["logits_dtype"] == "torch.float32"  # the default (docs/accuracy.md)

    err = logprob_errors(ours, oracle)
    err_bf16 = logprob_errors(base, oracle)
    record_property(f"{method}_vs_oracle", err)
    record_property("bf16_vs_oracle", err_bf16)
    rms_bound, max_bound = BOUNDS[method]
    assert err["rms"] < rms_bound and err["max"] < max_bound, err
    # A quantized head is an approximation, and the test can see it: on the teacher-forced prompt positions (same
    # contexts in every run) its error exceeds the fp32-logit head's zero. Not over sampled steps: a greedy path that
    # leaves the oracle's scores other contexts.
    assert logprob_errors(ours, oracle, prompt_only=True)["rms"] > 1e-3
    assert err["greedy_agree"] >= 2 / 3, err


def test_int8_is_closer_to_the_oracle_than_fp8(tiny):
    """The reason int8_lm_head exists, end to end on the same engine and prompts (prompt positions only)."""
    path = tiny("llama", tied=False)
    oracle = cached_run(path, **ORACLE)
    errors = {m: logprob_errors(cached_run(path, quantization=m), oracle, prompt_only=True)["rms"] for m in STORAGE}
    assert errors["int8_lm_head"] < 0.6 * errors["fp8_lm_head"], errors


@QUANTIZED
def test_model_dtype_logits_option(tiny, method):
    path = tiny("llama", tied=False)
    oracle = cached_run(path, **ORACLE)
    fp32_out = cached_run(path, quantization=method)
    bf16_out = run_llm(path, quantization=method, additional_config={"lm_head_quant": {"logits_dtype": "model"}})
    assert bf16_out.head["logits_dtype"] == "torch.bfloat16"
    assert bf16_out.head["dtype"] == STORAGE[method]
    assert fp32_out.flat() != bf16_out.flat()
    assert logprob_errors(bf16_out, oracle)["rms"] < BOUNDS[method][0]
    explicit = run_llm(path, quantization=method, additional_config={"lm_head_quant": {"logits_dtype": "float32"}})
    assert explicit.flat() == fp32_out.flat()  # "auto" is float32


@QUANTIZED
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tied_head_stays_bf16_by_default(tiny, caplog, arch, method):
    path = tiny(arch, tied=True)
    base = cached_run(path)
    with caplog.at_level("WARNING", logger="vllm.lmhead_quant"):
        ours = run_llm(path, quantization=method)
    assert ours.methods["lm_head"] == TIED_BF16
    assert ours.head["dtype"] == "torch.bfloat16" and ours.head["shares_embed_weight"]
    assert ours.flat() == base.flat()  # bf16 head, exactly as without the flag
    assert any('"tied": "quantize"' in r.getMessage() and method in r.getMessage() for r in caplog.records)


@QUANTIZED
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tied_quantize_opt_in_shares_one_table(tiny, arch, method):
    path = tiny(arch, tied=True)
    base = cached_run(path)
    oracle = cached_run(path, **ORACLE)
    ours = run_llm(path, quantization=method, **QUANTIZE_TIED)
    # One quantized table, used for lookups and logits; the head module stays (vLLM's tie, bias slot included).
    assert ours.head["shares_embed_weight"] and ours.methods["lm_head"] == METHOD
    assert ours.head["dtype"] == STORAGE[method] and ours.head["embed_dtype"] == STORAGE[method]
    v, h = ours.head["shape"]
    assert ours.head["param_bytes"] == v * h + 4 * v
    assert ours.methods["model.embed_tokens"] == METHOD
    head_names = ("lm_head", "model.embed_tokens")
    assert methods_except(ours, *head_names) == methods_except(base, *head_names)
    # Input embeddings now carry the rounding too, so allow a little more than the untied case.
    rms_bound, max_bound = BOUNDS[method]
    err = logprob_errors(ours, oracle)
    assert err["rms"] < 2 * rms_bound and err["max"] < 2 * max_bound, err


@pytest.mark.parametrize("mode", ["keep", "quantize"])
def test_a_tied_checkpoint_with_its_own_equal_lm_head_is_retied(tiny, tmp_path, mode):
    """Tied config, and the checkpoint also ships lm_head.weight equal to the embeddings (fine-tuning and quantization
    tools write such copies). vLLM builds the head untied and re-ties it after loading, but only when unquantized; the
    quantized heads do the same, so the flag never holds more than a run without it."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny("qwen3", tied=True)
    path = tmp_path / "qwen3-tied-with-lm-head"
    shutil.copytree(src, path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    base = run_llm(path)
    assert base.head["shares_embed_weight"]  # vLLM re-tied it
    extra = QUANTIZE_TIED if mode == "quantize" else {}
    ours = run_llm(path, quantization="int8_lm_head", **extra)
    assert ours.head["shares_embed_weight"]
    v, h = ours.head["shape"]
    if mode == "keep":
        assert ours.methods["lm_head"] == TIED_BF16 and ours.flat() == base.flat()
        assert ours.head["param_bytes"] == base.head["param_bytes"] == 2 * v * h
    else:
        assert ours.head["dtype"] == ours.head["embed_dtype"] == "torch.int8"
        assert ours.head["param_bytes"] == v * h + 4 * v


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-quantize"])
def test_group_scales(tiny, tied):
    """``group_size: 32`` (issue #32): one fp16 scale per 32 weights of a row, counted in the bytes, used by logits
    and (tied) lookups; closer to the oracle than per-row scales on the same prompts. Here the generic path runs them
    (the fused GPU kernel: tests/test_kernel_cuda.py)."""
    path = tiny("llama", tied=tied)
    oracle = cached_run(path, **ORACLE)
    opts = {"tied": "quantize"} if tied else {}
    per_row = run_llm(path, quantization="int8_lm_head", additional_config={"lm_head_quant": opts})
    grouped_opts = {"lm_head_quant": {**opts, "group_size": 32}}
    grouped = run_llm(path, quantization="int8_lm_head", additional_config=grouped_opts)
    v, h = grouped.head["shape"]
    assert grouped.head["dtype"] == "torch.int8" and grouped.head["scale_shape"] == (v, h // 32)
    assert grouped.head["param_bytes"] == v * h + 2 * v * (h // 32)
    if tied:
        assert grouped.head["shares_embed_weight"] and grouped.head["embed_dtype"] == "torch.int8"
    err = {name: logprob_errors(run, oracle, prompt_only=True)["rms"] for name, run in
           (("row", per_row), ("g32", grouped))}  # fmt: skip
    # Gaussian rows of 256: a group's amax is ~2.1 sigma against the row's ~2.9, so the INT8 step and the error shrink
    # to ~0.75x (measured 0.77-0.79x; real heads, with outlier weights, gain far more: docs/accuracy.md)
    assert 0 < err["g32"] < 0.85 * err["row"], err


def test_a_group_size_that_does_not_divide_the_hidden_size_is_refused(tiny):
    path = tiny("llama", tied=False)
    with pytest.raises(Exception, match=r"group_size 48 is not a power of two from 16 that divides the hidden size "
                       r"\d+ .*; group sizes that work: "):  # fmt: skip
        run_llm(path, quantization="int8_lm_head", additional_config={"lm_head_quant": {"group_size": 48}})


def test_group_scales_at_tensor_parallel_2(tiny, monkeypatch):
    """TP 2 with ``group_size: 32``: each rank quantizes its own vocab rows (groups run along H, which TP does not
    split) and holds half the rows with their fp16 group scales; against vLLM's fp32 head at TP 2 (the body's TP
    rounding differs from TP 1's) the error is TP 1's, within the CPU GEMMs' noise."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM's auto binding needs one NUMA node per rank
    path = tiny("llama", tied=False)
    grouped = {"quantization": "int8_lm_head", "additional_config": {"lm_head_quant": {"group_size": 32}}}
    tp1, oracle1 = cached_run(path, **grouped), cached_run(path, **ORACLE)
    tp2 = run_llm(path, tensor_parallel_size=2, max_num_seqs=1, **grouped)
    oracle2 = run_llm(path, tensor_parallel_size=2, max_num_seqs=1, **ORACLE)
    v, h = tp1.head["shape"]
    assert tp2.head["shape"] == (v // 2, h) and tp2.head["scale_shape"] == (v // 2, h // 32)
    assert tp2.head["scale_dtype"] == "torch.float16" and tp2.head["param_bytes"] == tp1.head["param_bytes"] // 2
    err1 = logprob_errors(tp1, oracle1, prompt_only=True)["rms"]
    err2 = logprob_errors(tp2, oracle2, prompt_only=True)["rms"]
    assert 0 < err2 < BOUNDS["int8_lm_head"][0] and 0.7 < err2 / err1 < 1.4, (err1, err2)
