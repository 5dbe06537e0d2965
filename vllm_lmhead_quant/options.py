"""Per-engine options of the head methods, read from vLLM's ``--additional-config``.

Why ``additional_config``: it is vLLM's documented place for plugin settings, it reaches every engine
process with the VllmConfig, and it is part of the config hash. Env vars were rejected upstream for this
kind of switch (vLLM #23810) and ``--quantization-config`` cannot be combined with a custom method name.

    vllm serve MODEL --quantization int8_lm_head \
        --additional-config '{"lm_head_quant": {"logits_dtype": "model", "tied": "quantize"}}'
    vllm serve MODEL --quantization int8_lm_head --additional-config '{"lm_head_quant": {"body": "fp8_per_channel"}}'

``body`` (all three methods) quantizes every other layer with vLLM's online scheme of that name, exactly as
``--quantization SCHEME`` alone would (body.py): ``--quantization`` takes one name, so this is the only place where
both can be asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

KEY = "lm_head_quant"
_CHOICES = {
    # Quantized heads only: dtype of the logits ("auto" = "float32"; "model" = the model dtype, vLLM's usual).
    "logits_dtype": ("auto", "float32", "model"),
    # Quantized heads only: what to do when the head shares its table with the input embeddings.
    # "keep": leave the shared table in bf16 (warns once). "quantize": store the shared table quantized once and
    # dequantize embedding rows on lookup (input embeddings then carry its rounding).
    "tied": ("keep", "quantize"),
}
# All three methods: the name of one of vLLM's online quantization schemes (or None: the body stays unquantized).
# Its choices are vLLM's own (``_compat.online_quant_shorthands``), so they are read when the key is used.
BODY = "body"
# Quantized heads only: one scale per this many weights of a row along the hidden size (None: one per row). Checked
# against the hidden size when the head is quantized (quant.check_group_size names the sizes that divide it).
GROUP_SIZE = "group_size"


@dataclass(frozen=True)
class HeadOptions:
    logits_dtype: str = "auto"
    tied: str = "keep"
    body: str | None = None
    group_size: int | None = None

    @classmethod
    def from_additional_config(cls, extra: dict) -> HeadOptions:
        raw = extra.get(KEY, {})
        if not isinstance(raw, dict):
            raise ValueError(
                f'--additional-config "{KEY}" must be a JSON object such as '
                f'{{"{KEY}": {{"logits_dtype": "float32"}}}}, got {raw!r}'
            )
        allowed = {*_CHOICES, BODY, GROUP_SIZE}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f'--additional-config "{KEY}": unknown key(s) {unknown}; allowed: {sorted(allowed)}')
        for key, value in raw.items():
            if key == BODY:
                _check_body(value)
            elif key == GROUP_SIZE:
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise ValueError(
                        f'--additional-config "{KEY}.{GROUP_SIZE}" must be a positive integer such as 32 (one scale '
                        f"per 32 weights of a row) or null (one per row), got {value!r}"
                    )
            elif value not in _CHOICES[key]:
                raise ValueError(
                    f'--additional-config "{KEY}.{key}" must be one of {list(_CHOICES[key])}, got {value!r}'
                )
        return cls(**raw)


def _check_body(value: object) -> None:
    from vllm_lmhead_quant import _compat

    schemes = sorted(_compat.online_quant_shorthands())
    if value not in schemes:
        raise ValueError(
            f'--additional-config "{KEY}.{BODY}" must be one of vLLM\'s online quantization schemes {schemes}, '
            f"got {value!r}" + ("" if schemes else " (this vLLM has no online quantization)")
        )
