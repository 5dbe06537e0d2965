"""``bf16_last_layer_fp32``'s head: bf16 weight, fp32 logits.

Subclasses ``UnquantizedEmbeddingMethod`` on purpose: weights, weight loader, ``embedding()`` (for models whose
head *is* the input embedding), ``tie_weights`` and every ``isinstance`` check in vLLM (weight re-tying, the fused
TP embedding, the ``head_dtype`` guard) behave exactly as without the flag. Only ``apply`` changes, and it reads
the live ``layer.weight`` on every call, so RL weight updates need no cache invalidation (the bug class of
prime-rl #2438 and PipelineRL's ``invalidate_fp32_cache``).

``apply`` runs the ops of vLLM's own ``head_dtype=float32`` path (``ops.fp32_logits``) in every mode, vLLM's
batch-invariant mode included: vLLM 0.26 to 0.34 call ``torch.mm(out_dtype=float32)`` there whatever the mode, and
the mode decides which kernel that op reaches. So the logits stay bitwise equal to vLLM's fp32 head, and they are
batch invariant exactly where vLLM's fp32 head is (issue #29; :func:`batch_invariant_line` says which case holds,
once, at start-up).
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
        self.batch_invariant = _compat.batch_invariant_enabled()  # only for the start-up line: apply never asks

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.batch_invariant and layer.weight.device.type != "meta":  # meta: a placeholder head that never runs
            level, line = batch_invariant_line(layer.weight.device, layer.weight.dtype)
            _log.once(level, ("fp32-bi", str(layer.weight.device)), "bf16_last_layer_fp32 on %s: %s",
                      layer.weight.device, line)  # fmt: skip
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
        return ops.fp32_logits(x, layer.weight, bias)


# What the start-up line quotes for SM 9.0+ (issue #29, vLLM 0.26 bundle on an H100, 151936 x 4096).
MEASURED_SM90 = (
    "rows bitwise identical at every M from 1 to 4096, 0.44-0.76x the time of vLLM's bf16 head in this mode at "
    "M <= 256 (H100, vLLM 0.26)"
)


def batch_invariant_line(device: torch.device, weight_dtype: torch.dtype) -> tuple[int, str]:
    """(log level, line) for vLLM's batch-invariant mode: which kernel the head's op reaches on ``device``, and
    whether the logits are batch invariant there. WARNING wherever they are not, so that is never silent."""
    cuda = device.type == "cuda"
    hip = cuda and torch.version.hip is not None
    capability = torch.cuda.get_device_capability(device) if cuda else None
    return describe_batch_invariant(device.type, weight_dtype, hip, capability, _compat.batch_invariant_mm_dtype)


def describe_batch_invariant(
    device_type: str, weight_dtype: torch.dtype, hip: bool, capability: tuple[int, int] | None, mm_dtype_override
) -> tuple[int, str]:
    """:func:`batch_invariant_line` from plain facts (tested per device and vLLM version on CPU).
    ``mm_dtype_override(hip, capability)``: whether vLLM's mode replaces ``aten::mm.dtype`` there
    (``_compat.batch_invariant_mm_dtype``)."""
    if weight_dtype == torch.float32:
        return logging.WARNING, (
            "the model is float32, so the head is vLLM's own (UnquantizedEmbeddingMethod.apply: vLLM's "
            "batch-invariant linear on GPUs) and this flag changes nothing; the trainer twin's batch_invariant option "
            "expects bf16/fp16 weights"
        )
    same = "the op of vLLM's head_dtype=float32 path (bitwise equal to it)"
    if device_type != "cuda":
        return logging.WARNING, (
            f"logits = F.linear(x.float(), W.float()), {same}, which upcasts the weight per call on "
            f"{device_type.upper()} as vLLM's fp32 head does there. NOT batch invariant: vLLM's batch-invariant "
            "kernels are for GPUs, and CPU GEMMs change with the batch size (rows differ by ~2e-5 between M = 1 and "
            "M = 8)"
        )
    op = f"logits = torch.mm(x, W.T, out_dtype=float32), {same}"
    where = "ROCm" if hip else f"SM {capability[0]}.{capability[1]}" if capability else "this GPU"
    if mm_dtype_override(hip, capability):
        return logging.INFO, f"{op}; on {where} vLLM's mode runs it in its batch-invariant Triton kernel"
    if not hip and capability is not None and capability >= (9, 0):
        return logging.INFO, f"{op}; cuBLASLt without split-K, as vLLM's mode sets it up on SM 9.0+: {MEASURED_SM90}"
    return logging.WARNING, (
        f"{op}. NOT guaranteed batch invariant on {where}: vLLM's mode makes this op batch invariant on SM 9.0+ "
        "(cuBLAS without split-K) and, from vLLM 0.34, on SM 8.x and ROCm (its Triton aten::mm.dtype kernel); "
        "neither holds here, for vLLM's own fp32 head as for this one"
    )
