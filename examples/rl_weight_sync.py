"""A complete RL-style loop: load, generate with logprobs, push new weights into the running engine, check.

    python examples/rl_weight_sync.py [--method int8_lm_head|fp8_lm_head|bf16_last_layer_fp32] [--steps 100]
                                      [--tied-quantize]          (after `bash tools/bootstrap.sh`; uses .venv)

Each step a stand-in "trainer" moves the head (new random head/embedding table) and pushes it with
``model.load_weights`` inside the worker (``LLM.apply_model``; RL frameworks do the same through ``collective_rpc``
or a worker extension). At the end the engine's logprobs must be bitwise equal to a fresh engine loaded with the
final weights, and the head's tensors must be the same storage with the same bytes (no growth, no stale copies).
Runs on the built-in tiny model on CPU; on a GPU pass --model.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import resource
import sys
import tempfile
import time

from _venv import use_venv

use_venv()
# In-process engines, eager: each starts in seconds on CPU (vLLM settings for this example; drop them on a GPU).
for _k, _v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "VLLM_NO_USAGE_STATS": "1"}.items():
    os.environ.setdefault(_k, _v)

HEAD_NAMES = ("lm_head.weight", "model.embed_tokens.weight")


def push(tensors: dict, model) -> None:
    """Worker side: what an RL framework's weight sync calls."""
    model.load_weights(weights=iter(tensors.items()))


def head_storage(model) -> tuple:
    params = model.lm_head.named_parameters()
    return tuple((n, p.data_ptr(), p.numel() * p.element_size(), str(p.dtype)) for n, p in params)


def logprobs(llm) -> list:
    from vllm import SamplingParams

    outs = llm.generate(["def main():", "import os"], SamplingParams(max_tokens=8, temperature=0, logprobs=3),
                        use_tqdm=False)  # fmt: skip
    return [[{t: lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs] for o in outs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir (default: the built-in tiny Llama)")
    ap.add_argument("--method", default="int8_lm_head", choices=["int8_lm_head", "fp8_lm_head", "bf16_last_layer_fp32"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tied-quantize", action="store_true", help="tied tiny model, one quantized shared table")
    args = ap.parse_args()

    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from vllm import LLM

    from vllm_lmhead_quant.tiny import cached_model

    model = args.model or str(cached_model("llama", tied=args.tied_quantize))
    extra = {"additional_config": {"lm_head_quant": {"tied": "quantize"}}} if args.tied_quantize else {}
    engine = dict(dtype="bfloat16", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20,
                  quantization=args.method, **extra)  # fmt: skip
    base = load_file(f"{model}/model.safetensors")
    head = {k: v for k, v in base.items() if k in HEAD_NAMES}

    llm = LLM(model=model, **engine)
    storage = llm.apply_model(head_storage)[0]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        llm.generate(["x = "], use_tqdm=False)  # the rollout of this step
        g = torch.Generator().manual_seed(step)
        new = {k: (torch.randn(v.shape, generator=g) * 0.1).to(v.dtype) for k, v in head.items()}
        llm.apply_model(functools.partial(push, new))  # the weight sync of this step
    sync_s = time.perf_counter() - t0
    final = logprobs(llm)
    same_storage = llm.apply_model(head_storage)[0] == storage
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del llm
    gc.collect()

    with tempfile.TemporaryDirectory() as tmp:  # a fresh engine on the final weights
        shutil.copytree(model, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
        save_file({**base, **new}, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        fresh = LLM(model=tmp, **engine)
        expected = logprobs(fresh)
        del fresh

    exact = final == expected
    print(f"{args.method}{' (tied, quantize)' if args.tied_quantize else ''}: {args.steps} updates in {sync_s:.1f} s")
    print(f"  logprobs bitwise equal to a fresh engine on the final weights: {exact}")
    print(f"  head tensors unchanged (same storage, same bytes): {same_storage}; {storage}")
    print(f"  peak RSS during the updates: {rss0 / 1024:.0f} MiB -> {rss1 / 1024:.0f} MiB")
    print(
        "Each update reached the head in place (a quantized head re-quantizes the new rows: same tensors, same "
        "bytes), and the engine then answers exactly as one freshly loaded with the final weights."
        if exact and same_storage
        else "FAILED: the updated engine differs from a fresh one, or the head's tensors changed (see above)."
    )
    return 0 if exact and same_storage else 1


if __name__ == "__main__":
    sys.exit(main())
