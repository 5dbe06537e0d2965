"""The two head GEMMs, dispatched by device. No vLLM import: usable from the trainer side and in unit tests.

``fp32_logits``: bf16/fp16 operands, fp32 logits. On CUDA/ROCm one ``torch.mm(..., out_dtype=torch.float32)``
(the bf16 x bf16 -> fp32 cuBLAS GEMM: no fp32 weight copy, same cost as the bf16 GEMM). Where that overload has
no kernel (CPU, XPU) the operands are upcast for the call, which is exact: a product of two bf16 values is
representable in fp32. These are the same ops as vLLM's ``head_dtype=float32`` path
(``LogitsProcessor._apply_head``, 0.26 to 0.34), in every mode, so results are bitwise equal to it. That includes
vLLM's batch-invariant mode: vLLM's path calls the same op there, and the mode only decides which kernel the op
reaches (cuBLASLt without split-K on SM 9.0+; vLLM 0.34's Triton ``aten::mm.dtype`` override on SM 8.x/ROCm);
docs/rl-bitwise.md has the measurements (issue #29).

``quantized_logits``: weight-only FP8 or INT8 (``quant.py``). e4m3 and int8 values convert exactly to bf16/fp16, so
the activation stays in its dtype, products accumulate in fp32 and the per-row scale is applied to the fp32 result;
one rounding at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_lmhead_quant.quant import dequantize_rows

# Vocab rows converted per step on the generic (non-Triton) path: bounds the transient to
# CHUNK_ROWS x hidden x 2 bytes (32 MiB at hidden 4096) instead of a full bf16 copy of the head.
CHUNK_ROWS = 4096
_HALF = (torch.bfloat16, torch.float16)


def fp32_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` with fp32 output from bf16/fp16 operands: the fused GEMM on CUDA/ROCm tensors, the
    exact upcast elsewhere (vLLM's ``head_dtype`` path makes the same choice, from the same facts)."""
    if x.is_cuda and x.dtype in _HALF and weight.dtype == x.dtype:
        two_d = x.dim() == 2  # vLLM's case: no reshapes (each costs ~2 us of host time per decode step)
        logits = torch.mm(x if two_d else x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)
        if bias is not None:
            logits = logits + bias.to(torch.float32)
        return logits if two_d else logits.reshape(*x.shape[:-1], -1)
    return F.linear(
        x.to(torch.float32),
        weight.to(torch.float32),
        bias.to(torch.float32) if bias is not None else None,
    )


def quantized_logits(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    kernel=None,
) -> torch.Tensor:
    """``(x @ dequant(q, scale).T (+ bias))`` with weight-only numerics (``q`` FP8 or INT8), in ``out_dtype``.

    CUDA with Triton: one fused kernel reads the quantized weight once (the fast path); ``kernel`` is that kernel
    bound to ``(q, scale)`` by :func:`bind_kernel` (the head's method keeps one): same results, less host time per
    call. Elsewhere: vocab chunks are converted to the activation dtype (exact) and multiplied with fp32
    accumulation; never a full copy.
    """
    out_dtype = out_dtype or x.dtype
    if x.is_cuda:
        from vllm_lmhead_quant.kernels import weight_only

        try:
            if kernel is not None and bias is None and x.dtype in _HALF:
                return kernel(x, out_dtype)
            if weight_only.is_supported(x):  # keeps x's leading dims
                if bias is None:
                    return weight_only.weight_only_mm(x, q, scale, out_dtype)
                out = weight_only.weight_only_mm(x, q, scale, torch.float32)
                return (out + bias.to(torch.float32)).to(out_dtype)
        except weight_only.KernelUnavailable:  # did not compile here (logged once): the generic path from now on
            pass
    return chunked_logits(x, q, scale, bias, out_dtype=out_dtype)


def bind_kernel(q: torch.Tensor, scale: torch.Tensor):
    """The fused kernel bound to this quantized weight (``weight_only.BoundKernel``), or None where it does not run
    (no GPU, no Triton, no kernel path for the device, a kernel that failed to compile there)."""
    if not q.is_cuda:
        return None
    from vllm_lmhead_quant.kernels import weight_only

    return weight_only.BoundKernel.bind(q, scale)


