"""The second never-silent signal (config._watch): a check before the first forward of the first linear layer. It
needs nothing from vLLM but running the model, so it holds for attention-free models and if vLLM stops asking
attention layers for their method again after loading (the first signal). Real vLLM layers, no engine."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_lmhead_quant.config import FP32HeadConfig, Int8HeadConfig
from vllm_lmhead_quant.methods.bf16_head import HeadNotBoundError


class _Linear(LinearBase):
    """vLLM's LinearBase (which asks the config for its method) with a plain weight: vLLM's own linear classes need
    a tensor-parallel group for their parameters, which a unit test in the engines' process must not create."""

    def __init__(self, config, n: int = 16):
        super().__init__(n, n, quant_config=config, prefix="model.layers.0.mlp.up_proj", disable_tp=True)
        self.weight = torch.nn.Parameter(torch.randn(n, n), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight), None


def _linear(config, n: int = 16) -> _Linear:
    return _Linear(config, n)


@pytest.mark.parametrize("config_cls", [FP32HeadConfig, Int8HeadConfig])
def test_a_model_that_never_offers_its_head_fails_at_its_first_forward(config_cls):
    """An attention-free stack whose head and embedding are built without the config: no attention layer is ever
    asked twice, so only the watch can tell."""
    config = config_cls()
    first, second = _linear(config), _linear(config)
    assert type(first.quant_method) is UnquantizedLinearMethod  # vLLM's own class: the layer computes as before
    assert len(first._forward_pre_hooks) == 1 and not second._forward_pre_hooks  # one watch per model
    with pytest.raises(HeadNotBoundError, match=rf"--quantization {config.name}: .* would silently do nothing"):
        first(torch.randn(2, 16, dtype=torch.bfloat16).float())


def test_a_bound_head_passes_and_the_watch_goes_away():
    config = Int8HeadConfig()
    linear = _linear(config)
    ParallelLMHead(64, 16, quant_config=config, prefix="lm_head", disable_tp=True)
    x = torch.randn(2, 16)
    out, _ = linear(x)
    assert torch.equal(out, x @ linear.weight.T)  # untouched maths
    assert not linear._forward_pre_hooks  # removed after its first eager call: no per-step cost
