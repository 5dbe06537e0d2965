"""Layer-level checks of the ways vLLM 0.34 builds, reloads or shares an LM head (issue #30), on its real code:
``get_top_tokens``/``get_top_k_tokens`` (in-place -inf masking), ``VLLM_RELOAD_MODE=direct``, the ``ipc_cache``
weight-cache loader, ``draft_lm_head_quantization``, pooling runners and the linear geometry of ``ParallelLMHead``.

Registered into ``vllm034_checks.CHECKS`` (run by that script inside ``.venv-vllm034``; tests/test_vllm034_paths.py
asserts on the JSON). Nothing here imports vLLM or the plugin at module level: the registration check must run
first, with nothing of ours imported.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import vllm034_checks as c

QUANTIZED = ("int8_lm_head", "fp8_lm_head")


@contextmanager
def _env(**values):
    """vLLM's own environment switches for one check (VLLM_RELOAD_MODE is read when it is used)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@contextmanager
def _lines():
    """Our log lines (the ``vllm.lmhead_quant`` logger) said inside the block; the once-per-layer memory is reset so
    a layer id reused by a new model is said again."""
    from vllm_lmhead_quant import _log

    said, records = set(_log._said), []
    _log._said.clear()
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("vllm.lmhead_quant")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        _log._said.clear()
        _log._said.update(said)


def _storages(module) -> list[tuple[int, int]]:
    """(start, end) byte ranges of every tensor the head keeps (parameters, buffers, plain tensor attributes)."""
    import torch

    tensors = [*module.parameters(), *module.buffers()]
    tensors += [v for v in vars(module.quant_method).values() if isinstance(v, torch.Tensor)]
    return [
        (t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()) for t in tensors
    ]


def _overlaps(t, ranges) -> bool:
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    return any(start < b and a < end for a, b in ranges)


