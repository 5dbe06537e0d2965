"""Trainer twin of ``bf16_last_layer_fp32``: the RL trainer's LM head with the rollout engine's numerics.

Why: in RL the loss weights each token by the importance ratio ``exp(logp_train - logp_infer)``. With the
plugin the inference engine computes its logits as an fp32 product of the bf16 head weight and the bf16 hidden
state; a trainer whose head runs in bf16 rounds every logit to 8 significant bits instead (about 0.01 nats at
logit 5), and that rounding noise goes straight into the ratios (prime-rl's "mismatch KL", prime-rl #2441).
Computing the trainer's head with the *same* operation (``ops.fp32_logits``, the code the vLLM method runs)
removes the head's share of the mismatch; what is left comes from the two engines' model bodies.

The gradient contract is the one Fast-LLM #526 had to restore by hand (a detached fp32 weight copy plus a
manual accumulation into the bf16 param's grad buffer): here :class:`FP32Head` is an autograd function whose
backward returns ``grad_weight`` in the weight's own dtype, so the bf16 ``Parameter`` gets an ordinary bf16
``.grad`` that FSDP/DDP reduce like any other, and no fp32 copy of the weight outlives a call.

Numerics (``N`` tokens, ``H`` hidden, ``V`` vocab, ``g`` the fp32 logits gradient):

* forward: ``ops.fp32_logits`` (bf16 x bf16 -> fp32 GEMM on CUDA/ROCm; exact upcast elsewhere). Products of two
  bf16 values are exact in fp32, so the only error is fp32 accumulation.
* backward, CPU (and dtype mixes the fused GEMM does not take): ``g @ W`` and ``g.T @ x`` in fp32 with the
  operands upcast per vocab chunk (exact), then one rounding to the parameter/activation dtype.
* backward, CUDA: ``g`` is split into ``hi + lo`` in the operand dtype (``hi = g.to(bf16)``,
  ``lo = (g - hi).to(bf16)``; residual <= 2^-16 |g| for bf16), and both halves go through the same
  bf16 x bf16 -> fp32 GEMM as the forward, so tensor cores do the work and the weight is never upcast. For fp16
  the chunk is first scaled by a power of two so that small gradients do not underflow fp16's range.
  The result is then rounded once to the parameter/activation dtype, as on CPU.

Bitwise twin (``batch_invariant=True``, issue #29): an engine under vLLM's batch-invariant mode
(``VLLM_BATCH_INVARIANT=1``) computes each token's logits with bits that do not depend on the batch. The forward
here is already the engine's op; what can still differ is the kernel the op reaches, which vLLM's mode sets
process-wide (cuBLASLt without split-K on SM 9.0+, vLLM 0.34's Triton ``aten::mm.dtype`` kernel on SM 8.x/ROCm).
With the same mode on in the trainer process, the twin's logits for a hidden state are the engine's bits, whatever
the two batch sizes; the option checks that the mode is on and refuses to run otherwise (docs/rl-bitwise.md). On
CPU there is no such mode: the twin equals the engine only for the same batch, and says so once.

No vLLM import at module level: this module runs in the trainer process (only ``batch_invariant=True`` on a GPU
imports vLLM, to check its mode). ``transformers`` is not imported either; the HF helpers only use
``get_output_embeddings()``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from vllm_lmhead_quant.ops import fp32_logits

__all__ = [
    "BACKWARD_CHUNK_ROWS",
    "FP32Head",
    "FP32Linear",
    "FP32LMHeadMixin",
    "check_batch_invariant",
    "disable_fp32_lm_head",
    "enable_fp32_lm_head",
    "fp32_lm_head_logits",
    "logprob_mismatch",
    "token_logprobs",
]

# Vocab rows per backward step: bounds the transients (an fp32 [rows, H] slice of grad_weight, the split or upcast
# [N, rows] gradient and, on CPU, an fp32 [rows, H] slice of the weight) instead of full V x H fp32 tensors.
BACKWARD_CHUNK_ROWS = 8192
_HALF_TYPES = (torch.bfloat16, torch.float16)
# fp16 split: scale the gradient chunk so its largest entry is below 2^15 (fp16 max is 65504); see _split.
_FP16_TOP_EXPONENT = 15


class FP32Head(torch.autograd.Function):
    """``x @ weight.T (+ bias)`` -> fp32 logits from bf16/fp16 operands; gradients in the operands' dtypes.

    Saves ``x`` and ``weight`` as they are (no fp32 copies). ``bias`` gets its gradient in its own dtype.
    Autocast is switched off inside: under ``torch.autocast`` the logits stay fp32 (with fp32 master weights the
    weight is then used as is, which matches a bf16 rollout engine only if that engine holds the same values).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        with _no_autocast(x):
            return fp32_logits(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        flat_x = x.reshape(-1, x.shape[-1])
        flat_g = grad.reshape(-1, grad.shape[-1]).to(torch.float32)
        split = x.is_cuda and x.dtype in _HALF_TYPES and weight.dtype == x.dtype
        with _no_autocast(x):
            grad_x, grad_w = _head_backward(flat_g, flat_x, weight, need_x=need_x, need_w=need_w, split=split)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        grad_b = flat_g.sum(0).to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return grad_x, grad_w, grad_b


def fp32_lm_head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, batch_invariant: bool = False
) -> torch.Tensor:
    """Functional form of :class:`FP32Head`: fp32 logits ``[..., V]`` from ``hidden [..., H]`` and ``weight [V, H]``.

    Without autograd in play (``torch.no_grad()`` or nothing requiring grad) this is ``ops.fp32_logits`` itself.
    ``batch_invariant=True``: the bits of an engine under vLLM's batch-invariant mode, checked
    (:func:`check_batch_invariant`).
    """
    if batch_invariant:
        check_batch_invariant(hidden, weight)
    if torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return FP32Head.apply(hidden, weight, bias)
    with _no_autocast(hidden):
        return fp32_logits(hidden, weight, bias)


