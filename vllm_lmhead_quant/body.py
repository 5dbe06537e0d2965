"""``--additional-config '{"lm_head_quant": {"body": SCHEME}}'``: vLLM's online quantization for every layer but the
head, our method for the head.

    vllm serve MODEL --quantization int8_lm_head --additional-config '{"lm_head_quant": {"body": "fp8_per_channel"}}'

``--quantization`` takes one name, so without this a user cannot have both an online-FP8 body and our head.

**What is reused.** vLLM's own ``OnlineQuantizationConfig``, built from vLLM's own scheme table exactly as vLLM's
``get_quant_config`` builds it for ``--quantization SCHEME`` on an unquantized checkpoint
(vllm/model_executor/model_loader/weight_utils.py; the config in .../layers/quantization/online/base.py). Its
dispatch is not copied: it decides every non-head layer.

**How it gets the layers** (``_compat.composes_online_quantization``):

* vLLM >= 0.32: our config exposes it as ``online_quantization_config``, the attribute vLLM itself sets to compose
  online quantization with another config (``--quantization-config``, weight_utils.py
  ``maybe_compose_online_quantization``). vLLM's ``resolve_quant_method`` (.../quantization/base_config.py) then
  hands it every Linear/MoE layer that our config leaves unquantized, and the loader logs and times it
  (model_loader/base_loader.py, model_loader/utils.py ``online_quantization_timing_context``); MoE shared-expert
  fusion finds it too. Our ``get_quant_method`` answers as without a body: returning the online method ourselves
  would make ``resolve_quant_method`` take it for a checkpoint method and quantize it a second time.
* vLLM 0.26 has no composition: its layers ask only ``quant_config.get_quant_method``, so ours hands those layers to
  the online config's ``get_quant_method``. 0.26's loader needs nothing from the config: it finds online methods by
  their ``uses_meta_device`` and runs their layerwise processing (model_loader/base_loader.py ``_has_online_quant``,
  default_loader.py, dummy_loader.py).

**Why the switch happens at the first layer, not when our config is built.** vLLM builds our config with ``cls()``
inside ``VllmConfig.__post_init__`` (config/vllm.py ``_get_quantization_config``), which passes only the model and
load configs: ``additional_config`` is unreachable and no vLLM config is current yet. Layers ask for their methods
while the model is built, inside ``set_current_vllm_config``, where ``additional_config`` is. The body config is
built at the first ask and kept for the engine (one quantization config per VllmConfig); vLLM's config-time checks
for ``--quantization SCHEME`` (minimum capability, activation dtypes) are repeated there.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_lmhead_quant import _compat, _log
from vllm_lmhead_quant.options import KEY, HeadOptions


def schemes() -> list[str]:
    return sorted(_compat.online_quant_shorthands())


def build(scheme: str, method_name: str, vllm_config: Any) -> Any:
    """vLLM's ``OnlineQuantizationConfig`` for ``scheme``, after the checks vLLM makes for ``--quantization SCHEME``."""
    from vllm.platforms import current_platform

    shorthands = _compat.online_quant_shorthands()
    if scheme not in shorthands:  # options.py checked it already; kept for direct callers
        raise ValueError(f'"{KEY}.body" must be one of {schemes()}, got {scheme!r}')
    config = _compat.online_quantization_config(shorthands[scheme])
    capability = current_platform.get_device_capability()
    if capability is not None and capability.to_int() < config.get_min_capability():
        raise ValueError(
            f'--quantization {method_name} with "body": "{scheme}": vLLM\'s online {scheme} needs compute capability '
            f"{config.get_min_capability()}, this GPU has {capability.to_int()}."
        )
    dtype = getattr(getattr(vllm_config, "model_config", None), "dtype", None)
    if dtype is not None and dtype not in config.get_supported_act_dtypes():
        raise ValueError(
            f'--quantization {method_name} with "body": "{scheme}": vLLM\'s online quantization supports '
            f"{config.get_supported_act_dtypes()}, not {dtype}."
        )
    _log.once(
        logging.INFO,
        ("body", scheme, method_name),
        "body: vLLM's online %s (%s) quantizes the Linear/MoE layers; head: %s.",
        scheme,
        type(config).__name__,
        method_name,
    )
    return config


class OnlineBody:
    """Mixin of our head configs (config.py): the body config and how vLLM reaches it (module docstring)."""

    name: str
    packed_modules_mapping: dict
    _body_config: tuple[str, Any] | None = None  # (scheme, vLLM's config): runtime state, rebuilt in each process
    _vllm_online: Any = None  # vLLM >= 0.32's own composition: --quantization-config, set by vLLM through the setter

    @property
    def online_quantization_config(self) -> Any:
        if not _compat.composes_online_quantization():
            return self._vllm_online
        return self.body_config() or self._vllm_online

    @online_quantization_config.setter
    def online_quantization_config(self, value: Any) -> None:
        self._vllm_online = value

    def body_method(self, layer: torch.nn.Module, prefix: str) -> Any:
        """The online config's method for ``layer`` where we must ask it ourselves (vLLM 0.26), else None."""
        if _compat.composes_online_quantization():
            return None
        body = self.body_config()
        if body is None:
            return None
        body.packed_modules_mapping = self.packed_modules_mapping  # what 0.32's resolve_quant_method does too
        return body.get_quant_method(layer, prefix)

    def body_config(self) -> Any:
        """vLLM's online config for the ``body`` option of the engine being built, or None without one. Outside of
        model construction (no current vLLM config: the loader's log lines) the one built during it."""
        vllm_config = _compat.current_vllm_config()
        if vllm_config is None:
            return self._body_config[1] if self._body_config else None
        scheme = HeadOptions.from_additional_config(_compat.additional_config(vllm_config)).body
        if scheme is None:
            return None
        if self._body_config is None or self._body_config[0] != scheme:
            if self._vllm_online is not None:
                raise ValueError(
                    f'--quantization {self.name}: "{KEY}.body" and --quantization-config both ask for online '
                    f'quantization of the body; use one of them ("body": "{scheme}" is the same as '
                    f"--quantization {scheme} alone for every layer but the head)."
                )
            self._body_config = (scheme, build(scheme, self.name, vllm_config))
        return self._body_config[1]


def refuse_over_checkpoint(method_name: str, checkpoint_config: Any) -> None:
    """A checkpoint with its own ``quantization_config`` keeps its body (checkpoint.py): a ``body`` on top is refused,
    because vLLM 0.26 cannot compose the two and a body quantized twice is not what anyone asks for."""
    vllm_config = _compat.current_vllm_config()
    if vllm_config is None:
        return
    scheme = HeadOptions.from_additional_config(_compat.additional_config(vllm_config)).body
    if scheme is not None:
        raise ValueError(
            f'--quantization {method_name}: "{KEY}.body": "{scheme}" quantizes an unquantized body, but this '
            f"checkpoint is already quantized ({checkpoint_config.get_name()}), and its body keeps the checkpoint's "
            f'method. Remove "body" (the head still gets {method_name}).'
        )
