"""``fp8_lm_head`` and ``int8_lm_head``: a one-byte head weight (FP8 e4m3 or symmetric INT8, ``quant.py``) with one
fp32 scale per vocab row (or per ``group_size`` weights of a row), weight-only maths. One method class for both
formats: only the format differs.

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
import weakref

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

from vllm_lmhead_quant import _compat, _log, ops
from vllm_lmhead_quant.methods.bf16_head import TiedBF16HeadMethod
from vllm_lmhead_quant.quant import FP8, Format, dequantize_rows, quantize_rows, quantized_bytes


class QuantizedHeadMethod(QuantizeMethodBase):
    """``fmt``: the weight format (``quant.FP8`` or ``quant.INT8``); ``method_name``: the ``--quantization`` name
    for messages. ``shared=True``: the table also serves input lookups (tied embeddings, opt-in); ``embedding()``
    then dequantizes the looked-up rows. ``keep_tied=True`` (the default ``"tied": "keep"``): a head that turns out
    to hold the input embeddings' own weight once loaded hands over to ``TiedBF16HeadMethod`` instead of quantizing.
    ``logits_dtype``: None for the activation dtype, or torch.float32."""

    # --load-format ipc_cache (vLLM >= 0.33): the weight-cache daemon loads the model with this method, so it exports
    # the one-byte weight and its scales; the engine's post-load step then adopts them (process_weights_after_loading).
    supports_pre_processed_weights = True

    def __init__(
        self,
        prefix: str = "",
        architecture: str = "?",
        *,
        fmt: Format = FP8,
        method_name: str = "fp8_lm_head",
        shared: bool = False,
        keep_tied: bool = False,
        retie_if_equal: bool = False,
        logits_dtype: torch.dtype | None = None,
        group_size: int | None = None,
    ):
        super().__init__()
        self.group_size = group_size
        self.prefix = prefix
        self.architecture = architecture
        self.fmt = fmt
        self.method_name = method_name
        self.shared = shared
        self.keep_tied = keep_tied
        self.retie_if_equal = retie_if_equal
        self.logits_dtype = logits_dtype
        self.peers: list = []  # weakrefs to the model's input embeddings (set by the config), to see what is tied
        # (weight, scale, ops.bind_kernel of them): the fused kernel with its per-call host work done once
        self._bound: tuple = (None, None, None)

    def create_weights(self, layer: torch.nn.Module, *args, **extra_weight_attrs) -> None:
        UnquantizedEmbeddingMethod.create_weights(self, layer, *args, **extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if _compat.is_placeholder(layer):  # a head that never runs (pooling models): nothing to quantize or say
            return
        weight = layer.weight
        if weight.dtype == self.fmt.dtype:  # already processed (a second call, a shared module, or ipc_cache)
            if _compat.weights_pre_processed():
                self._adopt(layer)
            return
        if self.retie_if_equal:
            weight = self._retie_copy(layer, weight)
        pair = self._shared_pair(weight)
        sharer = None if pair else self._sharer(layer, weight)
        if sharer is not None and self.keep_tied:  # tied after all (the default "keep"): the table stays as it is
            layer.quant_method = TiedBF16HeadMethod(self.prefix, self.architecture, method_name=self.method_name)
            layer.quant_method.process_weights_after_loading(layer)
            return
        q, scale = quantize_rows(
            weight.data, self.fmt, group_size=self.group_size, name=f"{self.architecture} '{self.prefix}'"
        )
        before = weight.numel() * weight.element_size()
        layer.orig_dtype = weight.dtype
        direct = _compat.direct_reload_enabled()
        if direct:  # the checkpoint Parameter and its storage stay: see _keep_for_direct_reload
            self._keep_for_direct_reload(layer, pair, q, scale)
        else:
            new_weight = Parameter(q, requires_grad=False)
            new_weight.input_dim, new_weight.output_dim = 1, 0
            new_weight.weight_loader = _RequantizingLoader(
                layer, weight.weight_loader, self.prefix, self.fmt, self.group_size
            )
            new_scale = Parameter(scale, requires_grad=False)
            for module in pair or (layer,):  # replaces the registered Parameter(s): the bf16 one is then unreferenced
                module.weight, module.weight_scale, module.orig_dtype = new_weight, new_scale, layer.orig_dtype
        del weight
        after = quantized_bytes(*q.shape, self.group_size)
        dtype = str(layer.orig_dtype).removeprefix("torch.")
        if direct:
            memory = (
                f"{_log.mib(before)} kept per rank, saved 0 MiB: VLLM_RELOAD_MODE=direct writes each update into the "
                f"checkpoint tensor's own {dtype} storage, so it cannot shrink (the default VLLM_RELOAD_MODE="
                f"layerwise saves {_log.mib(before - after)})"
            )
        elif sharer is None:
            memory = f"{_log.mib(before)} -> {_log.mib(after)} per rank, saved {_log.mib(before - after)}"
        else:  # the input embeddings keep the table in its dtype: the one-byte head is a second copy
            memory = f"holds {_log.mib(after)} per rank next to the {dtype} table it is tied to: adds {_log.mib(after)}"
            why = "the model assigns the embedding table to the head instead of calling tie_weights"
            _log.once(
                logging.WARNING,
                ("adds-memory", id(layer)),
                "%s: '%s' shares its weight with the input embeddings (%s), which keep it in %s for lookups, so %s "
                "adds a one-byte copy (+%s per rank) instead of saving memory. Run without the flag to keep one table.",
                self.architecture, self.prefix, why, dtype, self.method_name, _log.mib(after),
            )  # fmt: skip
        shared = pair is not None or (self.shared and not isinstance(layer, ParallelLMHead))
        _log.once(
            logging.WARNING if direct else logging.INFO,  # direct reload: the saving is lost, say it louder
            ("quantized", id(layer)),
            "%s: %s '%s' -> %s (weight %s %s -> %s + %s%s, logits %s): %s",
            self.architecture,
            type(layer).__name__,
            self.prefix,
            self.method_name,
            tuple(q.shape),
            dtype,
            str(q.dtype).removeprefix("torch."),
            _scales_text(self.group_size),
            "; shared with the input embeddings" if shared else "",
            str(self.logits_dtype or layer.orig_dtype).removeprefix("torch."),
            memory,
        )
        level, line = ops.head_path(q.device, q.dtype, self.group_size)
        _log.once(level, ("head_path", str(q.device), self.fmt.name), "%s on %s: %s", self.method_name, q.device, line)

    def _keep_for_direct_reload(self, layer: torch.nn.Module, pair, q: torch.Tensor, scale: torch.Tensor) -> None:
        """``VLLM_RELOAD_MODE=direct`` (vLLM 0.34) records each checkpoint Parameter before this step and, on every
        update, views its storage back to the checkpoint layout, lets the checkpoint loader write into it and reruns
        this step; it raises if the Parameter object was replaced or its storage shrank. So the one-byte weight goes
        *into* the bf16 Parameter's own storage (vLLM's ``replace_parameter``: same object, same address), the
        scales are refilled in place, and the loader is ours only while the weight is one byte: in checkpoint
        layout (between vLLM's begin and finish) updates go to vLLM's loader and are quantized by the rerun, the
        same ``quantize_rows`` as a fresh engine. The cost: the bf16 bytes are not freed (said in the line)."""
        _compat.keep_parameter(layer, "weight", q)
        weight = layer.weight
        loader = weight.weight_loader
        if not isinstance(loader, _RequantizingLoader):
            weight.weight_loader = _RequantizingLoader(layer, loader, self.prefix, self.fmt, self.group_size)
        old = getattr(layer, "weight_scale", None)
        if isinstance(old, torch.Tensor) and (old.shape, old.device) == (scale.shape, scale.device):
            old.data.copy_(scale)  # same address: anything that captured the scales sees the new ones
        else:
            old = Parameter(scale, requires_grad=False)
        for module in pair or (layer,):
            module.weight_scale, module.orig_dtype = old, layer.orig_dtype

    def _adopt(self, layer: torch.nn.Module) -> None:
        """``--load-format ipc_cache``: vLLM registered the daemon's processed tensors (the one-byte weight and its
        scales, under the names this method gave them) on a model built on the meta device, without our loader."""
        weight = layer.weight
        layer.orig_dtype = getattr(layer, "params_dtype", None) or torch.bfloat16
        pair = self._shared_pair(weight)
        for module in pair or (layer,):
            module.orig_dtype = layer.orig_dtype
        if not isinstance(getattr(weight, "weight_loader", None), _RequantizingLoader):
            weight.input_dim, weight.output_dim = 1, 0
            weight.weight_loader = _RequantizingLoader(
                layer, layer.weight_loader, self.prefix, self.fmt, self.group_size
            )
        _log.once(
            logging.INFO,
            ("adopted", id(weight)),  # once per table: a shared one reaches this step through both of its modules
            "%s: %s '%s' -> %s (weight %s %s + %s from the weight cache, logits %s)",
            self.architecture, type(layer).__name__, self.prefix, self.method_name, tuple(weight.shape),
            str(weight.dtype).removeprefix("torch."), _scales_text(self.group_size),
            str(self.logits_dtype or layer.orig_dtype).removeprefix("torch."),
        )  # fmt: skip

    def _retie_copy(self, layer: torch.nn.Module, weight: Parameter) -> Parameter:
        """A tied model whose checkpoint also ships an ``lm_head`` equal to the embeddings: vLLM built the head untied
        and re-ties it after loading, but only for unquantized heads. Do the same here, so the flag never holds more
        than a run without it: tie the head to the embedding's table (and, in shared mode, quantize that one)."""
        twins = [m for m in (ref() for ref in self.peers) if m is not None and m is not layer]
        twins = [m for m in twins if m.weight.shape == weight.shape and torch.equal(m.weight, weight)]
        if len(twins) != 1:
            return weight
        self.shared = not self.keep_tied  # "quantize": one quantized table for both, as for any tied model
        self.tie_weights(layer, twins[0])
        return layer.weight

    def _shared_pair(self, weight: Parameter) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """(head, input embeddings) tied in shared mode and still holding ``weight``: quantized together, once."""
        modules = tuple(ref() for ref in getattr(self, "tied_pair", ()))
        if len(modules) == 2 and all(m is not None and m.weight is weight for m in modules):
            return modules
        return None

    def _sharer(self, layer: torch.nn.Module, weight: Parameter) -> torch.nn.Module | None:
        """Another module holding this very weight (an input embedding the head was tied to), which will keep it."""
        for ref in self.peers:
            module = ref()
            if module is not None and module is not layer and getattr(module, "weight", None) is weight:
                return module
        return None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.weight.dtype != self.fmt.dtype:  # before weight processing, or replaced behind our back
            if hasattr(layer, "weight_scale"):
                _log.once(
                    logging.WARNING,
                    ("replaced", id(layer)),
                    "'%s' (%s) was replaced by a %s tensor outside model.load_weights (param.data = ..., or a "
                    "broadcast into named_parameters()); it now runs unquantized, holding %s. Push weight updates "
                    "through model.load_weights to keep it quantized (docs/weight-sync.md)",
                    self.prefix, self.method_name, str(layer.weight.dtype).removeprefix("torch."),
                    _log.mib(layer.weight.numel() * layer.weight.element_size()),
                )  # fmt: skip
            self._bound = (None, None, None)  # release the quantized tensors it replaced
            return ops.fp32_logits(x, layer.weight, bias).to(self.logits_dtype or x.dtype)
        bound = self._bound
        if bound[0] is not layer.weight or bound[1] is not layer.weight_scale:  # first call, or new parameters
            bound = self._bound = (layer.weight, layer.weight_scale, ops.bind_kernel(layer.weight, layer.weight_scale))
        return ops.quantized_logits(
            x, layer.weight, layer.weight_scale, bias, out_dtype=self.logits_dtype or x.dtype, kernel=bound[2]
        )

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        if layer.weight.dtype != self.fmt.dtype:
            return torch.nn.functional.embedding(input_, layer.weight)
        # index_select on the raw bytes: gathers need no kernel for the one-byte dtype on any device.
        rows = torch.nn.functional.embedding(input_, layer.weight.view(torch.uint8)).view(self.fmt.dtype)
        flat = rows.reshape(-1, rows.shape[-1])
        return dequantize_rows(flat, layer.weight_scale[input_.reshape(-1)], layer.orig_dtype).reshape(rows.shape)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        """Tied head: vLLM's own tie (one weight Parameter for both modules; the head module stays, with its bias
        slot, which the Transformers backend uses). Shared mode also gives the input embeddings this method, so the
        one table is quantized once (process_weights_after_loading) and serves lookups and logits."""
        layer.weight = embed_tokens.weight
        self.peers = [*self.peers, weakref.ref(embed_tokens)]  # whatever the config saw, this one is tied
        if self.shared:
            embed_tokens.quant_method = self
            self.tied_pair = (weakref.ref(layer), weakref.ref(embed_tokens))
        return layer


