"""Trainer twin: the RL trainer's logprobs computed with the rollout engine's fp32-head numerics.

    python examples/trainer_twin.py [MODEL_DIR]

Without MODEL_DIR it uses the built-in tiny Llama (no download). It samples rollouts from vLLM with
``quantization="bf16_last_layer_fp32"``, scores the same tokens with a bf16 vLLM engine, then with transformers
twice (plain bf16 head, then ``enable_fp32_lm_head``), and prints how far each trainer/engine pair disagrees.
"""

import gc
import sys

import torch
from transformers import AutoModelForCausalLM
from vllm import LLM, SamplingParams

from vllm_lmhead_quant.trainer import enable_fp32_lm_head, logprob_mismatch, token_logprobs

PROMPTS = ["def main():\n    return", "import os\nimport sys\n", "class Cache:\n    def get(self, key"]
ENGINE = dict(dtype="bfloat16", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20, seed=0)


def engine_logprobs(model, sequences=None, **kwargs):
    """Sample rollouts if ``sequences`` is None; return them and the engine's logprob of every token after the first."""
    llm = LLM(model=model, **ENGINE, **kwargs)
    if sequences is None:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=48, temperature=1.0, seed=0, n=2, ignore_eos=True))
        sequences = [list(o.prompt_token_ids) + list(c.token_ids) for o in outs for c in o.outputs]
    # prompt_logprobs=0: each position's dict holds just the actual token's logprob (position 0 is None).
    outs = llm.generate([{"prompt_token_ids": s} for s in sequences], SamplingParams(max_tokens=1, prompt_logprobs=0))
    del llm
    gc.collect()
    return sequences, [
        step[t].logprob for o, s in zip(outs, sequences) for step, t in zip(o.prompt_logprobs[1:], s[1:])
    ]


def trainer_logprobs(hf_model, sequences):
    with torch.no_grad():
        return [
            lp
            for s in sequences
            for lp in token_logprobs(hf_model(torch.tensor([s])).logits[0, :-1], torch.tensor(s[1:])).tolist()
        ]


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    if len(sys.argv) > 1:
        model = sys.argv[1]
    else:
        from vllm_lmhead_quant.tiny import cached_model

        model = str(cached_model("llama"))
    sequences, infer_fp32 = engine_logprobs(model, quantization="bf16_last_layer_fp32")
    _, infer_bf16 = engine_logprobs(model, sequences)

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    train_bf16 = trainer_logprobs(hf, sequences)
    train_fp32 = trainer_logprobs(enable_fp32_lm_head(hf), sequences)  # same bf16 weights, fp32 logits

    print(f"{'pair (vLLM vs transformers)':32} {'RMS nats':>10} {'max |d|':>10} {'Pearson':>12} {'mismatch KL k3':>15}")
    for name, infer, train in (
        ("fp32 head: plugin vs twin", infer_fp32, train_fp32),
        ("bf16 head: vLLM vs HF", infer_bf16, train_bf16),
    ):
        m = logprob_mismatch(infer, train)
        print(f"{name:32} {m['rms']:10.3e} {m['max_abs']:10.3e} {m['pearson']:12.9f} {m['k3']:15.3e}")
