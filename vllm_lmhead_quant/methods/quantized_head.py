"""``fp8_lm_head`` and ``int8_lm_head``: a one-byte head weight (FP8 e4m3 or symmetric INT8, ``quant.py``) with one
fp32 scale per vocab row, weight-only maths. One method class for both formats: only the format differs.

Lifecycle (vLLM's online-quantization pattern, cf. ``fp8.py``): ``create_weights`` allocates the same bf16
``[V_pad/tp, H]`` parameter and loader as the unquantized head, so checkpoints, vocab padding and TP sharding
load unchanged; ``process_weights_after_loading`` quantizes it and *replaces* the parameter object (never
``.data`` on a tensor that may be shared), so the bf16 storage is freed and vLLM's post-load memory profile
hands the bytes to the KV cache; ``apply`` runs the weight-only GEMM (``ops.quantized_logits``).

Why weight-only: dynamic per-token activation quantization (w8a8 ``_scaled_mm``) cost ~0.1 nats RMS logprob
error on a random model and was *slower* than bf16 at hidden 1024 (docs/research notes); keeping activations in
bf16 leaves only the weight's rounding. The seed PR (vLLM #35696) cast the weight with no scale and upcast it
back every step, 7.7-8.6x slower than bf16 at decode.
"""

from __future__ import annotations

import logging

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from vllm_lmhead_quant import _log, ops
from vllm_lmhead_quant.quant import FP8, Format, dequantize_rows, quantize_rows, quantized_bytes


class QuantizedHeadMethod(QuantizeMethodBase):
    """``fmt``: the weight format (``quant.FP8`` or ``quant.INT8``); ``method_name``: the ``--quantization`` name
    for messages. ``shared=True``: the table also serves input lookups (tied embeddings, opt-in); ``embedding()``
    then dequantizes the looked-up rows. ``logits_dtype``: None for the activation dtype, or torch.float32."""

    def __init__(
        self,
        prefix: str = "",
        architecture: str = "?",
        *,
        fmt: Format = FP8,
        method_name: str = "fp8_lm_head",
        shared: bool = False,
        logits_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.prefix = prefix
        self.architecture = architecture
        self.fmt = fmt
        self.method_name = method_name
        self.shared = shared
        self.logits_dtype = logits_dtype

    def create_weights(self, layer: torch.nn.Module, *args, **extra_weight_attrs) -> None:
        UnquantizedEmbeddingMethod.create_weights(self, layer, *args, **extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight
        if weight.dtype == self.fmt.dtype:  # already processed (a second call, e.g. a shared module)
            return
        q, scale = quantize_rows(weight.data, self.fmt, name=f"{self.architecture} '{self.prefix}'")
        before = weight.numel() * weight.element_size()
        layer.orig_dtype = weight.dtype
        new_weight = Parameter(q, requires_grad=False)
        new_weight.input_dim, new_weight.output_dim = 1, 0
        new_weight.weight_loader = _RequantizingLoader(layer, weight.weight_loader, self.prefix, self.fmt)
        layer.weight = new_weight  # replaces the registered Parameter; the bf16 one is now unreferenced
        layer.weight_scale = Parameter(scale, requires_grad=False)
        del weight
        after = quantized_bytes(*q.shape)
        _log.once(
            logging.INFO,
            ("quantized", id(layer)),
            "%s: %s '%s' -> %s (weight %s %s -> %s + per-row fp32 scales%s, logits %s): %s -> %s per rank, saved %s",
            self.architecture,
            type(layer).__name__,
            self.prefix,
            self.method_name,
            tuple(q.shape),
            str(layer.orig_dtype).removeprefix("torch."),
            str(q.dtype).removeprefix("torch."),
            "; shared with the input embeddings" if self.shared else "",
            str(self.logits_dtype or layer.orig_dtype).removeprefix("torch."),
            _log.mib(before),
            _log.mib(after),
            _log.mib(before - after),
        )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.weight.dtype != self.fmt.dtype:  # before weight processing (never on a loaded engine)
            return ops.fp32_logits(x, layer.weight, bias).to(self.logits_dtype or x.dtype)
        return ops.quantized_logits(x, layer.weight, layer.weight_scale, bias, out_dtype=self.logits_dtype or x.dtype)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        if layer.weight.dtype != self.fmt.dtype:
            return torch.nn.functional.embedding(input_, layer.weight)
        # index_select on the raw bytes: gathers need no kernel for the one-byte dtype on any device.
        rows = torch.nn.functional.embedding(input_, layer.weight.view(torch.uint8)).view(self.fmt.dtype)
        flat = rows.reshape(-1, rows.shape[-1])
        return dequantize_rows(flat, layer.weight_scale[input_.reshape(-1)], layer.orig_dtype).reshape(rows.shape)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        """Tied head. Shared mode: the embedding module itself becomes the head, so one table is quantized once
        and serves both uses (the same layout as models that alias ``lm_head = embed_tokens``)."""
        if not self.shared or getattr(layer, "bias", None) is not None:
            layer.weight = embed_tokens.weight
            return layer
        embed_tokens.quant_method = self
        return embed_tokens


class _RequantizingLoader:
    """The quantized weight's ``weight_loader``: RL weight updates (``model.load_weights`` with bf16 tensors, as RL
    frameworks push them every step) land here. The new rows go through vLLM's own vocab-parallel loader into a
    staging tensor in the original dtype (same sharding and padding as at load time), are quantized with fresh
    per-row scales, and are copied *into* the existing quantized weight and scale, so memory stays flat and
    anything that captured those tensors (CUDA graphs) sees the new values. Without this, the loader would cast
    bf16 into the one-byte tensor with no scale: silently wrong logits after the first update (the
    stale/derived-weight bug class of prime-rl #2438 and PipelineRL)."""

    def __init__(self, layer: torch.nn.Module, loader, name: str, fmt: Format):
        self.layer, self.loader, self.name, self.fmt = layer, loader, name, fmt

    def __call__(self, param: Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
        layer = self.layer
        staging = Parameter(torch.empty(param.shape, dtype=layer.orig_dtype, device=param.device), requires_grad=False)
        staging.input_dim, staging.output_dim = 1, 0
        self.loader(staging, loaded_weight, *args, **kwargs)
        q, scale = quantize_rows(staging.data, self.fmt, name=f"weight update of '{self.name}'")
        param.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