def check_batch_invariant(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise unless this head GEMM reaches the kernel of an engine under vLLM's batch-invariant mode.

    GPU: vLLM's batch-invariant mode must be on in this process (its cuBLAS set-up is read when cuBLAS first runs,
    so before the trainer's first GEMM), and the operands must be the engine's (bf16/fp16, one dtype). CPU: no such
    mode exists; a warning says the bits match the engine's only for the same batch.
    """
    if not (hidden.dtype in _HALF_TYPES and weight.dtype == hidden.dtype):
        raise TypeError(
            f"batch_invariant=True reproduces an engine whose head multiplies its bf16/fp16 weight; got hidden "
            f"{hidden.dtype} and weight {weight.dtype}. Run the head on the weight in the engine's dtype (e.g. FSDP "
            "mixed precision's param_dtype) and without autocast changing it"
        )
    if not hidden.is_cuda:
        warnings.warn(NO_CPU_MODE, RuntimeWarning, stacklevel=3)
        return
    from vllm_lmhead_quant import _compat

    if not _compat.batch_invariant_mode_active():
        raise RuntimeError(NEEDS_MODE)


NO_CPU_MODE = (
    "batch_invariant=True on CPU: vLLM has no batch-invariant mode there, so the head equals the engine's bits only "
    "for the same batch of tokens (CPU GEMM rows change with the batch size)"
)
NEEDS_MODE = (
    "batch_invariant=True needs vLLM's batch-invariant mode on in this trainer process, as in the engine, or the "
    "head GEMM may reach another cuBLAS kernel than the engine's. Switch it on before the first GEMM: "
    "os.environ['VLLM_BATCH_INVARIANT'] = '1', then init_batch_invariance() from vLLM's batch_invariant module "
    "(vllm.model_executor.determinism on vLLM >= 0.30, vllm.model_executor.layers on 0.26), with the engine's torch "
    "and vLLM versions (docs/rl-bitwise.md)"
)


def _no_autocast(x: torch.Tensor):
    """Autocast would run the upcast ``F.linear`` (or the fused GEMM) in bf16 again and return bf16 logits."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _head_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *, need_x: bool, need_w: bool, split: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``grad @ W`` and ``grad.T @ x`` accumulated in fp32, rounded once to ``x.dtype`` / ``weight.dtype``.

    ``grad`` is fp32 ``[N, V]``, ``x`` is ``[N, H]``. ``split=True`` is the CUDA path (hi/lo halves through
    ``fp32_logits``'s fused GEMM); on CPU it runs the same arithmetic with exact upcasts, which is how the tests
    check it.
    """
    n_tokens, vocab = grad.shape
    grad_x = torch.zeros(n_tokens, x.shape[1], dtype=torch.float32, device=x.device) if need_x else None
    grad_w = torch.empty_like(weight) if need_w else None
    x_t = x.t()
    for start in range(0, vocab, BACKWARD_CHUNK_ROWS):
        stop = min(start + BACKWARD_CHUNK_ROWS, vocab)
        w_chunk = weight[start:stop]
        parts, inv_scale = _split(grad[:, start:stop], x.dtype) if split else ((grad[:, start:stop],), None)
        # fp32_logits(a, b) = a @ b.T with fp32 output: the forward's GEMM (fused on CUDA, exact upcast elsewhere).
        if need_x:
            part_x = sum(fp32_logits(p, w_chunk.t()) for p in parts)
            grad_x += part_x if inv_scale is None else part_x * inv_scale
        if need_w:
            part_w = sum(fp32_logits(p.t(), x_t) for p in parts)
            grad_w[start:stop] = part_w if inv_scale is None else part_w * inv_scale
    return (grad_x.to(x.dtype) if need_x else None), grad_w


def _split(g: torch.Tensor, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """``g ~= (hi + lo) * inv_scale`` with ``hi``, ``lo`` in ``dtype`` (bf16/fp16), for the fused fp32-output GEMM.

    bf16 has fp32's exponent range, so no scale: |g - hi - lo| <= 2^-16 |g| (plus fp32-subnormal effects).
    fp16's range is narrow (normals from 2^-14): the chunk is multiplied by ``2^(15 - e)``, with ``e`` the exponent
    of its largest entry, which is exact, keeps every entry below 2^15, and moves small gradients out of the
    underflow range; the GEMM results are multiplied back by the inverse (exact, a power of two).
    """
    inv_scale = None
    if dtype == torch.float16:
        exponent = torch.frexp(g.abs().amax()).exponent.clamp(-100, 100).to(torch.float32)  # no host sync
        g = g * torch.exp2(_FP16_TOP_EXPONENT - exponent)
        inv_scale = torch.exp2(exponent - _FP16_TOP_EXPONENT)
    hi = g.to(dtype)
    lo = (g - hi.to(torch.float32)).to(dtype)
    return (hi, lo), inv_scale


class FP32LMHeadMixin:
    """Mixed into the class of one ``nn.Linear`` head instance by :func:`enable_fp32_lm_head`: fp32 logits."""

    fp32_batch_invariant = False  # set per instance by enable_fp32_lm_head(..., batch_invariant=True)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fp32_lm_head_logits(input, self.weight, self.bias, batch_invariant=self.fp32_batch_invariant)


_SUBCLASSES: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    """One ``FP32<cls>`` subclass per head class, reused so pickling and isinstance checks stay stable."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"FP32{cls.__name__}", (FP32LMHeadMixin, cls), {"__module__": __name__})
        _SUBCLASSES[cls] = sub
    return sub


# The common case defined at import time, so that pickling a model with a swapped nn.Linear head works.
FP32Linear = _fp32_class(nn.Linear)


def _head(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else model
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}: the output embedding is {type(head).__name__}, not an nn.Linear; "
            "use fp32_lm_head_logits(hidden, weight) where this model computes its logits"
        )
    return head


def enable_fp32_lm_head(model: nn.Module, *, batch_invariant: bool = False) -> nn.Module:
    """Make a Hugging Face causal LM's head return fp32 logits from its bf16 weight, in place; returns ``model``.

    Only that one module instance changes: its class becomes ``FP32<its class>`` (a subclass whose ``forward`` is
    :func:`fp32_lm_head_logits`). Nothing in ``transformers`` is patched, so other models in the process are
    untouched, and the parameters are not copied or cast: a tied head keeps sharing the very ``Parameter`` of the
    input embedding, optimizers and FSDP see the same tensors, and RL weight syncs need no refresh. Calling it
    twice is a no-op; :func:`disable_fp32_lm_head` undoes it. ``model`` may also be the ``nn.Linear`` head itself.

    The model's later ops (soft-capping, logit scaling, the HF loss, which upcasts anyway) then run on fp32 logits.

    ``batch_invariant=True``: the head reproduces the bits of an engine running under vLLM's batch-invariant mode
    for the same hidden states, and each forward checks that this process runs that mode too
    (:func:`check_batch_invariant`). Calling it again sets the option anew.
    """
    head = _head(model)
    if not isinstance(head, FP32LMHeadMixin):
        head.__class__ = _fp32_class(type(head))
    head.fp32_batch_invariant = batch_invariant
    return model


def disable_fp32_lm_head(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fp32_lm_head` (no-op if it was not applied); returns ``model``."""
    head = _head(model)
    if isinstance(head, FP32LMHeadMixin):
        head.__class__ = next(c for c in type(head).__mro__[1:] if not issubclass(c, FP32LMHeadMixin))
        head.__dict__.pop("fp32_batch_invariant", None)
    return model


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., tokens]`` in fp32: a trainer's logprob of each actual/sampled token.

    ``logits[..., t, :]`` must be the prediction for ``tokens[..., t]`` (shift by one for next-token logits).
    """
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logprob_mismatch(logp_infer, logp_train) -> dict[str, float]:
    """Trainer/inference disagreement on the same tokens, in nats.

    ``r = logp_infer - logp_train`` per token; returns RMS(r), max |r|, the Pearson correlation of the two
    logprob series, and ``k3 = mean(exp(-r) - 1 + r)``: the "mismatch KL" of RL stacks, Schulman's k3 estimator of
    KL(infer || train) = E_infer[log infer - log train] on tokens sampled from the inference engine. With the ratio
    rho = train / infer = exp(-r), k3 = (rho - 1) - log rho: unbiased (E_infer[rho] = 1) and >= 0, about
    mean(r^2)/2 for small r. (Until 2026-11-30 this read mean(exp(r) - 1 - r), the estimator of the reverse KL.)
    """
    infer = torch.as_tensor(logp_infer, dtype=torch.float64).flatten()
    train = torch.as_tensor(logp_train, dtype=torch.float64).flatten()
    r = infer - train
    pearson = torch.corrcoef(torch.stack([infer, train]))[0, 1].item() if r.numel() > 1 else math.nan
    return {
        "n": r.numel(),
        "rms": r.square().mean().sqrt().item(),
        "max_abs": r.abs().max().item(),
        "pearson": pearson,
        "k3": (torch.expm1(-r) + r).mean().item(),
    }