@c.check
def top_tokens_inplace_mask() -> dict:
    """vLLM 0.34's ``LogitsProcessor.get_top_tokens``/``get_top_k_tokens`` (greedy drafting, top-k logprobs without
    an all-gather) write -inf *in place* into the head's output for the vocab padding rows (1000 -> 1024 here). Our
    ``apply`` must return a fresh tensor: nothing the head keeps is written, and later logits are unchanged."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    out = {}
    w, x = c.weights(30)
    for method in c.METHODS:
        vc = c.vllm_config(method)
        head = c.build_head(vc)
        c.load(vc, head, w)
        kept = {n: p.detach().clone() for n, p in head.named_parameters()}
        ranges = _storages(head)
        with set_current_vllm_config(vc):
            processor = LogitsProcessor(c.VOCAB)
            first = processor(head, x)
            raw = head.quant_method.apply(head, x)
            raw_again = head.quant_method.apply(head, x)
            top = processor.get_top_tokens(head, x)
            ids, values = processor.get_top_k_tokens(head, x, 5)
            ids_lp, logprobs = processor.get_top_k_tokens(head, x, 5, return_log_probs=True)
            second = processor(head, x)
        ref = first.topk(5, dim=-1)
        out[method] = {
            "padding_columns": int(raw.shape[-1] - c.VOCAB),
            "output_aliases_kept_tensor": _overlaps(raw, ranges),
            "outputs_distinct": raw.untyped_storage().data_ptr() != raw_again.untyped_storage().data_ptr(),
            "top_equals_argmax": bool(torch.equal(top, first.argmax(dim=-1))),
            "top_k_ids_equal": bool(torch.equal(ids, ref.indices)),
            "top_k_values_equal": bool(torch.equal(values, ref.values.float())),
            "top_k_logprobs_equal": bool(
                torch.equal(ids_lp, ref.indices)
                and torch.allclose(logprobs, torch.log_softmax(first.float(), -1).gather(-1, ref.indices), atol=1e-5)
            ),
            "parameters_unchanged": all(torch.equal(kept[n], p) for n, p in head.named_parameters()),
            "logits_unchanged_after": bool(torch.equal(first, second)),
            "no_inf_in_later_logits": bool(torch.isfinite(second).all()),
        }
    return out


def _update_states(path: str, count: int):
    """``count`` RL-style weight updates of a checkpoint: every tensor perturbed by a fresh seeded amount. A head the
    checkpoint ships equal to the embeddings (a tied model's) stays equal to them, as a trainer of that model sends
    it."""
    import torch
    from safetensors.torch import load_file

    base = load_file(str(Path(path) / "model.safetensors"))
    tied = "lm_head.weight" in base and torch.equal(base["lm_head.weight"], base["model.embed_tokens.weight"])
    for step in range(count):
        gen = torch.Generator().manual_seed(100 + step)
        state = {k: (v.float() + 0.02 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
                 for k, v in base.items()}  # fmt: skip
        if tied:
            state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        yield state


def _write_checkpoint(src: str, state: dict, name: str) -> str:
    import shutil

    from safetensors.torch import save_file

    dst = c._TMP / name
    dst.mkdir(exist_ok=True)
    shutil.copy(Path(src) / "config.json", dst / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


@c.check
def direct_reload() -> dict:
    """``VLLM_RELOAD_MODE=direct`` (vLLM 0.34, what its NCCL weight transfer requires): vLLM records every checkpoint
    tensor before post-load processing and, per update, views its storage back to that layout
    (``begin_direct_reload``), lets the checkpoint loaders write it (``model.load_weights``) and reruns the
    processing (``finish_direct_reload``). 10 full updates; then the logits and the quantized head must be bitwise
    those of a fresh model loaded from the final weights (under direct and under the default layerwise mode)."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.direct import begin_direct_reload, finish_direct_reload

    out = {}
    cases = (*(("llama_untied", m) for m in c.METHODS), ("qwen3_tied", "int8_lm_head+quantize"),
             ("qwen3_tied_lm_head_in_checkpoint", "int8_lm_head+quantize"))  # fmt: skip
    for case, method in cases:
        path, _ = c._checkpoint(case)
        with _env(VLLM_RELOAD_MODE="direct"), _lines() as lines:
            vc, model, _, hidden = _load(path, method)
            head = model.lm_head
            weight, ptr = head.weight, head.weight.data_ptr()
            storage_bytes = head.weight.untyped_storage().nbytes()
            last = None
            for last in _update_states(path, 10):
                begin_direct_reload(model)
                model.load_weights(iter(last.items()))
                finish_direct_reload(model, vc.model_config, torch.device("cpu"))
            with set_current_vllm_config(vc):
                got = model.compute_logits(hidden)
            final = _write_checkpoint(path, last, f"direct-final-{case}-{method}")
            fresh_logits = _load(final, method)[2]
        _, fresh_layerwise, layerwise_logits, _ = _load(final, method)
        cell = {
            "same_parameter": head.weight is weight,
            "same_address": head.weight.data_ptr() == ptr,
            "weight_dtype": str(head.weight.dtype),
            "storage_bytes": storage_bytes,
            "storage_bytes_after": head.weight.untyped_storage().nbytes(),
            "bitwise_equal_fresh_direct": bool(torch.equal(got, fresh_logits)),
            "bitwise_equal_fresh_layerwise": bool(torch.equal(got, layerwise_logits)),
            "lines": [m for m in lines if "-> " in m],
        }
        if method != "bf16_last_layer_fp32":
            fresh_head = fresh_layerwise.lm_head
            cell["weight_equal_fresh"] = bool(
                torch.equal(head.weight.view(torch.uint8), fresh_head.weight.view(torch.uint8))
            )
            cell["scales_equal_fresh"] = bool(torch.equal(head.weight_scale, fresh_layerwise.lm_head.weight_scale))
            cell["layerwise_storage_bytes"] = fresh_layerwise.lm_head.weight.untyped_storage().nbytes()
        out[f"{case}/{method}"] = cell
    return out


def _vllm_config(path: str, method: str | None, **model_kw):
    """The VllmConfig ``vllm034_checks._load_model`` builds, for the calls after loading that read it."""
    from vllm.config import LoadConfig, ModelConfig, VllmConfig

    name, _, option = (method or "").partition("+")
    model_config = ModelConfig(
        model=path, tokenizer=path, skip_tokenizer_init=True, dtype="bfloat16", quantization=name or None, **model_kw
    )
    extra = {"lm_head_quant": {"tied": option}} if option else {}
    return VllmConfig(model_config=model_config, load_config=LoadConfig(device="cpu"), additional_config=extra)


def _load(path: str, method: str | None, **model_kw):
    """(VllmConfig, model, logits, hidden): ``vllm034_checks._load_model`` keeping the config for later calls."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model

    vc = _vllm_config(path, method, **model_kw)
    with set_current_vllm_config(vc):
        model = get_model(vllm_config=vc)
        hidden = torch.randn(c.ROWS, c.HIDDEN, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
        return vc, model, model.compute_logits(hidden), hidden


@c.check
def ipc_cache() -> dict:
    """``--load-format ipc_cache`` (vLLM >= 0.33): a daemon loads the model once and engines map its post-processed
    tensors. vLLM's own pieces, minus the CUDA IPC transport (CPU tensors go by value, as vLLM ships them off CUDA):
    the daemon's ``export_entries`` of a model loaded with our flag; the engine's model built on the meta device,
    ``check_ipc_quant_support`` (every quant method must declare ``supports_pre_processed_weights``), the loader's
    ``_apply_entries`` and post-load processing under ``weights_already_processed()``. Then logits bitwise the
    daemon's, also after a reload from a daemon holding updated weights."""
    from types import SimpleNamespace

    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.model_executor.model_loader.weight_cache.daemon import export_entries
    from vllm.model_executor.model_loader.weight_cache.ipc_loader import (
        IpcModelLoader,
        _materialize_remaining_meta_tensors,
    )
    from vllm.model_executor.model_loader.weight_cache.protocol import WeightCacheState, check_ipc_quant_support
    from vllm.model_executor.utils import weights_already_processed
    from vllm.utils.torch_utils import set_default_torch_dtype

    out = {}
    cases = (*(("llama_untied", m) for m in c.METHODS), ("qwen3_tied", "int8_lm_head"),
             ("qwen3_tied", "int8_lm_head+quantize"))  # fmt: skip
    for case, method in cases:
        path, _ = c._checkpoint(case)
        _, daemon, daemon_logits, hidden = _load(path, method)
        entries, aliases = export_entries(daemon)
        vc = _vllm_config(path, method)
        cell = {}
        with _lines() as lines, set_current_vllm_config(vc):
            with set_default_torch_dtype(vc.model_config.dtype), torch.device("meta"):
                model = initialize_model(vllm_config=vc, model_config=vc.model_config)
            try:
                check_ipc_quant_support(model)
                cell["supported"] = True
            except Exception as e:  # vLLM's UnsupportedQuantForIPCError
                cell["supported"] = f"{type(e).__name__}: {e}"
            IpcModelLoader._apply_entries(
                SimpleNamespace(mode="copy"), model, WeightCacheState(entries, aliases, {}), 0
            )
            with weights_already_processed():
                process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
            _materialize_remaining_meta_tensors(model, torch.device("cpu"))
            got = model.compute_logits(hidden)
            # A reload from a daemon that loaded updated weights: the loader's load_weights copies every daemon tensor
            # into the engine's tensor of the same name and shape (ipc_loader.py L213-219); the scales are
            # parameters, so they travel with the one-byte weight. (vLLM's load_weights path has no weight loaders
            # on ipc_cache models: their parameters are the daemon's tensors.)
            update = _write_checkpoint(path, next(_update_states(path, 1)), f"ipc-{case}-{method}")
            _, daemon2, fresh, _ = _load(update, method)
            params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
            for name, entry in export_entries(daemon2)[0].items():
                target, source = params.get(name, buffers.get(name)), entry.rebuild(0)
                if target is not None and target.shape == source.shape:
                    target.data.copy_(source)
            updated = model.compute_logits(hidden)
        cell.update(
            head_method=c.qualname(model.lm_head.quant_method),
            weight_dtype=str(model.lm_head.weight.dtype),
            bitwise_equal_daemon=bool(torch.equal(got, daemon_logits)),
            reload_bitwise_equal_daemon=bool(torch.equal(updated, fresh)),
            lines=[m for m in lines if "-> " in m],
        )
        out[f"{case}/{method}"] = cell
    return out


@c.check
def draft_lm_head_quantization() -> dict:
    """vLLM 0.33+ ``speculative_config.draft_lm_head_quantization``: vLLM quantizes a copy of the target's head for
    an EAGLE/MTP draft (``quantized_lm_head_copy``), only from an unquantized bf16/fp16 head. The fp32 head is one:
    vLLM's FP8 copy is made from its bf16 rows and re-derived after an update (``refresh_quantized_lm_heads``). The
    one-byte heads are refused when the head is built, with the fix. The field is set on a real ngram
    ``SpeculativeConfig`` (vLLM accepts it only for EAGLE/MTP/DSpark drafts, whose checkpoints are not built here)."""
    import torch
    from vllm.config import SpeculativeConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.online.lm_head import (
        quantized_lm_head_copy,
        refresh_quantized_lm_heads,
    )

    out = {}
    w, x = c.weights(31)
    w2, _ = c.weights(32)
    for method in c.METHODS:
        vc = c.vllm_config(method)
        spec = SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_max=2, prompt_lookup_min=1)
        object.__setattr__(spec, "draft_lm_head_quantization", "fp8")  # see the docstring
        object.__setattr__(vc, "speculative_config", spec)
        try:
            head = c.build_head(vc)
        except ValueError as e:
            out[method] = {"error": f"ValueError: {e}"}
            continue
        c.load(vc, head, w)
        holder = torch.nn.Module()
        with set_current_vllm_config(vc):  # vLLM builds the copy while loading the draft, under the engine's config
            holder.draft_head = quantized_lm_head_copy(head, "fp8")
            copy = holder.draft_head
            first = copy.weight.detach().clone()
            head.weight.weight_loader(head.weight, w2)  # an RL update of the target's head
            refresh_quantized_lm_heads(holder)
            fresh = quantized_lm_head_copy(head, "fp8")
            drafted = copy.quant_method.apply(copy, x)[:, : c.VOCAB]
        ours = c.logits(vc, head, x)
        out[method] = {
            "head_method": c.qualname(head.quant_method),
            "copy_method": c.qualname(copy.quant_method),
            "copy_weight_dtype": str(copy.weight.dtype),
            "source_unchanged_dtype": str(head.weight.dtype),
            "refreshed": not _bytes_equal(first, copy.weight),
            "refresh_equals_fresh_copy": bool(
                torch.equal(copy.weight.view(torch.uint8), fresh.weight.view(torch.uint8))
            ),
            "draft_top1_agrees": float((drafted.argmax(-1) == ours.argmax(-1)).float().mean()),
            "target_logits_dtype": str(ours.dtype),
        }
    return out


