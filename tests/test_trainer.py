"""The trainer twin (vllm_lmhead_quant.trainer): fp64-referenced numerics, the HF head swap, and the cross-engine check.

Error bounds (u = unit roundoff of the output dtype: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32; eta = u * smallest normal,
half the subnormal spacing; K = length of the sum):

* forward: the products of bf16/fp16 operands are exact in fp32, so the only error is fp32 accumulation:
  |y - y64| <= gamma_K * (|x| @ |W|.T + |b|), gamma_K = (K + 2) * 2^-24 (K = H; +2 for the bias add and the
  final rounding).
* gradients (fp32 accumulation, then one rounding to the parameter/activation dtype):
  |g - g64| <= u * |g64| + eta + (gamma_K + s) * (|grad| @ |W| or |grad|.T @ |x|), K = V or N; s = 0 for the
  upcast path and s = 4 u^2 (the hi/lo split's residual, u of the operand dtype) for the CUDA path.
  The leading term u * |g64| is the final rounding: the gradients are as good as their dtype allows.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vllm_lmhead_quant import ops, trainer
from vllm_lmhead_quant.trainer import (
    FP32Head,
    disable_fp32_lm_head,
    enable_fp32_lm_head,
    fp32_lm_head_logits,
    logprob_mismatch,
    token_logprobs,
)

DTYPES = [torch.bfloat16, torch.float16]
SHAPES = {"2d": (13,), "3d": (3, 5)}  # leading dims of x; H and V below
H, V = 96, 300
FP32_U = 2.0**-24


def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _eta(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).smallest_normal * _u(dtype)


def _case(dtype, lead, bias, seed=0):
    """bf16/fp16 operands and an upstream gradient shaped like a cross-entropy one (softmax - onehot) / N."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) * 0.1).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype) if bias else None
    logits = F.linear(x.double(), w.double(), b.double() if bias else None)
    target = torch.randint(0, V, lead, generator=gen)
    n = math.prod(lead)
    grad = ((logits.softmax(-1) - F.one_hot(target, V)) / n).float()
    return x, w, b, grad


def _reference(x, w, b, grad):
    """torch.autograd on float64 copies: the exact answer for these operands."""
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    y64 = F.linear(x64, w64, b64)
    y64.backward(grad.double())
    return y64.detach(), x64.grad, w64.grad, (b64.grad if b is not None else None)


def _check_grad(got, ref, dtype, scale, k, split=False):
    """Elementwise: |got - ref| <= u |ref| + eta + (gamma_K + s) * scale. Returns the fraction correctly rounded."""
    assert got.dtype == dtype
    u = _u(dtype)
    s = 4 * _u(dtype) ** 2 if split else 0.0
    bound = u * ref.abs() + _eta(dtype) + ((k + 2) * FP32_U + s) * scale
    err = (got.double() - ref).abs()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g}"
    return (got == ref.to(dtype)).double().mean().item()


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """V = 300 over chunks of 128 rows: the backward's vocab loop runs three times, the last one partial."""
    monkeypatch.setattr(trainer, "BACKWARD_CHUNK_ROWS", 128)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_forward_and_grads_vs_fp64(dtype, shape, bias):
    x, w, b, grad = _case(dtype, SHAPES[shape], bias)
    y64, gx64, gw64, gb64 = _reference(x, w, b, grad)

    x_ = x.clone().requires_grad_()
    w_ = nn.Parameter(w.clone())
    b_ = nn.Parameter(b.clone()) if bias else None
    y = fp32_lm_head_logits(x_, w_, b_)
    assert y.dtype == torch.float32 and y.shape == (*SHAPES[shape], V)
    # Same op as the vLLM method (bitwise), and within fp32 accumulation error of the exact product.
    assert torch.equal(y.detach(), ops.fp32_logits(x, w, b))
    magnitude = F.linear(x.double().abs(), w.double().abs(), b.double().abs() if bias else None)
    fwd = ((y.double() - y64).abs() / magnitude).max().item()
    assert fwd <= (H + 2) * FP32_U, fwd

    y.backward(grad)
    g = grad.double().reshape(-1, V)
    exact = [
        _check_grad(x_.grad, gx64, dtype, (g.abs() @ w.double().abs()).reshape(x.shape), V),
        _check_grad(w_.grad, gw64, dtype, g.abs().t() @ x.double().abs().reshape(-1, H), g.shape[0]),
    ]
    if bias:
        exact.append(_check_grad(b_.grad, gb64, dtype, g.abs().sum(0), g.shape[0]))
    # Away from rounding ties the result *is* the correctly rounded fp64 gradient.
    assert min(exact) > 0.99, exact


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_split_path_arithmetic(dtype):
    """The CUDA backward (hi/lo split through the fused GEMM), run here with exact upcasts: same bounds + 4u^2."""
    x, w, _, grad = _case(dtype, (17,), False, seed=1)
    _, gx64, gw64, _ = _reference(x, w, None, grad)
    gx, gw = trainer._head_backward(grad, x, w, need_x=True, need_w=True, split=True)
    g = grad.double()
    assert _check_grad(gx, gx64, dtype, g.abs() @ w.double().abs(), V, split=True) > 0.99
    assert _check_grad(gw, gw64, dtype, g.abs().t() @ x.double().abs(), g.shape[0], split=True) > 0.99


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("magnitude", [1.0, 2.0**-30], ids=["unit", "tiny"])
def test_split_residual(dtype, magnitude):
    """hi + lo reproduces the fp32 gradient to 2^-16 (bf16) / 2^-22 (fp16) relative, tiny fp16 values included."""
    g = torch.randn(64, 200, generator=torch.Generator().manual_seed(2)) * magnitude
    (hi, lo), inv_scale = trainer._split(g, dtype)
    assert hi.dtype == lo.dtype == dtype
    back = hi.double() + lo.double()
    if inv_scale is not None:
        back = back * inv_scale.double()
    assert ((back - g.double()).abs() <= 4 * _u(dtype) ** 2 * g.double().abs()).all()


