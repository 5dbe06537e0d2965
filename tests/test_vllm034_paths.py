"""The ways vLLM 0.34 builds, reloads or shares an LM head (issue #30), on its real code at layer level
(tests/vllm034_paths.py runs them in ``.venv-vllm034``; the same report as tests/test_vllm034.py). Each path works or
is refused when the head is built, with one message that names the path, the reason and the fix."""

from __future__ import annotations

import pytest
import vllm034_report

if not vllm034_report.PY.exists():
    pytest.skip(vllm034_report.SKIP, allow_module_level=True)

METHODS = ("bf16_last_layer_fp32", "int8_lm_head", "fp8_lm_head")
QUANTIZED = ("int8_lm_head", "fp8_lm_head")
PKG = "vllm_lmhead_quant"
VOCAB_METHOD = "vllm.model_executor.layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod"


@pytest.fixture(scope="module")
def report() -> dict:
    return vllm034_report.report()


def facts(report: dict, name: str) -> dict:
    return vllm034_report.facts(report, name)


@pytest.mark.parametrize("method", METHODS)
def test_top_tokens_mask_in_place_without_touching_the_head(report, method):
    """0.34's get_top_tokens/get_top_k_tokens write -inf into the 24 padding columns of our apply's output: a fresh
    tensor each call, so the weights, scales and every later logit are unchanged, and the picks equal the argmax /
    top-k of the full logits."""
    f = facts(report, "top_tokens_inplace_mask")[method]
    assert f["padding_columns"] == 24
    assert not f["output_aliases_kept_tensor"] and f["outputs_distinct"]
    assert f["top_equals_argmax"] and f["top_k_ids_equal"] and f["top_k_values_equal"] and f["top_k_logprobs_equal"]
    assert f["parameters_unchanged"] and f["logits_unchanged_after"] and f["no_inf_in_later_logits"]


@pytest.mark.parametrize(
    "case",
    [f"llama_untied/{m}" for m in METHODS]
    + ["qwen3_tied/int8_lm_head+quantize", "qwen3_tied_lm_head_in_checkpoint/int8_lm_head+quantize"],
)
def test_direct_reload_updates_are_bitwise_a_fresh_model(report, case):
    """VLLM_RELOAD_MODE=direct: 10 full updates through vLLM's begin/load_weights/finish reach the head in place (same
    Parameter, same address) and give bitwise the logits, one-byte weight and scales of a fresh model on the final
    weights, under direct or the default layerwise mode. The quantized heads keep their bf16 storage there (vLLM
    writes each update into it) and the line says so: saved 0 MiB, with what layerwise saves."""
    f = facts(report, "direct_reload")[case]
    assert f["same_parameter"] and f["same_address"]
    assert f["bitwise_equal_fresh_direct"] and f["bitwise_equal_fresh_layerwise"]
    assert f["storage_bytes_after"] == f["storage_bytes"] == 2 * 1024 * 256
    if "bf16_last_layer_fp32" in case:
        assert f["weight_dtype"] == "torch.bfloat16"
        return
    assert f["weight_equal_fresh"] and f["scales_equal_fresh"]
    assert f["layerwise_storage_bytes"] == 1024 * 256
    assert f["lines"] and all("saved 0 MiB: VLLM_RELOAD_MODE=direct" in m for m in f["lines"])
    assert all("layerwise saves 0.25 MiB" in m for m in f["lines"])


@pytest.mark.parametrize(
    "case",
    [f"llama_untied/{m}" for m in METHODS] + ["qwen3_tied/int8_lm_head", "qwen3_tied/int8_lm_head+quantize"],
)
def test_ipc_cache_adopts_the_daemons_processed_head(report, case):
    """--load-format ipc_cache: every method declares supports_pre_processed_weights (vLLM's own check passes), the
    engine adopts the daemon's one-byte weight and scales as they are (logits bitwise the daemon's, one line per
    table), and a reload from a daemon with updated weights copies weight and scales by name."""
    f = facts(report, "ipc_cache")[case]
    assert f["supported"] is True
    assert f["bitwise_equal_daemon"] and f["reload_bitwise_equal_daemon"]
    if case == "qwen3_tied/int8_lm_head":  # the default "keep": the shared bf16 table, as without the cache
        assert f["head_method"] == f"{PKG}.methods.bf16_head.TiedBF16HeadMethod"
        assert f["weight_dtype"] == "torch.bfloat16"
    elif "bf16_last_layer_fp32" not in case:
        assert f["head_method"] == f"{PKG}.methods.quantized_head.QuantizedHeadMethod"
        assert f["weight_dtype"] in ("torch.int8", "torch.float8_e4m3fn")
        assert sum("from the weight cache" in m for m in f["lines"]) == 1


