"""OPT: vLLM builds ``model.decoder.embed_tokens`` and ``lm_head`` without ``quant_config``
(vllm/model_executor/models/opt.py, ``OPTDecoder.__init__`` and ``OPTForCausalLM.__init__``; the same in 0.26, 0.32
and 0.33). Both are rebuilt with the config and tied as vLLM tied them (``common.rebuild_embedding_and_head``)."""

from __future__ import annotations

from vllm.model_executor.models import opt

from vllm_lmhead_quant.models.common import rebuild_embedding_and_head


class OPTForCausalLM(opt.OPTForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        rebuild_embedding_and_head(self, vllm_config, prefix, "model.decoder.embed_tokens")