def chunked_logits(x, q, scale, bias=None, *, out_dtype: torch.dtype) -> torch.Tensor:
    """The generic path: ``CHUNK_ROWS`` vocab rows at a time converted to the activation dtype (exact) and multiplied
    with fp32 accumulation, the per-row scale applied to the fp32 result. Group scales (``scale [N, K/G]``) cannot
    be pulled out of the sum: their chunk is dequantized in fp32 (exact) and multiplied in fp32. Any device; never a
    full copy of the head."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], q.shape[0], dtype=out_dtype, device=x.device)
    for start in range(0, q.shape[0], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, q.shape[0])
        if scale.dim() == 2:
            part = F.linear(flat.float(), dequantize_rows(q[start:stop], scale[start:stop]))
        else:
            part = _mm_fp32(flat, q[start:stop].to(flat.dtype)) * scale[start:stop]
        if bias is not None:
            part = part + bias[start:stop].to(torch.float32)
        out[:, start:stop] = part
    return out.reshape(*x.shape[:-1], -1)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` accumulated and returned in fp32 (no fp32 copy of b on CUDA)."""
    if a.is_cuda and a.dtype in _HALF:
        return torch.mm(a, b.t(), out_dtype=torch.float32)
    return F.linear(a.float(), b.float())


# The generic path's decode time relative to the bf16 head, measured (docs/bench/kernel_paths.md): what the start-up
# log line quotes where the fused kernel does not run.
GENERIC_COST = {
    "cuda": "7-12x the bf16 head's decode time at hidden 4096 and 14-30x at hidden 1024 (measured on an H200)",
    "cpu": "3-80x the bf16 head's time (measured on 2 CPU cores, vocab 49152-151936; FP8 is the slowest)",
}


def head_path(device: torch.device, q_dtype: torch.dtype, group_size: int | None = None) -> tuple[int, str]:
    """(log level, one line): how a quantized head on ``device`` runs, and what it costs where that is slower than
    the bf16 head. Said once per engine at start-up, so a slow path is never silent. ``group_size``: group scales,
    which the fused kernel applies to each weight tile before the MMA."""
    import logging

    from vllm_lmhead_quant.kernels import device as kdevice

    # The generic path's GEMM per chunk is vLLM's fp32 GEMM of the device (upcast on CPU, mm out_dtype on GPUs
    # without a kernel path): its rows depend on the batch size on CPU, and nobody measured it on those GPUs.
    bi = BI_GENERIC if kdevice.batch_invariant_mode() else ""
    if device.type != "cuda":
        return logging.WARNING, (
            f"on {device.type.upper()} the head converts {CHUNK_ROWS}-row chunks of the one-byte weight per call: "
            f"{GENERIC_COST['cpu']}. It saves memory, not time; the fast path needs a GPU{bi}"
        )
    from vllm_lmhead_quant.kernels import weight_only

    index = device.index if device.index is not None else torch.cuda.current_device()
    path = kdevice.device_path(index) if weight_only.HAS_TRITON else None
    if path is None:
        facts = kdevice.facts(index)
        why = "Triton is not installed" if not weight_only.HAS_TRITON else f"SM {facts.capability} has no kernel path"
        return logging.WARNING, (
            f"{why} on {facts.name}: the head converts {CHUNK_ROWS}-row chunks of the one-byte weight per call, "
            f"{GENERIC_COST['cuda']}. Use bf16_last_layer_fp32 or no flag there unless memory is what you need{bi}"
        )
    line = f"fused weight-only kernel, {path.describe(weight_only._FORMAT_OF.get(q_dtype))}"
    if group_size:
        line += f"; fp16 scales per {group_size} weights, applied to each weight tile in fp16 before the MMA"
    if q_dtype == torch.float8_e4m3fn and not path.fp8_convert:
        return logging.WARNING, f"{line}. {FP8_BITS_COST}"
    return logging.INFO, line


BI_GENERIC = ". Under vLLM's batch-invariant mode this path is not guaranteed batch invariant (the fused kernel is)"

# The FP8 bit-decoding path against the bf16 head at decode (M <= 64), measured with that path forced on an H200
# (docs/bench/kernel_paths.md); an A100 has less bandwidth per integer op, so its own ratio is likely lower.
FP8_BITS_COST = (
    "Without an e4m3 convert instruction the FP8 head decodes its bytes: 0.77-0.89x the bf16 head's decode time at "
    "hidden 4096 but 0.96-1.27x at hidden 1024 (H200, this path forced). int8_lm_head needs no FP8 hardware, is "
    "faster here (0.66-0.79x at hidden 4096) and 4-5x more accurate"
)
