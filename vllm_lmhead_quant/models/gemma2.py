"""Gemma2: vLLM has no head module; ``compute_logits`` uses ``model.embed_tokens``, built as
``VocabParallelEmbedding(vocab, hidden)`` without ``quant_config`` (vllm/model_executor/models/gemma2.py,
``Gemma2Model.__init__``; the same in 0.26, 0.32 and 0.33; vLLM #53896). That embedding is rebuilt with the config,
which then treats it as a tied head."""

from __future__ import annotations

from vllm.model_executor.models import gemma2

from vllm_lmhead_quant.models.common import rebuild_embedding_head


class Gemma2ForCausalLM(gemma2.Gemma2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        rebuild_embedding_head(self, vllm_config, prefix)
