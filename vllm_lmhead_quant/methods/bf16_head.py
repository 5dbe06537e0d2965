"""Heads that stay exactly as vLLM builds them, for two cases where changing them would be wrong.

``TiedBF16HeadMethod``: ``fp8_lm_head`` or ``int8_lm_head`` on a model whose head shares its table with the input
embeddings. Quantizing only the head would *add* V x H bytes (a one-byte copy next to the bf16 table: ROCm #1238),
and quantizing the shared table changes input embeddings, so that is opt-in. The default keeps bf16 and says so once.

``HeadProbeMethod``: given to an input embedding before we know whether the model will build a separate head.
If the model later builds a ``ParallelLMHead`` through the quantization config, the config swaps the embedding
back to vLLM's own ``UnquantizedEmbeddingMethod`` before any weight is loaded. If the probe survives to
weight processing, the model never handed its head to the quantization config (vLLM #53896, #52147) and
the flag would be a silent no-op, so loading fails with the architecture's name instead.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from vllm_lmhead_quant import _compat, _log


class HeadNotBoundError(RuntimeError):
    """The model builds its LM head without consulting the quantization config."""


class TiedBF16HeadMethod(UnquantizedEmbeddingMethod):
    def __init__(self, prefix: str = "", architecture: str = "?", method_name: str = "fp8_lm_head"):
        super().__init__()
        self.prefix = prefix
        self.architecture = architecture
        self.method_name = method_name

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        _log.once(
            logging.WARNING,
            ("tied-bf16", id(layer)),
            "%s ties '%s' to the input embeddings, so %s keeps that shared table in %s (0 bytes saved). To "
            "store it quantized once for both uses (input embeddings then carry its rounding), pass "
            '--additional-config \'{"lm_head_quant": {"tied": "quantize"}}\'.',
            self.architecture,
            self.prefix,
            self.method_name,
            str(layer.weight.dtype).removeprefix("torch."),
        )


class HeadProbeMethod(UnquantizedEmbeddingMethod):
    def __init__(self, method_name: str, prefix: str = "", architecture: str = "?"):
        super().__init__()
        self.method_name = method_name
        self.prefix = prefix
        self.architecture = architecture

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not _compat.is_last_pp_rank():
            # With pipeline parallelism the head lives on the last rank; this rank only looks tokens up.
            layer.quant_method = UnquantizedEmbeddingMethod()
            layer.quant_method.process_weights_after_loading(layer)
            return
        raise HeadNotBoundError(
            f"--quantization {self.method_name}: vLLM's {self.architecture} builds its LM head without passing "
            f"the quantization config (only '{self.prefix or 'the input embedding'}' was offered), so the method "
            "would silently do nothing. This architecture is not supported by vllm_lmhead_quant on this vLLM "
            "version; run without the flag, or use a model class that passes quant_config to ParallelLMHead."
        )
