"""Offline: fp32 logprobs from a bf16 model with LLM(..., quantization="bf16_last_layer_fp32").

    python examples/offline_fp32_logprobs.py [MODEL_DIR]

Without MODEL_DIR it builds the built-in tiny model (no download). The plugin needs no import: vLLM loads it
through its ``vllm.general_plugins`` entry point in every process.
"""

import sys

from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    if len(sys.argv) > 1:
        model = sys.argv[1]
    else:
        from vllm_lmhead_quant.tiny import cached_model

        model = str(cached_model("llama"))
    llm = LLM(model=model, quantization="bf16_last_layer_fp32", dtype="bfloat16",
              max_model_len=256, kv_cache_memory_bytes=64 << 20)  # fmt: skip
    params = SamplingParams(max_tokens=8, temperature=1.0, logprobs=1, seed=0)
    for out in llm.generate(["def main():"], params):
        for tok, step in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
            print(tok, step[tok].logprob)  # fp32 logprobs, as an fp32-head trainer computes them
