"""vllm_lmhead_quant: vLLM quantization methods that change only the LM head.

``--quantization bf16_last_layer_fp32``
    bf16 weights and activations, fp32 logits (bf16 x bf16 -> fp32 GEMM), so sampled logprobs match an RL
    trainer that computes its head in fp32.
``--quantization int8_lm_head``
    the head weight is stored as symmetric INT8 with per-vocab-row scales after loading; the freed bytes go to the
    KV cache. The memory option to use: 4-5x less logprob error than FP8 on a real model (docs/accuracy.md).
``--quantization fp8_lm_head``
    the same with FP8 e4m3 weights.

vLLM finds this package through the ``vllm.general_plugins`` entry point and calls :func:`register` in every
process (API server, engine core, workers). Importing the package does not import vLLM, so the trainer-side
code can be used without it.
"""

from __future__ import annotations

__version__ = "0.1.0"

METHOD_NAMES = ("bf16_last_layer_fp32", "fp8_lm_head", "int8_lm_head")

_registered = False


def register() -> None:
    """Register the quantization methods with vLLM, and our model subclasses for the architectures whose head vLLM
    builds without the quantization config (models/). Idempotent and cheap after the first call."""
    global _registered
    if _registered:
        return
    # Importing the config module runs vLLM's @register_quantization_config decorators.
    from vllm_lmhead_quant import config  # noqa: F401
    from vllm_lmhead_quant.models import register_models

    register_models()  # lazy "module:Class" entries: no model code is imported here

    _registered = True
