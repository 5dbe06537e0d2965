"""Qwen3-Next: vLLM builds ``lm_head = ParallelLMHead(vocab, hidden, prefix=...)`` without ``quant_config``
(vllm/model_executor/models/qwen3_next.py, ``Qwen3NextForCausalLM.__init__``; the same in 0.26, 0.32 and 0.33). The
model never ties its head, so only the head is rebuilt."""

from __future__ import annotations

from vllm.model_executor.models import qwen3_next

from vllm_lmhead_quant.models.common import rebuild_head


class Qwen3NextForCausalLM(qwen3_next.Qwen3NextForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        rebuild_head(self, vllm_config, prefix)
