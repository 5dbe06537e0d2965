"""Command-R (Cohere, Cohere2): vLLM has no head module; ``compute_logits`` uses ``model.embed_tokens``, built as
``VocabParallelEmbedding(vocab, hidden)`` without ``quant_config`` (vllm/model_executor/models/commandr.py,
``CohereModel.__init__``; the same in 0.26, 0.32 and 0.33). That embedding is rebuilt with the config, which then
treats it as a tied head (the model always ties: vLLM drops any ``lm_head`` weight)."""

from __future__ import annotations

from vllm.model_executor.models import commandr

from vllm_lmhead_quant.models.common import rebuild_embedding_head


class CohereForCausalLM(commandr.CohereForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        rebuild_embedding_head(self, vllm_config, prefix)
