"""Command-R (Cohere, Cohere2): vLLM has no head module; ``compute_logits`` uses ``model.embed_tokens``, built as
``VocabParallelEmbedding(vocab, hidden)`` without ``quant_config`` (vllm/model_executor/models/commandr.py,
``CohereModel.__init__``; the same in 0.26, 0.32 and 0.33). That embedding is rebuilt with the config, which then
treats it as a tied head (the model always ties: vLLM drops any ``lm_head`` weight)."""

from __future__ import annotations

from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models import commandr
from vllm.model_executor.models.utils import maybe_prefix

from vllm_lmhead_quant.models.common import announce, head_config


class CohereForCausalLM(commandr.CohereForCausalLM):
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
