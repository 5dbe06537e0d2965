"""The three registered quantization configs. They hand our method to the LM head and vLLM's defaults to every
other layer, so the model body computes bit-identically to a run without ``--quantization``.

The head is found by what it is, not by its name:

* a ``ParallelLMHead`` (Llama, Mistral, Qwen3 and most models in vLLM >= 0.30, tied or not);
* an input ``VocabParallelEmbedding`` that the model also uses as its head (Gemma2; Qwen2/Qwen3 tied in
  vLLM 0.26 alias ``lm_head = embed_tokens``). ``get_quant_method`` cannot know this when the embedding is
  built, so the embedding gets a *candidate* method that is a subclass of vLLM's ``UnquantizedEmbeddingMethod``
  (lookups stay exact). When a ``ParallelLMHead`` is built afterwards, the candidate is swapped back to vLLM's own
  ``UnquantizedEmbeddingMethod`` before any weight exists. A candidate still in place at weight processing is the
  head (tied models) or proof that the model never offered its head (untied: a clear error, see bf16_head.py).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    UnquantizedEmbeddingMethod,
    VocabParallelEmbedding,
)

from vllm_lmhead_quant import _compat, _log
from vllm_lmhead_quant._compat import AttentionLayerBase
from vllm_lmhead_quant.body import OnlineBody
from vllm_lmhead_quant.methods.bf16_head import HeadNotBoundError, HeadProbeMethod, TiedBF16HeadMethod
from vllm_lmhead_quant.methods.fp32_head import FP32HeadMethod
from vllm_lmhead_quant.methods.quantized_head import QuantizedHeadMethod
from vllm_lmhead_quant.options import HeadOptions
from vllm_lmhead_quant.quant import FP8, INT8, Format


class _ModelFacts:
    """What the config needs to know about the model being built, read from vLLM's current config."""

    def __init__(self, vllm_config: Any | None):
        model_config = getattr(vllm_config, "model_config", None)
        text_config = getattr(model_config, "hf_text_config", None)
        self.architecture = (getattr(model_config, "architectures", None) or ["?"])[0]
        self.tied = bool(getattr(text_config, "tie_word_embeddings", False))
        self.dtype = getattr(model_config, "dtype", None)
        self.head_dtype = _compat.head_dtype(model_config) if model_config is not None else None
        self.untied_by_checkpoint = _compat.untied_by_checkpoint(model_config)
        self.options = HeadOptions.from_additional_config(_compat.additional_config(vllm_config))
        # Which model this is: a pooling model computes no logits (its head is a placeholder), and a speculative
        # draft model is built from its own ModelConfig, with a quantization config only if the user gave it one.
        self.runner = _compat.runner_type(model_config) if model_config is not None else "generate"
        spec = getattr(vllm_config, "speculative_config", None)
        draft_config = getattr(spec, "draft_model_config", None)
        self.is_draft = self.runner == "draft" or (draft_config is not None and draft_config is model_config)
        if self.is_draft:
            self.architecture = f"{self.architecture} (speculative draft)"
        self.spec_method = None if self.is_draft else getattr(spec, "method", None)
        self.draft_config = None if self.is_draft else draft_config
        self.draft_lm_head_quantization = None if self.is_draft else _compat.draft_lm_head_quantization(vllm_config)


