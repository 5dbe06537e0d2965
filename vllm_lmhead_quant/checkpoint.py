"""Quantized checkpoints: the body keeps exactly the method vLLM gives it without our flag, only the head changes.

Without this, ``--quantization int8_lm_head`` on an AWQ, GPTQ, ModelOpt or compressed-tensors checkpoint fails in
vLLM with "Quantization method specified in the model config (awq) does not match ... (int8_lm_head)", and vLLM's
own ``head_dtype`` override refuses quantized heads.

**Which method the body gets is vLLM's decision, asked at run time** (no list of formats here):

1. vLLM asks every registered method's ``override_quantization_method``. Ours answers only when the user named our
   method (config.py), and first asks vLLM's own chain what it would pick *without* a user method
   (``_compat.checkpoint_method``: ``awq`` -> ``awq_marlin`` on CUDA, ``gptq`` -> ``gptq_marlin``, the CPU W4A16
   methods, ModelOpt's ``quant_algo``, a plugin's own method...). The answer is written into the checkpoint's
   ``quantization_config`` dict under ``BODY_KEY``, so it travels with the model config to every process.
2. vLLM then calls our ``from_config`` with that dict, which returns an instance of a subclass of that method's
   config class whose only override is ``get_quant_method`` for the head. Every other attribute, ``isinstance``
   check and method class vLLM sees is the checkpoint method's own; a method vLLM adds works without a release here.

**A head the checkpoint already quantized** (GPTQ ``lm_head: true``, compressed-tensors targeting ``lm_head``,
unsloth's FP8-head NVFP4 releases): ``int8_lm_head``/``fp8_lm_head`` keep the checkpoint's head (one warning:
nothing to save); ``bf16_last_layer_fp32`` wraps it (methods/checkpoint_head.py) and returns fp32 logits from its
dequantized weight.

Refused with one line naming the reason: formats vLLM itself does not serve on this install (GGUF and
bitsandbytes left vLLM's core), ``torchao`` (vLLM's loader keys it on ``--quantization torchao`` itself), and the
``body`` option (the body is already the checkpoint's).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    UnquantizedEmbeddingMethod,
    VocabParallelEmbedding,
)

from vllm_lmhead_quant import _compat, _log
from vllm_lmhead_quant._compat import AttentionLayerBase
from vllm_lmhead_quant.body import refuse_over_checkpoint

# Where override_quantization_method records vLLM's own choice for the body, inside the checkpoint's config dict.
BODY_KEY = "_lmhead_quant_body_method"
# vLLM code outside the config object that keys on ``--quantization NAME`` itself, which our flag replaces.
_KEYED_BY_NAME = {"torchao": "vLLM's loader switches to torchao's own loading only for --quantization torchao"}


class CheckpointHeadQuantizedError(ValueError):
    """The checkpoint stores its LM head in a way this package cannot combine with the flag."""


def claim(method_name: str, hf_quant_cfg: dict, hf_config: Any) -> str:
    """``override_quantization_method`` for a quantized checkpoint under our flag: record the body's method (vLLM's
    choice without our flag) and claim the checkpoint."""
    hf_quant_cfg[BODY_KEY] = body_method(method_name, hf_quant_cfg, hf_config)
    return method_name


def body_method(method_name: str, hf_quant_cfg: dict, hf_config: Any) -> str | None:
    cfg = {k: v for k, v in hf_quant_cfg.items() if k != BODY_KEY}
    fmt = str(cfg.get("quant_method", "")) or "?"
    try:
        inner = _compat.checkpoint_method(cfg, hf_config)
    except ValueError as e:  # vLLM's own refusal (unknown method, unsupported on this platform): same reason
        reason = str(e).split(". Must be one of")[0]  # not the list of every registered method
        raise ValueError(
            f"--quantization {method_name}: the checkpoint is quantized with '{fmt}', which vLLM refuses here even "
            f"without the flag: {reason}. (GGUF and bitsandbytes are vLLM plugins now: with the plugin for the "
            "format installed, the flag composes with it.)"
        ) from e
    if inner in _KEYED_BY_NAME:
        raise ValueError(
            f"--quantization {method_name}: checkpoints quantized with '{inner}' cannot take another --quantization: "
            f"{_KEYED_BY_NAME[inner]}. Load it without the flag."
        )
    return inner


def refuse_gguf(method_name: str, vllm_config: Any) -> None:
    """A GGUF model carries its quantization in the file, not in a ``quantization_config``, and is served by the
    vLLM GGUF plugin's own method, which our flag would replace: the body would not be dequantized as the plugin does
    it. Refused, never a silent mix."""
    model_config = getattr(vllm_config, "model_config", None)
    load_format = str(getattr(getattr(vllm_config, "load_config", None), "load_format", ""))
    if load_format == "gguf" or str(getattr(model_config, "model", "")).endswith(".gguf"):
        raise ValueError(
            f"--quantization {method_name}: GGUF models are served by vLLM's GGUF plugin with its own quantization "
            "method, which this flag would replace; vllm_lmhead_quant does not combine with GGUF. Load the GGUF file "
            "without the flag, or its safetensors original with it."
        )


def over_checkpoint(head_config_cls: type, config: dict) -> Any:
    """Our head method on top of the checkpoint's own ``quantization_config`` (``config``)."""
    inner = config[BODY_KEY] if BODY_KEY in config else body_method(head_config_cls.name, config, None)
    if inner is None:  # a quantization_config that quantizes nothing ("quant_method": "")
        return head_config_cls()
    cfg = {k: v for k, v in config.items() if k != BODY_KEY}
    return _over(head_config_cls, get_quantization_config(inner)).from_config(cfg)