def test_bf16_weight_grad_accumulates_over_two_backwards():
    x1, w, _, g1 = _case(torch.bfloat16, (7,), False, seed=3)
    x2, _, _, g2 = _case(torch.bfloat16, (7,), False, seed=4)
    single = []
    for x, g in ((x1, g1), (x2, g2)):
        p = nn.Parameter(w.clone())
        fp32_lm_head_logits(x, p).backward(g)
        single.append(p.grad)
    p = nn.Parameter(w.clone())
    fp32_lm_head_logits(x1, p).backward(g1)
    fp32_lm_head_logits(x2, p).backward(g2)
    assert p.grad.dtype == torch.bfloat16  # a normal bf16 grad: FSDP/DDP reduce it like any other
    assert torch.equal(p.grad, single[0] + single[1])


def test_saves_no_fp32_copies():
    x, w, b, grad = _case(torch.bfloat16, (4, 3), True)
    saved = []
    w_ = nn.Parameter(w)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = FP32Head.apply(x.requires_grad_(), w_, nn.Parameter(b))
    assert [t.dtype for t in saved] == [torch.bfloat16, torch.bfloat16]
    assert any(t is w_ for t in saved)  # the parameter itself, not a copy
    y.backward(grad)


def test_autocast_keeps_fp32_logits():
    x, w, _, _ = _case(torch.bfloat16, (5,), False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp32_lm_head_logits(x, nn.Parameter(w))
    assert y.dtype == torch.float32
    assert torch.equal(y.detach(), ops.fp32_logits(x, w))


def test_frozen_head_and_no_grad_paths():
    x, w, _, grad = _case(torch.bfloat16, (5,), False)
    x_ = x.clone().requires_grad_()
    fp32_lm_head_logits(x_, w).backward(grad)  # weight needs no grad: only grad_x
    assert x_.grad.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(fp32_lm_head_logits(x, nn.Parameter(w)), ops.fp32_logits(x, w))


def test_logprob_mismatch_metrics():
    m = logprob_mismatch([-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0])
    assert m["rms"] == m["max_abs"] == m["k3"] == 0.0 and m["pearson"] == pytest.approx(1.0)
    r = torch.tensor([0.1, -0.2], dtype=torch.float64)
    m = logprob_mismatch(r - 1, [-1.0, -1.0])
    assert m["k3"] == pytest.approx((torch.exp(-r) - 1 + r).mean().item(), rel=1e-6)
    assert m["rms"] == pytest.approx(math.sqrt(0.025), rel=1e-6)


def test_k3_estimates_kl_infer_train_on_engine_samples():
    """k3 on tokens sampled from the inference distribution converges to KL(infer || train), computed directly on
    a small discrete distribution (and not to the reverse KL, which the pre-2026-11-30 formula estimated)."""
    infer = torch.tensor([0.70, 0.20, 0.05, 0.05], dtype=torch.float64)
    train = torch.tensor([0.40, 0.30, 0.20, 0.10], dtype=torch.float64)
    kl_infer_train = (infer * (infer / train).log()).sum().item()  # 0.2067...
    kl_train_infer = (train * (train / infer).log()).sum().item()  # 0.2444...
    samples = torch.multinomial(infer, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    m = logprob_mismatch(infer.log()[samples], train.log()[samples])
    # Standard error of the mean here is ~0.0006; the two KLs differ by 0.038.
    assert m["k3"] == pytest.approx(kl_infer_train, abs=0.004)
    assert abs(m["k3"] - kl_train_infer) > 0.03
    # Exactly: the expectation of k3 under infer is KL(infer || train).
    r = infer.log() - train.log()
    assert (infer * (torch.exp(-r) - 1 + r)).sum().item() == pytest.approx(kl_infer_train, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# Hugging Face models
# ------------------------------------------------------------------------------------------------------------------


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_enable_on_hf_llama(tiny, tied):
    model = _hf(tiny("llama", tied=tied))
    head = model.get_output_embeddings()
    weight, embed = head.weight, model.get_input_embeddings().weight
    assert (weight is embed) is tied
    ids = torch.randint(3, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
    assert plain.dtype == torch.bfloat16

    assert enable_fp32_lm_head(model) is model
    enable_fp32_lm_head(model)  # idempotent
    assert type(head).__name__ == "FP32Linear" and isinstance(head, nn.Linear)
    assert model.get_output_embeddings() is head and head.weight is weight  # no copy, no cast
    assert (model.get_input_embeddings().weight is weight) is tied and weight.dtype == torch.bfloat16
    assert list(model.state_dict()) == list(_hf(tiny("llama", tied=tied)).state_dict())

    seen = {}
    hook = head.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    out = model(ids, labels=ids)
    hook.remove()
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.logits.detach(), ops.fp32_logits(seen["x"].detach(), weight.detach()))
    # Same model, better-rounded logits: within bf16 rounding of the bf16 head's.
    assert (out.logits.detach() - plain.float()).abs().max() <= 2**-8 * plain.float().abs().max()

    out.loss.backward()
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16 and weight.grad.isfinite().all()
    if tied:  # one Parameter, one .grad holding both the head's and the embedding lookup's contributions
        assert model.get_input_embeddings().weight.grad is weight.grad

    # Round trips: copy and pickle keep the head class, disable restores nn.Linear and bf16 logits.
    assert type(copy.deepcopy(head)) is type(head) and type(pickle.loads(pickle.dumps(head))) is type(head)
    disable_fp32_lm_head(disable_fp32_lm_head(model))
    assert type(head) is nn.Linear and head.weight is weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


def test_enable_rejects_non_linear_head():
    class NoLinear(nn.Module):
        def get_output_embeddings(self):
            return nn.Embedding(4, 4)

    with pytest.raises(TypeError, match="not an nn.Linear"):
        enable_fp32_lm_head(NoLinear())


# ------------------------------------------------------------------------------------------------------------------
# Cross-engine: the twin on transformers vs the plugin on vLLM, next to the bf16/bf16 pair
# ------------------------------------------------------------------------------------------------------------------


def _vllm_prompt_logprobs(path, sequences, **kwargs):
    """vLLM's logprob of each actual token (positions 1..T-1) of each sequence, from prompt_logprobs=0."""
    import gc

    from helpers import ENGINE_ARGS
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), **{**ENGINE_ARGS, **kwargs})
    try:
        rollouts = None
        if sequences is None:  # RL rollouts: sample continuations of the test prompts from this engine
            from helpers import PROMPTS

            params = SamplingParams(max_tokens=48, temperature=1.0, seed=0, n=2, ignore_eos=True)
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            sequences = [list(o.prompt_token_ids) + list(c.token_ids) for o in outs for c in o.outputs]
            rollouts = sequences
        # prompt_logprobs=0: vLLM returns one dict per position holding the actual prompt token's logprob.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    logprobs = [[step[tok].logprob for step, tok in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outs, sequences)]
    return rollouts, logprobs


def _hf_logprobs(model, sequences):
    with torch.no_grad():
        return [
            token_logprobs(model(torch.tensor([s])).logits[0, :-1], torch.tensor(s[1:])).tolist() for s in sequences
        ]


def _flat(rows):
    return [v for row in rows for v in row]


# The default tiny llama has flat logits (std 0.9, top-1 probability ~1%), so bf16 head rounding is small there;
# head_std=0.3 gives logits at a real LM's scale (std 3.4, max 16, top-1 ~0.3), where the head's share is visible.
CHECKPOINTS = {"llama": {}, "llama-head_std0.3": {"head_std": 0.3}}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def cross_engine(request, tiny):
    """Rollouts sampled by the plugin's engine, scored by both vLLM heads and both trainer heads (2 engines)."""
    path = tiny("llama", tied=False, **CHECKPOINTS[request.param])
    sequences, infer_fp32 = _vllm_prompt_logprobs(path, None, quantization="bf16_last_layer_fp32")
    _, infer_bf16 = _vllm_prompt_logprobs(path, sequences)
    model = _hf(path)
    train_bf16 = _hf_logprobs(model, sequences)
    train_fp32 = _hf_logprobs(enable_fp32_lm_head(model), sequences)
    infer_fp32, infer_bf16, train_fp32, train_bf16 = map(_flat, (infer_fp32, infer_bf16, train_fp32, train_bf16))
    return request.param, {
        "fp32": logprob_mismatch(infer_fp32, train_fp32),  # the twin: plugin on vLLM vs fp32 head on transformers
        "bf16": logprob_mismatch(infer_bf16, train_bf16),  # the usual pair: bf16 heads on both sides
        # Decomposition: the head alone on one body (bf16 vs fp32 head), per engine.
        "head_only_vllm": logprob_mismatch(infer_bf16, infer_fp32),
        "head_only_hf": logprob_mismatch(train_bf16, train_fp32),
    }


@pytest.mark.engine
def test_cross_engine_mismatch(cross_engine, record_property):
    checkpoint, pairs = cross_engine
    for pair, m in pairs.items():
        for key, value in m.items():
            record_property(f"{checkpoint}:{pair}_{key}", value)
        print(
            f"\n{checkpoint} {pair:>14} ({m['n']} tokens): rms {m['rms']:.3e}  max|d| {m['max_abs']:.3e}  "
            f"pearson {m['pearson']:.9f}  k3 {m['k3']:.3e}"
        )
    fp32, bf16 = pairs["fp32"], pairs["bf16"]
    assert fp32["n"] == bf16["n"] > 200
    assert fp32["rms"] < bf16["rms"]
    assert fp32["k3"] < bf16["k3"]


# ------------------------------------------------------------------------------------------------------------------
# CUDA (skipped here; run on the GPU host): the fused path against the same fp64 bounds
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_fused_path_vs_fp64(dtype):
    x, w, b, grad = _case(dtype, (4, 9), True, seed=5)
    y64, gx64, gw64, gb64 = _reference(x, w, b, grad)
    dev = torch.device("cuda")
    x_ = x.to(dev).requires_grad_()
    w_ = nn.Parameter(w.to(dev))
    b_ = nn.Parameter(b.to(dev))
    y = fp32_lm_head_logits(x_, w_, b_)
    magnitude = F.linear(x.double().abs(), w.double().abs(), b.double().abs())
    assert ((y.detach().cpu().double() - y64).abs() / magnitude).max().item() <= (H + 2) * FP32_U
    y.backward(grad.to(dev))
    g = grad.double().reshape(-1, V)
    _check_grad(x_.grad.cpu(), gx64, dtype, (g.abs() @ w.double().abs()).reshape(x.shape), V, split=True)
    _check_grad(w_.grad.cpu(), gw64, dtype, g.abs().t() @ x.double().abs().reshape(-1, H), g.shape[0], split=True)
    _check_grad(b_.grad.cpu(), gb64, dtype, g.abs().sum(0), g.shape[0])
