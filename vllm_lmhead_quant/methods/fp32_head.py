"""``bf16_last_layer_fp32``'s head: bf16 weight, fp32 logits.

Subclasses ``UnquantizedEmbeddingMethod`` on purpose: weights, weight loader, ``embedding()`` (for models whose
head *is* the input embedding), ``tie_weights`` and every ``isinstance`` check in vLLM (weight re-tying, the fused
TP embedding, the ``head_dtype`` guard) behave exactly as without the flag. Only ``apply`` changes, and it reads
the live ``layer.weight`` on every call, so RL weight updates need no cache invalidation (the bug class of
prime-rl #2438 and PipelineRL's ``invalidate_fp32_cache``).
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from vllm_lmhead_quant import _compat, _log, ops


class FP32HeadMethod(UnquantizedEmbeddingMethod):
    def __init__(self, prefix: str = "", architecture: str = "?"):
        super().__init__()
        self.prefix = prefix
        self.architecture = architecture
        # Read once (the head runs every step): batch-invariant mode overrides aten::linear/mm but not mm.dtype, so
        # there the exact upcast path is the batch-invariant one.
        self._use_out_dtype = False if _compat.batch_invariant_enabled() else None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.weight.dtype == torch.float32:
            # Nothing to change for an fp32 model; keep vLLM's own processing (CPU prepack) and maths.
            super().process_weights_after_loading(layer)
            return
        # No super() call: on CPU it builds a prepacked copy of the weight for a bf16 GEMM that this head never
        # runs. For the alias case (Gemma2-style heads) lookups use F.embedding, which does not need it either.
        _log.once(
            logging.INFO,
            ("fp32", id(layer)),
            "%s: %s '%s' -> bf16_last_layer_fp32 (weight %s %s stays as is, logits in float32, 0 bytes extra)",
            self.architecture,
            type(layer).__name__,
            self.prefix,
            tuple(layer.weight.shape),
            str(layer.weight.dtype).removeprefix("torch."),
        )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype == torch.float32 and layer.weight.dtype == torch.float32:
            return super().apply(layer, x, bias)
        return ops.fp32_logits(x, layer.weight, bias, use_out_dtype=self._use_out_dtype)