class _HeadOnlyConfig(OnlineBody, QuantizationConfig):
    """Shared logic: which layer gets which method. Subclasses say what the head (and a tied head) gets. With the
    ``body`` option, vLLM's online quantization config decides every other Linear/MoE layer (body.py)."""

    name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._reset_runtime()

    # Runtime bookkeeping of one model construction; never pickled (the config travels to every process).
    _RUNTIME = (
        "_head_bound", "_offered", "_candidates", "_embeddings", "_attention_seen", "_watching", "_body_config"
    )  # fmt: skip

    def _reset_runtime(self) -> None:
        self._head_bound = False  # a ParallelLMHead got our method
        self._offered = False  # some VocabParallelEmbedding was offered to us
        self._candidates: list[weakref.ref] = []
        self._embeddings: list[weakref.ref] = []  # every input embedding offered: heads check what they share
        self._attention_seen: set[int] = set()
        self._watching = False  # a forward check sits on the first linear layer (see _watch)
        self._body_config = None  # the body option's online config, built at the first layer (body.py)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    # --- vLLM's QuantizationConfig interface -------------------------------------------------------
    def get_name(self) -> str:
        return self.name

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # nothing to read from the checkpoint: vLLM then builds us with cls()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        if not config:
            return cls()
        # The checkpoint has its own quantization_config: keep it for the body (checkpoint.py).
        from vllm_lmhead_quant.checkpoint import over_checkpoint

        return over_checkpoint(cls, config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """Claim a quantized checkpoint only when the user asked for this method by name, so loading it without
        our flag (or with another method) behaves exactly as before; the body's method is vLLM's own choice for it
        (checkpoint.py)."""
        if user_quant != cls.name:
            return None
        from vllm_lmhead_quant.checkpoint import claim

        return claim(cls.name, hf_quant_cfg, hf_config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, VocabParallelEmbedding):
            from vllm_lmhead_quant.checkpoint import refuse_gguf

            refuse_gguf(self.name, _compat.current_vllm_config())
            if self._pooling_model():
                return None  # vLLM's own method: a pooling model computes no logits (see _pooling_model)
        if isinstance(layer, ParallelLMHead):
            facts = _ModelFacts(_compat.current_vllm_config())
            self._check_speculative(facts)
            self._release_candidates()
            self._head_bound = True
            method = self._head_method(prefix, facts, tied=facts.tied, module=True)
            if isinstance(method, QuantizedHeadMethod):
                method.peers = self._embeddings
            return method
        if isinstance(layer, VocabParallelEmbedding):
            if self._head_bound:  # built after the head (Gemma): vLLM's default, but the head may be tied to it
                self._embeddings.append(weakref.ref(layer))
                return None
            facts = _ModelFacts(_compat.current_vllm_config())
            method = (
                self._head_method(prefix, facts, tied=True)
                if facts.tied
                else HeadProbeMethod(self.name, prefix, facts.architecture)
            )
            self._offered = True
            self._candidates.append(weakref.ref(layer))
            self._embeddings.append(weakref.ref(layer))
            if isinstance(method, QuantizedHeadMethod):
                method.peers = self._embeddings
            return method
        if isinstance(layer, LinearBase):
            self._watch(layer)
            # None would raise in LinearBase; UnquantizedLinearMethod is vLLM's default
            return self.body_method(layer, prefix) or UnquantizedLinearMethod()
        if isinstance(layer, AttentionLayerBase):
            self._check_offered(layer)
        # attention, MoE, norms...: vLLM's default for "no quantization" (None), or on vLLM 0.26 the body's method
        return self.body_method(layer, prefix)

    def _pooling_model(self) -> bool:
        """``runner="pooling"`` (``LLM.embed``/``score``/``classify``, ``--convert embed``...): vLLM wraps the built LM
        head in a placeholder that never runs (its weight goes to the meta device) and pools hidden states through
        its own float32 ``head_dtype`` classifier, which no quantization config is asked about when it is read from
        head rows. So the head and embeddings keep vLLM's own methods (no binding, no binding line, no wrong
        ``head_dtype`` refusal, nothing to quantize on a meta tensor), the never-silent checks stand down, and one
        line says the flag changes nothing here."""
        facts = _ModelFacts(_compat.current_vllm_config())
        if facts.runner != "pooling":
            return False
        self._head_bound = True  # nothing to bind: not a silent no-op, the line below says so
        body = facts.options.body
        _log.once(
            logging.WARNING,
            ("pooling", facts.architecture, self.name),
            "%s runs as a pooling model (runner 'pooling'): it computes no logits, so vLLM replaces its LM head by a "
            "placeholder and --quantization %s leaves the head and embeddings as vLLM builds them (0 bytes saved; "
            "the pooler keeps vLLM's own head_dtype)%s. Run without the flag%s.",
            facts.architecture,
            self.name,
            f"; only the body option ({body}) applies" if body else "",
            f", or use --quantization {body}" if body else "",
        )
        return True

    def _check_speculative(self, facts: _ModelFacts) -> None:
        """The target's head, built with our config, next to a speculative decoder that has a head of its own. vLLM
        0.33+ ``draft_lm_head_quantization`` derives an FP8/NVFP4 copy of the target's head for EAGLE/MTP drafts only
        from an unquantized bf16/fp16 head: refused here, at start-up, for the one-byte heads (vLLM would raise
        after loading with a generic message). A ``draft_model`` draft is built from its own ModelConfig: its head
        gets our method only if the user gives it our name too; otherwise one line says so and how."""
        if facts.draft_lm_head_quantization and self.name != "bf16_last_layer_fp32":
            raise ValueError(
                f"speculative_config draft_lm_head_quantization={facts.draft_lm_head_quantization!r} cannot be "
                f"combined with --quantization {self.name}: vLLM quantizes a copy of the target's LM head for the "
                "draft only from an unquantized bf16/fp16 head, and this head is already one byte per weight. Drop "
                f"draft_lm_head_quantization: a draft that shares the target's head then drafts through the "
                f"{self.name} head itself (same bytes, no second copy)."
            )
        draft = facts.draft_config
        if facts.spec_method != "draft_model" or draft is None or getattr(draft, "quantization", None) == self.name:
            return  # no draft model, or one built with our config (it logs its own binding line)
        text = getattr(draft, "hf_text_config", None)
        vocab, hidden = getattr(text, "vocab_size", 0), getattr(text, "hidden_size", 0)
        dtype = getattr(draft, "dtype", None)
        size = vocab * hidden * (dtype.itemsize if isinstance(dtype, torch.dtype) else 2)
        _log.once(
            logging.WARNING,
            ("draft-model", self.name),
            "speculative decoding: the draft model '%s' is built from its own config with quantization=%s, so its LM "
            'head (%d x %d, %s) keeps vLLM\'s method, not %s. To give it %s too, add "quantization": "%s" to '
            "--speculative-config.",
            getattr(draft, "model", "?"),
            getattr(draft, "quantization", None),
            vocab,
            hidden,
            _log.mib(size),
            self.name,
            self.name,
            self.name,
        )

    def _check_offered(self, layer: torch.nn.Module) -> None:
        """vLLM asks again for each attention layer's method in its own post-load step (after the whole model
        was built and loaded). A second ask for the same layer with no head and no embedding ever offered to
        us means the model built them without the quantization config: the flag would be a silent no-op."""
        if id(layer) not in self._attention_seen:
            self._attention_seen.add(id(layer))
            return
        if self._head_bound or self._offered or not _compat.is_last_pp_rank():
            return
        self._raise_not_bound(_ModelFacts(_compat.current_vllm_config()).architecture)

    def _watch(self, layer: torch.nn.Module) -> None:
        """The second, independent never-silent signal: a check before the first forward of the first linear layer
        (vLLM's start-up profiling run, after the whole model was built and loaded). Unlike the attention re-ask
        above, it needs nothing from vLLM beyond running the model, so it also covers attention-free models and a
        vLLM that stops re-asking. The hook returns nothing (the layer computes as before) and removes itself after
        its first eager call; under torch.compile it is traced as a constant check."""
        if self._watching or not _compat.is_last_pp_rank():  # other pipeline stages hold no head
            return
        self._watching = True
        if self._pooling_model():  # no head to bind (e.g. an encoder-only pooling model): said, not an error
            return
        architecture = _ModelFacts(_compat.current_vllm_config()).architecture  # known while the model is built

        def check(module, args):
            if not (self._head_bound or self._offered):
                self._raise_not_bound(architecture)
            if not torch.compiler.is_compiling():
                handle.remove()

        handle = layer.register_forward_pre_hook(check)

    def _raise_not_bound(self, architecture: str) -> None:
        raise HeadNotBoundError(
            f"--quantization {self.name}: vLLM's {architecture} builds its LM head (and input embedding) without "
            "passing the quantization config, so the method would silently do nothing. This architecture is not "
            "supported by vllm_lmhead_quant on this vLLM version; run without the flag."
        )

    def _release_candidates(self) -> None:
        """A real head exists: input embeddings built before it go back to vLLM's own method."""
        for ref in self._candidates:
            layer = ref()
            if layer is not None and type(layer.quant_method).__module__.startswith("vllm_lmhead_quant"):
                layer.quant_method = UnquantizedEmbeddingMethod()
        self._candidates.clear()

    def _head_method(self, prefix: str, facts: _ModelFacts, *, tied: bool, module: bool = False) -> QuantizeMethodBase:
        """``tied``: the config says the head shares the input embeddings' table; ``module``: the layer is a
        ``ParallelLMHead`` (else an input embedding that may serve as the head)."""
        raise NotImplementedError


@register_quantization_config("bf16_last_layer_fp32")
class FP32HeadConfig(_HeadOnlyConfig):
    """bf16 (or fp16) head weight and activations, fp32 logits."""

    name = "bf16_last_layer_fp32"

    def _head_method(self, prefix: str, facts: _ModelFacts, *, tied: bool, module: bool = False) -> QuantizeMethodBase:
        if dataclasses.replace(facts.options, body=None) != HeadOptions():  # "body" applies to all three
            raise ValueError(
                '--additional-config "lm_head_quant" options "logits_dtype", "tied" and "group_size" apply to '
                "fp8_lm_head and int8_lm_head only; bf16_last_layer_fp32 keeps the weight as it is and always returns "
                "float32 logits. Remove them."
            )
        if facts.dtype == torch.float32:
            _log.once(
                logging.WARNING,
                ("fp32-model",),
                "%s already runs in float32, so bf16_last_layer_fp32 changes nothing; drop --quantization.",
                facts.architecture,
            )
        elif facts.head_dtype == torch.float32:
            _log.once(
                logging.WARNING,
                ("fp32-head-dtype",),
                'hf_overrides {"head_dtype": "float32"} and bf16_last_layer_fp32 both request fp32 logits; '
                "vLLM's head_dtype path computes them (same result). Drop one of the two.",
            )
        return FP32HeadMethod(prefix, facts.architecture)


class _QuantizedHeadConfig(_HeadOnlyConfig):
    """A one-byte head weight (``fmt``) with per-row scales; activations stay in the model dtype."""

    fmt: Format

    def _head_method(self, prefix: str, facts: _ModelFacts, *, tied: bool, module: bool = False) -> QuantizeMethodBase:
        if facts.head_dtype is not None and facts.dtype is not None and facts.head_dtype != facts.dtype:
            raise ValueError(
                f'{self.name} cannot be combined with hf_overrides {{"head_dtype": ...}}: vLLM computes that '
                f"override only for unquantized heads. The quantized heads return float32 logits by default "
                f'(--additional-config \'{{"lm_head_quant": {{"logits_dtype": "float32"}}}}\'); drop the override.'
            )
        # "auto": float32. The bf16 rounding of logits alone flips ~2 % of a real model's top-1 tokens and the
        # kernel's fp32 store costs no decode time (docs/accuracy.md); vLLM's sampler upcasts to fp32 anyway.
        logits_dtype = None if facts.options.logits_dtype == "model" else torch.float32
        keep = facts.options.tied == "keep"
        if tied and keep and not module:  # an input embedding that may be the head: its table serves lookups too
            return TiedBF16HeadMethod(prefix, facts.architecture, method_name=self.name)
        # A ParallelLMHead: whether it really shares the embeddings' table is seen from the built modules once the
        # weights are loaded (QuantizedHeadMethod.process_weights_after_loading), not read from the config.
        return QuantizedHeadMethod(
            prefix,
            facts.architecture,
            fmt=self.fmt,
            method_name=self.name,
            shared=tied and not keep,
            keep_tied=keep,
            retie_if_equal=getattr(facts, "untied_by_checkpoint", False),
            logits_dtype=logits_dtype,
            group_size=facts.options.group_size,
        )


@register_quantization_config("fp8_lm_head")
class FP8HeadConfig(_QuantizedHeadConfig):
    """FP8 e4m3 head weight with per-row scales."""

    name = "fp8_lm_head"
    fmt = FP8


@register_quantization_config("int8_lm_head")
class Int8HeadConfig(_QuantizedHeadConfig):
    """Symmetric INT8 head weight with per-row scales: the bytes of FP8, 4-5x less error on real heads."""

    name = "int8_lm_head"
    fmt = INT8
