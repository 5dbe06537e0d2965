"""Offline: fp32 logprobs from a bf16 model with LLM(..., quantization="bf16_last_layer_fp32").

    python examples/offline_fp32_logprobs.py [MODEL_DIR]      (after `bash tools/bootstrap.sh`; uses .venv)

Without MODEL_DIR it builds the built-in tiny model (random weights, no download). The plugin needs no import: vLLM
loads it through its ``vllm.general_plugins`` entry point in every process. The engine runs in vLLM's default
multi-process layout; ``enforce_eager`` skips a ~50 s torch.compile on CPU (drop it on a GPU for CUDA graphs).
"""

import gc
import os
import sys

from _venv import use_venv

use_venv()
# How long vLLM waits for its engine's worker process to exit before it kills it (default 5 s): that exit alone takes
# 5-8 s on 2 busy CPU cores, and a killed worker leaves its shared memory to Python's resource tracker. An upper bound.
os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "30")

from vllm import LLM, SamplingParams  # noqa: E402

if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    if len(sys.argv) > 1:
        model = sys.argv[1]
    else:
        from vllm_lmhead_quant.tiny import cached_model

        model = str(cached_model("llama"))
    llm = LLM(model=model, quantization="bf16_last_layer_fp32", dtype="bfloat16", enforce_eager=True,
              max_model_len=256, kv_cache_memory_bytes=64 << 20)  # fmt: skip
    params = SamplingParams(max_tokens=8, temperature=1.0, logprobs=1, seed=0)
    out = llm.generate(["def main():"], params, use_tqdm=False)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    # Shut the engine down before the interpreter exits: its processes stop cleanly instead of being killed late.
    del llm
    gc.collect()
    print(f"{'token id':>8}  {'text':<12} logprob (fp32)")
    for tok, step in zip(out.token_ids, out.logprobs):
        print(f"{tok:>8}  {tokenizer.decode([tok])!r:<12} {step[tok].logprob:.8f}")
    print(
        "Each logprob is log softmax of fp32 logits (bf16 weights and activations, fp32 GEMM output): what an RL "
        "trainer with an fp32 head computes for the same token. Random tiny model without MODEL_DIR: gibberish text."
    )
