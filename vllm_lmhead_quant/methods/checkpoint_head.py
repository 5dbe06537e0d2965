"""``bf16_last_layer_fp32`` on a head that the checkpoint already stores quantized (GPTQ with ``lm_head: true``,
compressed-tensors targeting ``lm_head``, unsloth's NVFP4 releases with an FP8 head): fp32 logits from that head.

An RL user who serves such a checkpoint still wants logprobs that are not rounded to bf16. The checkpoint's own
method (``own``) creates, loads and post-processes the head's weights exactly as without our flag, so its format,
sharding and repacking (Marlin, CPU W4A16, CUTLASS layouts) are vLLM's. Its kernels return logits in the
activation dtype, the rounding the flag exists to avoid, so after loading the head is dequantized once *through the
method itself*: ``own.apply`` on rows of the identity matrix returns, column by column, the weight its kernel
multiplies by. That is exact where the kernel dequantizes into the activation dtype before its tensor-core product
(Marlin, the CPU W4A16 kernels, weight-only FP8), and within one activation-dtype rounding of the weight where a
kernel scales its fp32 accumulator instead. Logits are then ``ops.fp32_logits``, the op of ``FP32HeadMethod``.

Cost: a V x H table in the activation dtype next to the checkpoint's (the start-up line says how many bytes). A
format whose method cannot take the identity probe is refused (``CheckpointHeadQuantizedError``), never guessed.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

from vllm_lmhead_quant import _log, ops

_PROBE_ROWS = 256  # identity rows per probe call: bounds the transient [rows, V/tp] output


class CheckpointHeadFP32Method(QuantizeMethodBase):
    def __init__(self, own: QuantizeMethodBase, prefix: str, architecture: str, dtype: torch.dtype | None):
        super().__init__()
        self.own = own
        self.prefix = prefix
        self.architecture = architecture
        self.dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16

    def create_weights(self, layer: torch.nn.Module, *args, **kwargs) -> None:
        self.own.create_weights(layer, *args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from vllm_lmhead_quant.checkpoint import CheckpointHeadQuantizedError

        self.own.process_weights_after_loading(layer)
        try:
            table = dequantize_through(self.own, layer, self.dtype)
        except Exception as e:
            raise CheckpointHeadQuantizedError(
                f"--quantization bf16_last_layer_fp32: the checkpoint stores '{self.prefix}' quantized with "
                f"{type(self.own).__name__}, whose kernel could not be probed for its weights ({e!r}). Load it "
                "without --quantization (bf16 logits from the checkpoint's head)."
            ) from e
        # A buffer, not a Parameter: weight loaders and RL updates address the checkpoint's own tensors by name.
        layer.register_buffer("fp32_head_table", table, persistent=False)
        _log.once(
            logging.INFO,
            ("checkpoint-fp32", id(layer)),
            "%s: %s '%s' (quantized by the checkpoint: %s) -> bf16_last_layer_fp32: dequantized once to %s %s for "
            "float32 logits, +%.2f MiB per rank next to the checkpoint's head",
            self.architecture,
            type(layer).__name__,
            self.prefix,
            type(self.own).__name__,
            str(table.dtype).removeprefix("torch."),
            tuple(table.shape),
            table.numel() * table.element_size() / 2**20,
        )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.fp32_logits(x, layer.fp32_head_table, bias)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        return self.own.embedding(layer, input_)


@torch.no_grad()
def dequantize_through(method: QuantizeMethodBase, layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``W`` ([V/tp, H], ``dtype``) such that ``method.apply(layer, x) == x @ W.T`` column by column: the weight
    the method's kernel multiplies by, read back through the kernel on identity rows."""
    hidden = layer.embedding_dim
    device = next(t.device for t in layer.parameters())
    columns = []
    for start in range(0, hidden, _PROBE_ROWS):
        rows = min(_PROBE_ROWS, hidden - start)
        eye = torch.zeros(rows, hidden, dtype=dtype, device=device)
        eye[torch.arange(rows), torch.arange(start, start + rows)] = 1
        columns.append(method.apply(layer, eye).to(dtype))  # [rows, V/tp]: W[:, start:start + rows].T
    return torch.cat(columns).t().contiguous()
