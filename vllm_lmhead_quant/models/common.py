"""What every family's subclass shares: when to rebuild (only for our configs, only if vLLM did not already pass the
config), and the one INFO line that makes the override visible."""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_lmhead_quant import _log

OURS = "vllm_lmhead_quant."


def head_config(vllm_config: Any, head: torch.nn.Module) -> Any | None:
    """The quantization config to build ``head`` with, or None to keep exactly what vLLM built.

    Ours only: without a flag, or with any other method, the subclass must build what vLLM builds, so the model
    computes bit-identically (tests/test_models.py). None too when ``head`` already got one of our methods: a vLLM
    that passes ``quant_config`` itself (fixed upstream) needs no rebuild."""
    from vllm_lmhead_quant.checkpoint import _HeadOverCheckpoint
    from vllm_lmhead_quant.config import _HeadOnlyConfig

    config = getattr(vllm_config, "quant_config", None)
    if not isinstance(config, (_HeadOnlyConfig, _HeadOverCheckpoint)):
        return None
    if type(getattr(head, "quant_method", None)).__module__.startswith(OURS):
        return None
    return config


def announce(vllm_config: Any, what: str) -> None:
    import vllm

    architecture = (getattr(vllm_config.model_config, "architectures", None) or ["?"])[0]
    _log.once(
        logging.INFO,
        ("subclass", architecture),
        "%s: vllm_lmhead_quant's subclass builds %s with the quantization config (vLLM %s builds without it, so "
        "the flag could not reach the head)",
        architecture,
        what,
        vllm.__version__,
    )


def rebuild_embedding_and_head(model: Any, vllm_config: Any, prefix: str, embed_path: str) -> None:
    """OPT and Bloom build both their input embedding (``embed_path``) and ``model.lm_head`` without the config.
    Rebuild both in vLLM's order (the embedding first, so the config sees a tied head's table before the head, as in
    Llama) and tie them the way this vLLM did: 0.26 aliases a tied head to the embedding module (``lm_head =
    embed_tokens``), 0.32 and 0.33 build a ``ParallelLMHead`` and share the weight (``lm_head.tie_weights(...)``).
    Read from the modules vLLM built, so no version number is needed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.model_executor.models.utils import maybe_prefix

    config = head_config(vllm_config, model.lm_head)
    if config is None:
        return
    owner_path, _, name = embed_path.rpartition(".")
    owner = model.get_submodule(owner_path)
    old = getattr(owner, name)
    vocab, dim = old.org_vocab_size, old.embedding_dim
    embed = VocabParallelEmbedding(vocab, dim, quant_config=config, prefix=maybe_prefix(prefix, embed_path))
    setattr(owner, name, embed)
    if model.lm_head is old:
        model.lm_head = embed
    else:
        model.lm_head = ParallelLMHead(vocab, dim, quant_config=config, prefix=maybe_prefix(prefix, "lm_head"))
        if model.config.tie_word_embeddings:
            model.lm_head = model.lm_head.tie_weights(embed)
    announce(vllm_config, f"{embed_path} and lm_head")


def rebuild_head(model: Any, vllm_config: Any, prefix: str) -> None:
    """GPT-OSS and Qwen3-Next: only ``lm_head`` is built without the config; these models never tie it."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.utils import maybe_prefix

    config = head_config(vllm_config, model.lm_head)
    if config is None:
        return
    model.lm_head = ParallelLMHead(
        model.config.vocab_size, model.config.hidden_size, quant_config=config, prefix=maybe_prefix(prefix, "lm_head")
    )
    announce(vllm_config, "lm_head")


def rebuild_embedding_head(model: Any, vllm_config: Any, prefix: str) -> None:
    """Command-R and Gemma2: no head module; ``compute_logits`` uses ``model.embed_tokens``, which is rebuilt with the
    config (the config then treats it as a tied head)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.models.utils import maybe_prefix

    config = head_config(vllm_config, model.model.embed_tokens)
    if config is None:
        return
    model.model.embed_tokens = VocabParallelEmbedding(
        model.config.vocab_size,
        model.config.hidden_size,
        quant_config=config,
        prefix=maybe_prefix(prefix, "model.embed_tokens"),
    )
    announce(vllm_config, "model.embed_tokens (its LM head)")
