"""Which method class every layer gets, with vLLM's ``--quantization SCHEME`` alone and with each of our methods plus
``{"lm_head_quant": {"body": SCHEME}}``, for every online scheme of the installed vLLM. Run in a subprocess by
tests/test_online_body.py (it needs its own one-rank process group).

Everything is vLLM's own: ``EngineArgs(...).create_engine_config()`` builds the configs the CLI builds (so
``--quantization SCHEME`` goes through vLLM's ``resolve_quantization_config`` and ``get_quant_config``), then
``initialize_model`` constructs the real model class under ``set_current_vllm_config``, where each layer asks the
quantization config for its method and creates its weights. No weights are loaded: a scheme whose method refuses
this machine when it is constructed (no CPU kernel, Blackwell-only) is recorded with the error and the vLLM method
class that raised it, so that refusal is compared too.

``qc`` variants use vLLM >= 0.32's own ``--quantization-config`` composition instead of ``body`` (and both at once).
``self`` variants force our own delegation (vLLM 0.26's path, ``_compat.composes_online_quantization() == False``)
on this vLLM, so that path runs against vLLM's real online classes here as well.

    python tests/online_body_dispatch.py '{"llama": "/path/to/tiny", ...}'   ->  one JSON object on stdout
"""

from __future__ import annotations

import json
import os
import sys

for _key, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}.items():
    os.environ.setdefault(_key, _value)

HEADS = ("bf16_last_layer_fp32", "int8_lm_head", "fp8_lm_head")


def qualname(obj) -> str:
    return type(obj).__module__ + "." + type(obj).__qualname__


def raised_in(exc: BaseException) -> str | None:
    """The vLLM quantize-method class whose code raised (deepest traceback frame with such a ``self``)."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    found, tb = None, exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, QuantizeMethodBase):
            found = qualname(owner)
        tb = tb.tb_next
    return found


def build(path: str, quantization: str, body: str | None, quantization_config: dict | None = None) -> dict:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model

    extra = {"lm_head_quant": {"body": body}} if body else {}
    args = EngineArgs(
        model=path, quantization=quantization, quantization_config=quantization_config, additional_config=extra,
        dtype="bfloat16", max_model_len=256, enforce_eager=True, kv_cache_memory_bytes=64 << 20,
    )  # fmt: skip
    try:
        vc = args.create_engine_config()
        with set_current_vllm_config(vc), torch.device("cpu"):
            model = initialize_model(vllm_config=vc)
    except Exception as exc:  # noqa: BLE001 - recorded: vLLM's own refusal is part of the comparison
        return {"error": f"{type(exc).__name__}: {exc}", "raised_in": raised_in(exc)}
    qc = vc.quant_config
    # vLLM's OnlineQuantizationConfig: the config itself (vLLM alone), composed (vLLM >= 0.32) or our own delegate
    online = getattr(qc, "online_quantization_config", None) or getattr(qc, "body_config", lambda: None)() or qc
    methods = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if getattr(module, "quant_method", None) is not None:
            methods[name] = qualname(module.quant_method)
    return {
        "config": qualname(qc),
        "online_config": qualname(online) if online is not None else None,
        "vllm_sees_online": qualname(getattr(qc, "online_quantization_config", None) or qc),
        "quantized_layers": sorted(getattr(online, "quantized_layers", {}) or {}),
        "methods": methods,
    }


def init_group(path: str) -> None:
    """vLLM's own one-rank process group on gloo (the parallel layers ask for their rank), as its tests set it up."""
    import tempfile

    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs

    with set_current_vllm_config(EngineArgs(model=path, max_model_len=256).create_engine_config()):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"file://{tempfile.mktemp(prefix='lmhq-dist-')}",
        )  # fmt: skip
        initialize_model_parallel(tensor_model_parallel_size=1)


def main() -> None:
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

    import vllm_lmhead_quant
    from vllm_lmhead_quant import _compat, body

    vllm_lmhead_quant.register()
    paths = json.loads(sys.argv[1])
    init_group(paths.get("qwen3_moe") or next(iter(paths.values())))  # an MoE config: vLLM then makes the EP group
    out = {"schemes": body.schemes(), "composes": _compat.composes_online_quantization(), "cases": {}}
    native = _compat.composes_online_quantization
    for arch, path in paths.items():
        for scheme in body.schemes():
            case = out["cases"][f"{arch}/{scheme}"] = {"vllm": build(path, scheme, None)}
            for head in HEADS:
                case[head] = build(path, head, scheme)
            _compat.composes_online_quantization = lambda: False  # vLLM 0.26's path, on this vLLM
            try:
                case["self/int8_lm_head"] = build(path, "int8_lm_head", scheme)
            finally:
                _compat.composes_online_quantization = native
            if native() and scheme == "fp8_per_channel":  # vLLM >= 0.32's own composition, without "body"
                spec = {"linear": scheme, "moe": scheme}
                case["qc/int8_lm_head"] = build(path, "int8_lm_head", None, spec)
                case["qc+body/int8_lm_head"] = build(path, "int8_lm_head", scheme, spec)
    destroy_model_parallel()
    destroy_distributed_environment()
    print("@@RESULT@@" + json.dumps(out) + "@@RESULT@@", flush=True)


if __name__ == "__main__":
    main()
