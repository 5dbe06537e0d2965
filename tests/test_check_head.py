"""check.find_head finds the LM head and the input embedding by type, whatever a model names them (lm_head, output,
output_layer; embed_tokens, tok_embeddings, word_embeddings, wte), and inspect_model runs on models without
``embed_tokens`` or ``*norm`` names. The unit tests build module trees from vLLM's own vocab-parallel classes."""

from __future__ import annotations

import pytest
import torch
from helpers import cached_run
from torch import nn
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

from vllm_lmhead_quant.check import check_model, find_head, inspect_model
from vllm_lmhead_quant.config import FP32HeadConfig
from vllm_lmhead_quant.methods.fp32_head import FP32HeadMethod
from vllm_lmhead_quant.methods.quantized_head import QuantizedHeadMethod
from vllm_lmhead_quant.quant import INT8

V, H = 256, 16
FP32 = "vllm_lmhead_quant.methods.fp32_head.FP32HeadMethod"


def _filled(layer):
    layer.weight.data.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    return layer


# disable_tp: one shard holds the whole table, so no distributed state is needed.
def embedding(quant_config=None) -> VocabParallelEmbedding:
    return _filled(VocabParallelEmbedding(V, H, torch.bfloat16, quant_config=quant_config, disable_tp=True))


def lm_head(quant_config=None) -> ParallelLMHead:
    return _filled(ParallelLMHead(V, H, params_dtype=torch.bfloat16, quant_config=quant_config, disable_tp=True))


class Toy(nn.Module):
    """Modules at dotted names (one module may sit at several, like an aliased head); logits from ``logits_from``."""

    def __init__(self, modules: dict, logits_from: str):
        super().__init__()
        for name, module in modules.items():
            *path, leaf = name.split(".")
            parent = self
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, module)
        self.logits_from = logits_from

    def compute_logits(self, hidden):
        head = self.get_submodule(self.logits_from)
        return head.quant_method.apply(head, hidden)


def gpt2_like() -> Toy:
    wte, ln_f = embedding(), nn.LayerNorm(H, dtype=torch.bfloat16)
    return Toy({"transformer.wte": wte, "transformer.ln_f": ln_f, "lm_head": lm_head().tie_weights(wte)}, "lm_head")


@pytest.mark.parametrize(
    ("embed_name", "head_name"),
    [
        ("model.embed_tokens", "lm_head"),  # Llama
        ("model.tok_embeddings", "output"),  # InternLM2
        ("transformer.embedding.word_embeddings", "transformer.output_layer"),  # ChatGLM
    ],
)
@pytest.mark.parametrize("flag", [False, True], ids=["no-flag", "flag"])
def test_untied_head_any_name(embed_name, head_name, flag):
    # With the flag, built in model order through our config: the embedding's candidate method goes back to vLLM's.
    config = FP32HeadConfig() if flag else None
    model = Toy({embed_name: embedding(config), head_name: lm_head(config)}, head_name)
    head, embed = find_head(model)
    assert head is model.get_submodule(head_name) and embed is model.get_submodule(embed_name)
    assert isinstance(head.quant_method, FP32HeadMethod) is flag


def test_gpt2_tied():
    model = gpt2_like()
    assert find_head(model) == (model.lm_head, model.transformer.wte)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_logits_from_the_embedding():
    """Gemma2-style: no ParallelLMHead, the input embedding is the head (without the flag and with it)."""
    model = Toy({"model.embed_tokens": embedding()}, "model.embed_tokens")
    assert find_head(model) == (model.model.embed_tokens, model.model.embed_tokens)
    model.model.embed_tokens.quant_method = FP32HeadMethod()  # what our config leaves on it in such a model
    assert find_head(model) == (model.model.embed_tokens, model.model.embed_tokens)


def test_tied_quantize_shares_one_table():
    """``tied: quantize``: tie_weights keeps the head module; both it and the input embedding hold our method."""
    embed, head = embedding(), lm_head()
    head.quant_method = QuantizedHeadMethod(fmt=INT8, method_name="int8_lm_head", shared=True)
    model = Toy({"model.embed_tokens": embed, "lm_head": head.tie_weights(embed)}, "lm_head")
    assert model.lm_head is head and embed.quant_method is head.quant_method and head.weight is embed.weight
    assert find_head(model) == (head, embed)


def test_our_method_wins_over_order():
    """A plain ParallelLMHead listed first (an extra head) does not hide the one holding our method."""
    ours = lm_head()
    ours.quant_method = FP32HeadMethod()
    model = Toy({"model.tok_embeddings": embedding(), "mtp.head": lm_head(), "output": ours}, "output")
    assert find_head(model)[0] is ours


def test_input_embedding_is_the_one_tied_to_the_head():
    codebook, tokens = embedding(), embedding()
    tied = Toy({"codebook": codebook, "model.embed_tokens": tokens, "lm_head": lm_head().tie_weights(tokens)}, "x")
    assert find_head(tied) == (tied.lm_head, tokens)
    untied = Toy({"codebook": codebook, "model.embed_tokens": tokens, "lm_head": lm_head()}, "x")
    assert find_head(untied) == (untied.lm_head, codebook)  # nothing shared: the first


def test_no_vocab_modules():
    assert find_head(Toy({"proj": nn.Linear(H, V)}, "proj")) == (None, None)
    assert inspect_model(Toy({"proj": nn.Linear(H, V)}, "proj"))[1] == {}


@pytest.mark.parametrize("flag", [False, True], ids=["no-flag", "flag"])
def test_inspect_gpt2_like(flag):
    """No ``embed_tokens`` and no ``*norm.weight``: the head's facts, and logits in the model dtype or fp32."""
    model = gpt2_like()
    if flag:
        model.lm_head.quant_method = FP32HeadMethod()
    for module in (model.transformer.wte, model.lm_head):  # what vLLM's loader does after loading
        module.quant_method.process_weights_after_loading(module)
    methods, head = inspect_model(model)
    assert methods["lm_head"] == (FP32 if flag else methods["transformer.wte"])
    assert head["class"] == "ParallelLMHead"
    assert head["shape"] == (V, H) and head["dtype"] == "torch.bfloat16" and head["param_bytes"] == 2 * V * H
    assert head["shares_embed_weight"] and not head["is_embed_module"]
    assert head["embed_dtype"] == "torch.bfloat16" and head["scale_shape"] is None
    assert head["logits_dtype"] == ("torch.float32" if flag else "torch.bfloat16")


@pytest.mark.engine
def test_check_gpt2(tiny):
    """A real tiny GPT-2 (head lm_head tied to transformer.wte, final norm ln_f): check finds the head and passes.
    cached_run shares the engines with the model matrix's gpt2 cell when both run."""
    path = tiny("gpt2")
    (fp32,) = check_model(path, methods=("bf16_last_layer_fp32",), runner=cached_run)
    assert fp32.ok and fp32.bitwise_oracle and fp32.others_unchanged, fp32
    assert fp32.head_method == FP32 and fp32.head_dtype == "torch.bfloat16" and fp32.head_bytes == 2 * 2048 * 128
    ours, base = cached_run(path, quantization="bf16_last_layer_fp32"), cached_run(path)  # check_model's runs
    assert ours.head["class"] == "ParallelLMHead" and ours.head["shares_embed_weight"]
    assert ours.head["logits_dtype"] == "torch.float32" and base.head["logits_dtype"] == "torch.bfloat16"
    assert ours.methods["lm_head"] == FP32 and base.methods["lm_head"] == ours.methods["transformer.wte"]