class _HeadOverCheckpoint:
    """Mixin in front of a checkpoint's config class (see the module docstring)."""

    head_config_cls: type
    checkpoint_cls: type

    @property
    def _head(self) -> Any:
        head = self.__dict__.get("_head_config")
        if head is None:
            head = self.__dict__["_head_config"] = self.head_config_cls()
        return head

    def __reduce__(self):
        # The class is made at run time: rebuild it by its two bases in the process that unpickles (engine core,
        # workers), where it may not exist yet.
        state = {k: v for k, v in self.__dict__.items() if k != "_head_config"}
        return _rebuild, (self.head_config_cls, self.checkpoint_cls), state

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        refuse_over_checkpoint(self._head.name, self)
        if isinstance(layer, VocabParallelEmbedding):
            own = super().get_quant_method(layer, prefix)
            if own is None or isinstance(own, (UnquantizedEmbeddingMethod, UnquantizedLinearMethod)):
                return self._head.get_quant_method(layer, prefix)
            if not isinstance(layer, ParallelLMHead):  # a quantized input embedding: part of the body
                return own
            return self._quantized_head(layer, prefix, own)
        if isinstance(layer, AttentionLayerBase):
            self._head._check_offered(layer)
        return super().get_quant_method(layer, prefix)

    def _quantized_head(self, layer: torch.nn.Module, prefix: str, own: QuantizeMethodBase) -> QuantizeMethodBase:
        """The checkpoint stores this head quantized with ``own``."""
        from vllm_lmhead_quant.methods.checkpoint_head import CheckpointHeadFP32Method

        head = self._head
        head._release_candidates()
        head._head_bound = True
        vllm_config = _compat.current_vllm_config()
        model_config = getattr(vllm_config, "model_config", None)
        architecture = (getattr(model_config, "architectures", None) or ["?"])[0]
        if head.name == "bf16_last_layer_fp32":
            return CheckpointHeadFP32Method(own, prefix, architecture, getattr(model_config, "dtype", None))
        _log.once(
            logging.WARNING,
            ("checkpoint-head", prefix),
            "%s: the checkpoint already stores '%s' quantized (%s, %s): %s keeps that head as it is, 0 bytes saved. "
            "Drop --quantization %s (same result), or serve a checkpoint whose head is unquantized.",
            architecture,
            prefix,
            self.get_name(),
            type(own).__name__,
            head.name,
            head.name,
        )
        return own


@functools.cache
def _over(head_config_cls: type, checkpoint_cls: type) -> type:
    """``class <Head>Over<Checkpoint>(_HeadOverCheckpoint, <checkpoint config>)``, one per pair."""
    name = f"{head_config_cls.__name__.removesuffix('Config')}Over{checkpoint_cls.__name__.removesuffix('Config')}"
    attrs = {"head_config_cls": head_config_cls, "checkpoint_cls": checkpoint_cls, "__module__": __name__}
    return type(name, (_HeadOverCheckpoint, checkpoint_cls), attrs)


def _rebuild(head_config_cls: type, checkpoint_cls: type) -> Any:
    cls = _over(head_config_cls, checkpoint_cls)
    return cls.__new__(cls)
