"""Model classes for architectures whose LM head (or the input embedding that serves as it) vLLM builds without
passing ``quant_config``, so no quantization config ever sees it and our flag would be a no-op (config.py refuses
such models with ``HeadNotBoundError``).

Each family gets a subclass of vLLM's own class that, only when the engine runs one of our methods, rebuilds that
module with the quantization config after vLLM's constructor (``common.py``). It is registered through vLLM's plugin
interface (``ModelRegistry.register_model`` with a lazy ``"module:Class"`` string, so nothing is imported until vLLM
loads the model); vLLM itself is not patched. Without our flag the subclass runs vLLM's constructor and nothing else.
"""

from __future__ import annotations

from vllm_lmhead_quant import _compat

# architecture -> (vLLM's module and class for it, our subclass). Same modules in vLLM 0.26, 0.32 and 0.33; a vLLM
# whose registry maps the architecture elsewhere keeps its own class (and our loud refusal).
FAMILIES: dict[str, tuple[tuple[str, str], str]] = {
    "GptOssForCausalLM": (("gpt_oss", "GptOssForCausalLM"), "gpt_oss:GptOssForCausalLM"),
    "Qwen3NextForCausalLM": (("qwen3_next", "Qwen3NextForCausalLM"), "qwen3_next:Qwen3NextForCausalLM"),
    "CohereForCausalLM": (("commandr", "CohereForCausalLM"), "commandr:CohereForCausalLM"),
    "Cohere2ForCausalLM": (("commandr", "CohereForCausalLM"), "commandr:CohereForCausalLM"),
    "Gemma2ForCausalLM": (("gemma2", "Gemma2ForCausalLM"), "gemma2:Gemma2ForCausalLM"),
    "OPTForCausalLM": (("opt", "OPTForCausalLM"), "opt:OPTForCausalLM"),
    "BloomForCausalLM": (("bloom", "BloomForCausalLM"), "bloom:BloomForCausalLM"),
}


def register_models() -> list[str]:
    """Register our subclasses for the architectures vLLM still maps to the class we extend. Returns them.

    Idempotent; imports no model code (vLLM imports our module, and with it vLLM's, when it loads the model)."""
    from vllm import ModelRegistry

    done = []
    for arch, ((vllm_module, vllm_class), ours) in FAMILIES.items():
        module, cls = ours.split(":")
        ours_entry = (f"{__name__}.{module}", cls)
        entry = _compat.registered_model(arch)
        if entry == (f"vllm.model_executor.models.{vllm_module}", vllm_class):
            ModelRegistry.register_model(arch, ":".join(ours_entry))
        if _compat.registered_model(arch) == ours_entry:
            done.append(arch)
    return done
