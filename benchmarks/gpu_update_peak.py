"""GPU memory of one RL weight update of a quantized head, and the engine's start-up line about its kernel path.

    python benchmarks/gpu_update_peak.py --out DIR [--formats int8,fp8]

A vLLM engine (vLLM's dummy weights, 2 Qwen3 layers, hidden 4096, vocab 151936: an 8B model's head) with each
quantized head; inside the worker, one full-vocabulary bf16 update through the pre-chunking path (vLLM's loader into a
full-size staging tensor, then quantize) and through ``model.load_weights`` (the chunked loader). Reports the peak
of ``torch.cuda.max_memory_allocated`` above the memory allocated before each update, the time, and whether both
paths give the same bits. Writes update_peak.json into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_e2e  # noqa: E402  (sets vLLM's single-process env defaults)
import torch  # noqa: E402

gpu_e2e.MODELS["qwen3-h4096-2l-dummy"] = dict(arch="qwen3", hidden=4096, inter=12288, layers=2, heads=32, kv=8,
                                              tied=False, dummy=True)  # fmt: skip


def measure(model) -> dict:
    head = model.lm_head
    loader = head.weight.weight_loader
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(head.org_vocab_size, head.weight.shape[1], device="cuda", generator=g).to(torch.bfloat16) * 0.02

    def peak(fn) -> tuple[float, float]:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, (time.perf_counter() - t) * 1e3

    staged_mib, staged_ms = peak(lambda: loader._staged(head.weight, w))
    q, s = head.weight.data.clone(), head.weight_scale.data.clone()
    chunked_mib, chunked_ms = peak(lambda: model.load_weights([("lm_head.weight", w)]))
    same = torch.equal(head.weight.data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(head.weight_scale, s)
    return {"head_shape": list(head.weight.shape), "head_dtype": str(head.weight.dtype),
            "bf16_head_mib": head.weight.numel() * 2 / 2**20,
            "staged_peak_mib": staged_mib, "staged_ms": staged_ms, "chunked_peak_mib": chunked_mib,
            "chunked_ms": chunked_ms, "same_bits": same}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--formats", default="int8,fp8")
    args = ap.parse_args()
    import vllm_lmhead_quant

    vllm_lmhead_quant.register()  # the entry point does this when the package is pip-installed
    path = gpu_e2e.build("qwen3-h4096-2l-dummy", "/tmp/lmhq-models")
    formats = args.formats.split(",")
    if len(formats) > 1:  # one engine per process: an in-process engine does not give its KV cache back
        results = {}
        for fmt in formats:
            subprocess.run([sys.executable, __file__, "--formats", fmt, "--out", str(args.out / fmt)], check=True)
            results.update(json.loads((args.out / fmt / "update_peak.json").read_text()))
    else:
        results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        llm = gpu_e2e.engine(path, True, quantization=f"{formats[0]}_lm_head", **gpu_e2e.DUMMY_KW)
        results[formats[0]] = llm.apply_model(measure)[0]
        print(formats[0], results[formats[0]], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "update_peak.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