def test_draft_lm_head_quantization_from_the_fp32_head(report):
    """The fp32 head is an unquantized bf16 head to vLLM: its FP8 copy for an EAGLE/MTP draft is made from the bf16
    rows, re-derived after an update like a fresh copy, and the target keeps its fp32 logits."""
    f = facts(report, "draft_lm_head_quantization")["bf16_last_layer_fp32"]
    assert f["head_method"] == f"{PKG}.methods.fp32_head.FP32HeadMethod"
    assert f["copy_method"].endswith("Fp8PtpcOnlineLinearMethod") and f["copy_weight_dtype"] == "torch.float8_e4m3fn"
    assert f["source_unchanged_dtype"] == "torch.bfloat16" and f["target_logits_dtype"] == "torch.float32"
    assert f["refreshed"] and f["refresh_equals_fresh_copy"]
    assert f["draft_top1_agrees"] >= 0.85


@pytest.mark.parametrize("method", QUANTIZED)
def test_draft_lm_head_quantization_is_refused_for_one_byte_heads(report, method):
    """vLLM makes the draft's copy only from an unquantized bf16 head (it would raise after loading with a generic
    message): refused when the head is built, naming the setting, the reason and the fix."""
    error = facts(report, "draft_lm_head_quantization")[method]["error"]
    assert error.startswith(f"ValueError: speculative_config draft_lm_head_quantization='fp8' cannot be combined "
                            f"with --quantization {method}")  # fmt: skip
    assert "Drop draft_lm_head_quantization" in error


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head_dtype", ["", "/head_dtype_model"])
def test_pooling_runner_leaves_the_placeholder_head_to_vllm(report, method, head_dtype):
    """runner pooling: the placeholder head is neither bound nor announced, the runner's own float32 head_dtype is
    not mistaken for a user override, head_dtype "model" does not crash on the meta weight, the embeddings are
    vLLM's; one line says the flag changes nothing."""
    f = facts(report, "pooling_runner")
    cell, default = f[method + head_dtype], f["vllm_default" + head_dtype]
    assert "error" not in cell, cell
    assert cell["head_type"] == default["head_type"] == "StageMissingLayer"
    assert cell["embed_method"] == VOCAB_METHOD and cell["embed_is_checkpoint"]
    assert cell["runner_head_dtype"] == ("torch.bfloat16" if head_dtype else "torch.float32")
    assert cell["binding_lines"] == []
    assert len(cell["pooling_lines"]) == 1 and f"--quantization {method} leaves" in cell["pooling_lines"][0]
    assert default["pooling_lines"] == []


def test_head_keeps_vllm_034_linear_geometry(report):
    """0.34's ParallelLMHead carries linear-layer sizes (so vLLM's own W8A16 kernels could take a head); our methods
    keep them, and they still describe the processed weight."""
    f = facts(report, "head_geometry")
    for method in ("vllm_default", *METHODS):
        cell = f[method]
        assert cell["input_size_per_partition"] == 256 and cell["output_size_per_partition"] == 1024, method
        assert cell["output_partition_sizes"] == [1024] and cell["weight_shape"] == [1024, 256], method


def test_compat_helpers_take_their_034_branch(report):
    f = facts(report, "compat_probes_034")
    assert f["runner_generate"] == "generate" and f["runner_pooling"] == "pooling"
    assert f["draft_lm_head_quantization_unset"] is None
    assert f["direct_reload_default"] is False and f["direct_reload_direct"] is True
    assert f["pre_processed_default"] is False and f["pre_processed_inside"] is True
    assert f["placeholder_built_head"] is False
