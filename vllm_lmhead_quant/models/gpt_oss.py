"""GPT-OSS: vLLM builds ``lm_head = ParallelLMHead(vocab, hidden, prefix=...)`` without ``quant_config``
(vllm/model_executor/models/gpt_oss.py, ``GptOssForCausalLM.__init__``; the same in 0.26, 0.32 and 0.33). The model
never ties its head, so only the head is rebuilt."""

from __future__ import annotations

from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models import gpt_oss
from vllm.model_executor.models.utils import maybe_prefix

from vllm_lmhead_quant.models.common import announce, head_config


class GptOssForCausalLM(gpt_oss.GptOssForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = head_config(vllm_config, self.lm_head)
        if config is None:
            return
        self.lm_head = ParallelLMHead(
            self.config.vocab_size, self.config.hidden_size, quant_config=config, prefix=maybe_prefix(prefix, "lm_head")
        )
        announce(vllm_config, "lm_head")
