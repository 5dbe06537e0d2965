"""Gemma2: vLLM has no head module; ``compute_logits`` uses ``model.embed_tokens``, built as
``VocabParallelEmbedding(vocab, hidden)`` without ``quant_config`` (vllm/model_executor/models/gemma2.py,
``Gemma2Model.__init__``; the same in 0.26, 0.32 and 0.33; vLLM #53896). That embedding is rebuilt with the config,
which then treats it as a tied head."""

from __future__ import annotations

from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models import gemma2
from vllm.model_executor.models.utils import maybe_prefix

from vllm_lmhead_quant.models.common import announce, head_config


class Gemma2ForCausalLM(gemma2.Gemma2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = head_config(vllm_config, self.model.embed_tokens)
        if config is None:
            return
        self.model.embed_tokens = VocabParallelEmbedding(
            self.config.vocab_size,
            self.config.hidden_size,
            quant_config=config,
            prefix=maybe_prefix(prefix, "model.embed_tokens"),
        )
        announce(vllm_config, "model.embed_tokens (its LM head)")
