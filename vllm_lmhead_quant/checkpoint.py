"""Quantized checkpoints: the body keeps exactly the checkpoint's own method, only the head changes.

Without this, ``--quantization fp8_lm_head`` on an FP8 or compressed-tensors checkpoint fails in vLLM with "Quantization
method specified in the model config (compressed-tensors) does not match ... (fp8_lm_head)", and vLLM's own
``head_dtype`` override refuses quantized models' heads. vLLM's hook for this is
``QuantizationConfig.override_quantization_method`` (answered in ``config.py`` only when the user asked for our
method, so other checkpoints are never hijacked), after which vLLM calls our ``from_config`` with the checkpoint's
``quantization_config``.

``from_config`` returns an instance of a subclass of the checkpoint's own config class (``CompressedTensorsConfig``,
``Fp8Config``) with one override: ``get_quant_method`` hands the head (and head-candidate embeddings) to our head
config and everything else to the checkpoint's class. Every attribute and ``isinstance`` check that vLLM's code makes
on the config therefore behaves as without our flag, and the classes pickle by reference.

The ``body`` option (vLLM's online quantization for an unquantized body, body.py) is refused here: the body is
already the checkpoint's.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.fp8 import Fp8Config
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod, VocabParallelEmbedding

from vllm_lmhead_quant._compat import AttentionLayerBase
from vllm_lmhead_quant.body import refuse_over_checkpoint
from vllm_lmhead_quant.config import FP8HeadConfig, FP32HeadConfig, Int8HeadConfig, _HeadOnlyConfig


class CheckpointHeadQuantizedError(ValueError):
    """The checkpoint already stores its LM head quantized; replacing that is not what the flag is for."""


class _HeadOverCheckpoint:
    """Mixin in front of a checkpoint's config class (see the module docstring)."""

    head_config_cls: type[_HeadOnlyConfig]

    @property
    def _head(self) -> _HeadOnlyConfig:
        head = self.__dict__.get("_head_config")
        if head is None:
            head = self.__dict__["_head_config"] = self.head_config_cls()
        return head

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        refuse_over_checkpoint(self._head.name, self)
        if isinstance(layer, VocabParallelEmbedding):
            own = super().get_quant_method(layer, prefix)
            if own is not None and not isinstance(own, (UnquantizedEmbeddingMethod, UnquantizedLinearMethod)):
                raise CheckpointHeadQuantizedError(
                    f"--quantization {self._head.name}: this checkpoint already stores '{prefix}' quantized "
                    f"({type(own).__name__}); the flag only changes an unquantized head. Load it without "
                    "--quantization to use the checkpoint's own head."
                )
            return self._head.get_quant_method(layer, prefix)
        if isinstance(layer, AttentionLayerBase):
            self._head._check_offered(layer)
        return super().get_quant_method(layer, prefix)


def _over(head_config_cls: type[_HeadOnlyConfig], checkpoint_cls: type) -> type:
    """``class <Head>Over<Checkpoint>(_HeadOverCheckpoint, <checkpoint config>)``, defined at module level (below)
    so that it pickles by reference."""
    name = f"{head_config_cls.__name__.removesuffix('Config')}Over{checkpoint_cls.__name__.removesuffix('Config')}"
    cls = type(
        name, (_HeadOverCheckpoint, checkpoint_cls), {"head_config_cls": head_config_cls, "__module__": __name__}
    )
    globals()[name] = cls
    return cls


_HEADS = (FP32HeadConfig, FP8HeadConfig, Int8HeadConfig)
# checkpoint quant_method -> {our head config: ours over it}
SUPPORTED = {
    "compressed-tensors": {head: _over(head, CompressedTensorsConfig) for head in _HEADS},
    "fp8": {head: _over(head, Fp8Config) for head in _HEADS},
}


def over_checkpoint(head_config_cls: type[_HeadOnlyConfig], config: dict) -> _HeadOverCheckpoint:
    """Our head method on top of the checkpoint's own ``quantization_config``."""
    name = str(config.get("quant_method", "")).lower()
    if name not in SUPPORTED:
        raise ValueError(
            f"--quantization {head_config_cls.name}: the checkpoint is quantized with '{name or '?'}', which "
            f"vllm_lmhead_quant cannot combine with its head methods. Supported checkpoint formats: "
            f"{', '.join(sorted(SUPPORTED))}, and unquantized checkpoints."
        )
    return SUPPORTED[name][head_config_cls].from_config(config)