def _scales_text(group_size: int | None) -> str:
    """How the start-up lines name the scales."""
    return "per-row fp32 scales" if group_size is None else f"fp16 scales per {group_size} weights"


# Transient memory one chunk of a weight update may use. vLLM gave the rest of the GPU to the KV cache, so an update
# must not need a full-size copy of the head (1.16 GiB in bf16 at 151936 x 4096). Per weight of a chunk: the rows in
# the model dtype, their fp32 copy, a |w| temporary, the finiteness mask and the one-byte result, ~18 bytes as
# measured on CPU with allocator slack (docs/weight-sync.md).
UPDATE_CHUNK_BYTES = 64 << 20
_BYTES_PER_WEIGHT = 18


class _RequantizingLoader:
    """The quantized weight's ``weight_loader``: RL weight updates (``model.load_weights`` with bf16 tensors, as RL
    frameworks push them every step) land here. This rank's rows are cut from the full-vocabulary tensor the way vLLM's
    vocab-parallel loader cuts them (``shard_indices``: this rank's slice, zeros for the padding rows), quantized with
    fresh per-row scales in chunks of at most ``UPDATE_CHUNK_BYTES``, and copied *into* the existing quantized weight
    and scale, so memory stays flat and anything that captured those tensors (CUDA graphs) sees the new values. The
    whole update is checked for NaN/inf before the first row changes. Without this loader, vLLM's would cast bf16
    into the one-byte tensor with no scale: silently wrong logits after the first update (the stale/derived-weight
    bug class of prime-rl #2438 and PipelineRL)."""

    def __init__(
        self,
        layer: torch.nn.Module,
        loader,
        name: str,
        fmt: Format,
        group_size: int | None = None,
        chunk_bytes: int = UPDATE_CHUNK_BYTES,
    ):
        self.layer, self.loader, self.name, self.fmt, self.chunk_bytes = layer, loader, name, fmt, chunk_bytes
        self.group_size = group_size

    def __call__(self, param: Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
        if param.dtype != self.fmt.dtype:
            # VLLM_RELOAD_MODE=direct between vLLM's begin and finish: the Parameter is back in its checkpoint layout
            # (bf16), so vLLM's own loader writes it and the post-load step that follows quantizes it.
            return self.loader(param, loaded_weight, *args, **kwargs)
        shard = None if args or kwargs else self._shard(param, loaded_weight)
        if shard is None:  # a layout this loader does not know: vLLM's loader into a full-size staging copy
            return self._staged(param, loaded_weight, *args, **kwargs)
        start, size = shard
        rows, hidden = param.shape
        step = max(1, self.chunk_bytes // (hidden * _BYTES_PER_WEIGHT))
        what = f"weight update of '{self.name}'"
        for r0 in range(0, size, step):  # all rows valid before any row changes
            part = loaded_weight[start + r0 : start + min(r0 + step, size)]
            if not bool(torch.isfinite(part).all()):  # raises, naming the row
                quantize_rows(part.to(param.device), self.fmt, name=f"{what} (row numbers from {start + r0})")
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            part = torch.zeros((r1 - r0, hidden), dtype=self.layer.orig_dtype, device=param.device)
            if r0 < size:  # rows past this rank's share of the vocabulary are padding: zeros, as vLLM writes them
                n = min(r1, size) - r0
                part[:n].copy_(loaded_weight[start + r0 : start + r0 + n])
            q, scale = quantize_rows(part, self.fmt, group_size=self.group_size, name=what, chunk_rows=step)
            param.data[r0:r1].copy_(q)
            self.layer.weight_scale.data[r0:r1].copy_(scale)

    def _shard(self, param: Parameter, loaded_weight: torch.Tensor) -> tuple[int, int] | None:
        """(first row, row count) of this rank's share in ``loaded_weight``, by vLLM's vocab-parallel rules."""
        indices = getattr(self.layer, "shard_indices", None)
        if indices is None or getattr(param, "output_dim", None) != 0 or getattr(param, "packed_dim", None) is not None:
            return None
        expected = (self.layer.org_vocab_size, param.shape[1])
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(
                f"weight update of '{self.name}': got a tensor of shape {tuple(loaded_weight.shape)}, expected the "
                f"full-vocabulary head {expected} (every rank takes its own rows from it)"
            )
        return indices.org_vocab_start_index, indices.org_vocab_end_index - indices.org_vocab_start_index

    def _staged(self, param: Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
        layer = self.layer
        staging = Parameter(torch.empty(param.shape, dtype=layer.orig_dtype, device=param.device), requires_grad=False)
        staging.input_dim, staging.output_dim = 1, 0
        self.loader(staging, loaded_weight, *args, **kwargs)
        q, scale = quantize_rows(
            staging.data, self.fmt, group_size=self.group_size, name=f"weight update of '{self.name}'"
        )
        param.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
