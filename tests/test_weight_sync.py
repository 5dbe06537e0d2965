"""RL weight updates pushed into a running engine reach the head at once: the fp32 head reads the live weight, the
FP8/INT8 heads are re-quantized from the new weights in place. After the updates the engine's logprobs are bitwise equal
to a fresh engine loaded with the final weights, and the head's storage neither moves nor grows."""

from __future__ import annotations

import functools
import gc

import pytest
from helpers import ENGINE_ARGS, PROMPTS

pytestmark = pytest.mark.engine
QUANTIZE_TIED = {"additional_config": {"lm_head_quant": {"tied": "quantize"}}}
FP8_BODY = {"additional_config": {"lm_head_quant": {"body": "fp8_per_channel"}}}  # vLLM's online FP8 for the body
CASES = {
    "fp32-untied": ("bf16_last_layer_fp32", False, {}),
    "fp8-untied": ("fp8_lm_head", False, {}),
    "fp8-tied-quantize": ("fp8_lm_head", True, QUANTIZE_TIED),
    "int8-untied": ("int8_lm_head", False, {}),
    "int8-tied-quantize": ("int8_lm_head", True, QUANTIZE_TIED),
    "fp32-untied-fp8-body": ("bf16_last_layer_fp32", False, FP8_BODY),
    "int8-untied-fp8-body": ("int8_lm_head", False, FP8_BODY),
    "int8-g32-tied-quantize": (
        "int8_lm_head",
        True,
        {"additional_config": {"lm_head_quant": {"tied": "quantize", "group_size": 32}}},
    ),
}


HEAD_NAMES = ("lm_head.weight", "model.embed_tokens.weight")


def _load_checkpoint(path: str, model) -> None:
    """What an RL framework does each step: stream new tensors into model.load_weights (worker side). Only the
    head/embedding tensors: vLLM's CPU backend drops linear layers' weights after prepacking them, so it cannot
    take body updates this way (a vLLM CPU limit; on GPUs the whole model reloads like this)."""
    from safetensors.torch import load_file

    tensors = load_file(f"{path}/model.safetensors")
    model.load_weights(weights=((k, v) for k, v in tensors.items() if k in HEAD_NAMES))


def _checkpoints(base, tmp_path, n: int, names=HEAD_NAMES) -> list:
    """``base`` plus n variants that differ in the tensors ``names`` (default: the head/embedding table, RL steps
    that move the head)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    paths = [base]
    tensors = load_file(f"{base}/model.safetensors")
    for step in range(1, n + 1):
        new = dict(tensors)
        g = torch.Generator().manual_seed(step)
        for k in names:
            if k in new:
                new[k] = (torch.randn(new[k].shape, generator=g) * 0.1).to(new[k].dtype)
        out = tmp_path / f"step{step}"
        shutil.copytree(base, out, ignore=shutil.ignore_patterns("model.safetensors"))
        save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
        paths.append(out)
    return paths


def _head_storage(model) -> tuple:
    head = model.lm_head
    return tuple((n, p.data_ptr(), p.numel() * p.element_size(), str(p.dtype)) for n, p in head.named_parameters())


def _logprobs(llm):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, prompt_logprobs=5)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [
        ([{t: lp.logprob for t, lp in s.items()} for s in o.prompt_logprobs[1:]],
         list(o.outputs[0].token_ids),
         [{t: lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs])
        for o in outs
    ]  # fmt: skip


def _fresh_logprobs(path, method: str, extra: dict):
    """What the updated engine must compute: a fresh engine loaded with the final weights."""
    from vllm import LLM

    fresh = LLM(model=str(path), quantization=method, **ENGINE_ARGS, **extra)
    try:
        return _logprobs(fresh)
    finally:
        del fresh
        gc.collect()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("how", ["load_weights", "reload_weights"])
def test_updates_reach_the_head(tiny, tmp_path, case, how):
    from vllm import LLM

    method, tied, extra = CASES[case]
    ckpts = _checkpoints(tiny("llama", tied=tied), tmp_path, 3)
    expected = _fresh_logprobs(ckpts[-1], method, extra)
    llm = LLM(model=str(ckpts[0]), quantization=method, **ENGINE_ARGS, **extra)
    try:
        storage = llm.apply_model(_head_storage)[0]
        before = _logprobs(llm)
        for path in ckpts[1:]:
            if how == "load_weights":
                llm.apply_model(functools.partial(_load_checkpoint, str(path)))
            else:  # vLLM's own in-place reload (layer-wise, re-runs process_weights_after_loading)
                llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        after = _logprobs(llm)
        assert llm.apply_model(_head_storage)[0] == storage  # same tensors, same bytes: nothing grew or moved
    finally:
        del llm
        gc.collect()
    assert before != expected  # the updates changed something
    assert after == expected  # ...and exactly what a fresh engine on the final weights computes


BODY_LINEAR = "model.layers.0.mlp.down_proj"


def _body_layer(model) -> tuple:
    layer = model.get_submodule(BODY_LINEAR)
    return type(layer.quant_method).__name__, str(layer.weight.dtype), layer.weight.float().abs().sum().item()


@pytest.mark.parametrize("method", ["bf16_last_layer_fp32", "int8_lm_head"])
def test_reload_requantizes_an_online_body_and_the_head(tiny, tmp_path, method):
    """vLLM's ``reload_weights`` with ``"body": "fp8_per_channel"``: updates that move a body linear layer and the head
    leave the engine bitwise equal to a fresh one on the final weights; the body layer is still vLLM's online FP8."""
    from vllm import LLM

    names = (*HEAD_NAMES, f"{BODY_LINEAR}.weight")
    ckpts = _checkpoints(tiny("llama", tied=False), tmp_path, 2, names=names)
    expected = _fresh_logprobs(ckpts[-1], method, FP8_BODY)
    llm = LLM(model=str(ckpts[0]), quantization=method, **ENGINE_ARGS, **FP8_BODY)
    try:
        body = llm.apply_model(_body_layer)[0]
        assert body[:2] == ("Fp8PtpcOnlineLinearMethod", "torch.float8_e4m3fn"), body
        before = _logprobs(llm)
        for path in ckpts[1:]:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        after = _logprobs(llm)
        reloaded = llm.apply_model(_body_layer)[0]
        assert reloaded[:2] == body[:2] and reloaded[2] != body[2]  # still online FP8, with the new values
    finally:
        del llm
        gc.collect()
    assert before != expected
    assert after == expected