def _bytes_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


@c.check
def pooling_runner() -> dict:
    """``runner="pooling", convert="embed"`` through vLLM 0.34's ``get_model()``: the pooling adapter builds the model
    with the LM head, then swaps it for a ``StageMissingLayer`` placeholder on the meta device that still reaches
    the post-load step. Our configs leave head and embeddings to vLLM (no binding, no binding line), say one line,
    take the runner's own float32 ``head_dtype`` for no user override, and ``head_dtype: model`` does not crash."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model

    out = {}
    path, _ = c._checkpoint("llama_untied")
    for method in (None, *c.METHODS):
        for overrides in ({}, {"head_dtype": "model"}):
            key = f"{method or 'vllm_default'}" + ("/head_dtype_model" if overrides else "")
            vc = _vllm_config(path, method, runner="pooling", convert="embed", hf_overrides=overrides)
            try:
                with _lines() as lines, set_current_vllm_config(vc):
                    model = get_model(vllm_config=vc)
            except Exception as e:
                out[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            embed = model.model.embed_tokens
            out[key] = {
                "head_type": type(getattr(model, "lm_head", None)).__name__,
                "embed_method": c.qualname(embed.quant_method),
                "embed_dtype": str(embed.weight.dtype),
                "runner_head_dtype": str(vc.model_config.head_dtype),
                "binding_lines": [m for m in lines if "-> " in m],
                "pooling_lines": [m for m in lines if "pooling model" in m],
                "embed_is_checkpoint": bool(torch.equal(embed.weight[: c.VOCAB], _embed_tokens(path))),
            }
    return out


def _embed_tokens(path: str):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))["model.embed_tokens.weight"]


@c.check
def head_geometry() -> dict:
    """vLLM 0.34 gives ``VocabParallelEmbedding``/``ParallelLMHead`` the linear-layer geometry (input/output size per
    partition, output_partition_sizes) so that its own W8A16 kernels can take a head. Our methods keep it, and it
    still describes the processed weight (rows and columns per rank)."""
    out = {}
    w, _ = c.weights(33)
    for method in (None, *c.METHODS):
        vc = c.vllm_config(method)
        head = c.build_head(vc)
        c.load(vc, head, w)
        out[method or "vllm_default"] = {
            "input_size_per_partition": getattr(head, "input_size_per_partition", None),
            "output_size_per_partition": getattr(head, "output_size_per_partition", None),
            "output_partition_sizes": getattr(head, "output_partition_sizes", None),
            "weight_shape": list(head.weight.shape),
            "weight_dtype": str(head.weight.dtype),
        }
    return out


@c.check
def compat_probes_034() -> dict:
    """The _compat.py helpers for these paths take their vLLM 0.34 branch (none falls back)."""
    from vllm.model_executor.utils import weights_already_processed

    from vllm_lmhead_quant import _compat

    vc = c.vllm_config("int8_lm_head")
    pooling = _vllm_config(c._model_dir(False), None, runner="pooling", convert="embed")
    with _env(VLLM_RELOAD_MODE="direct"):
        direct = _compat.direct_reload_enabled()
    with weights_already_processed():
        pre_processed = _compat.weights_pre_processed()
    return {
        "runner_generate": _compat.runner_type(vc.model_config),
        "runner_pooling": _compat.runner_type(pooling.model_config),
        "draft_lm_head_quantization_unset": _compat.draft_lm_head_quantization(vc),
        "direct_reload_default": _compat.direct_reload_enabled(),
        "direct_reload_direct": direct,
        "pre_processed_default": _compat.weights_pre_processed(),
        "pre_processed_inside": pre_processed,
        "placeholder_built_head": _compat.is_placeholder(c.build_head(vc)),
    }
