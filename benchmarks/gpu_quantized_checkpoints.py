"""4-bit checkpoints (AWQ, GPTQ) on a GPU host: the body on vLLM's Marlin kernels, with and without our heads.

    python benchmarks/gpu_quantized_checkpoints.py --out DIR [--formats awq,gptq] [--parts accuracy,throughput]
        [--heads bf16,oracle,fp32,int8,fp8]

For each format a Qwen3-8B-shaped checkpoint is only a ``config.json`` with the format's ``quantization_config``
(AutoAWQ GEMM / AutoGPTQ, 4 bits, group 128): vLLM fills the weights itself (``load_format="dummy"``), so the body runs
exactly the kernels of a real AWQ/GPTQ release (vLLM upgrades both to Marlin on CUDA) at no download.

* accuracy (eager, 2 layers of that shape, random weights in the format's layout, vocab 151936): no flag, vLLM's
  ``head_dtype=float32`` oracle, and each of our heads; the body's method classes, ``bf16_last_layer_fp32`` bitwise
  against the oracle over the same body, INT8's logprob error, head bytes and KV-cache tokens.
* throughput (CUDA graphs, 36 layers): decode tok/s at batch 1 and 64 for vLLM's bf16 head and ``int8_lm_head``,
  KV-cache tokens and the model's load size.
Each engine runs in its own process (gpu_e2e.isolated). Writes ``gpu_quantized_checkpoints.json`` into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_e2e  # noqa: E402  (sets the engine environment before vLLM is imported)

FORMATS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
}
SHAPE = dict(hidden=4096, inter=12288, heads=32, kv=8)  # Qwen3-8B
HEADS = {"bf16": {}, "oracle": gpu_e2e.ORACLE, "fp32": gpu_e2e.FP32, "int8": gpu_e2e.INT8, "fp8": gpu_e2e.FP8}


def checkpoint(root: Path, fmt: str, layers: int, weights: bool = False) -> str:
    """``weights``: write random weights in the format's own tensor layout (for bitwise comparisons between engines:
    vLLM's dummy loader leaves integer tensors such as ``qweight`` uninitialized on CUDA, so two engines' bodies
    would differ); else config only, for ``load_format="dummy"``."""
    import transformers

    path = root / f"qwen3-8b-shape-{fmt}-{layers}l{'-w' if weights else ''}"
    if not (path / "config.json").exists():
        cfg = transformers.Qwen3Config(
            vocab_size=gpu_e2e.VOCAB, hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["inter"],
            num_hidden_layers=layers, num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv"],
            head_dim=128, tie_word_embeddings=False, max_position_embeddings=4096, torch_dtype="float16",
            architectures=["Qwen3ForCausalLM"],
        )  # fmt: skip
        cfg.quantization_config = FORMATS[fmt]
        cfg.save_pretrained(path)
        transformers.GenerationConfig.from_model_config(cfg).save_pretrained(path)
        if weights:
            write_random_4bit(path, fmt, layers)
    return str(path)


def write_random_4bit(path: Path, fmt: str, layers: int, group: int = 128) -> None:
    """Random weights stored as AutoAWQ (GEMM) or AutoGPTQ (v1) write them: every int32 bit pattern is a valid
    packing of eight 4-bit values, so random ``qweight``/``qzeros`` with small fp16 scales are a valid checkpoint."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    h, inter, v, hd = SHAPE["hidden"], SHAPE["inter"], gpu_e2e.VOCAB, 128
    q_out, kv_out = SHAPE["heads"] * hd, SHAPE["kv"] * hd

    def ints(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)

    def linear(prefix, n_in, n_out):
        scales = (torch.rand(n_in // group, n_out, generator=g) * 0.004 + 0.001).half()
        if fmt == "awq":
            return {f"{prefix}.qweight": ints(n_in, n_out // 8), f"{prefix}.qzeros": ints(n_in // group, n_out // 8),
                    f"{prefix}.scales": scales}  # fmt: skip
        g_idx = torch.arange(n_in, dtype=torch.int32) // group
        return {f"{prefix}.qweight": ints(n_in // 8, n_out), f"{prefix}.qzeros": ints(n_in // group, n_out // 8),
                f"{prefix}.scales": scales, f"{prefix}.g_idx": g_idx}  # fmt: skip

    t = {
        "model.embed_tokens.weight": (torch.randn(v, h, generator=g) * 0.02).half(),
        "lm_head.weight": (torch.randn(v, h, generator=g) * 0.02).half(),
        "model.norm.weight": torch.ones(h, dtype=torch.half),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, n_in, n_out in (("self_attn.q_proj", h, q_out), ("self_attn.k_proj", h, kv_out),
                                  ("self_attn.v_proj", h, kv_out), ("self_attn.o_proj", q_out, h),
                                  ("mlp.gate_proj", h, inter), ("mlp.up_proj", h, inter),
                                  ("mlp.down_proj", inter, h)):  # fmt: skip
            t.update(linear(f"{p}.{name}", n_in, n_out))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"{p}.{norm}.weight"] = torch.ones(h, dtype=torch.half)
        for norm in ("self_attn.q_norm", "self_attn.k_norm"):
            t[f"{p}.{norm}.weight"] = torch.ones(hd, dtype=torch.half)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--formats", default="awq,gptq")
    ap.add_argument("--parts", default="accuracy,throughput")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads", default=",".join(HEADS), help="accuracy engines to run, in this order")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    import vllm

    out_json = args.out / "gpu_quantized_checkpoints.json"
    report = json.loads(out_json.read_text()) if out_json.exists() else {}
    report.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, vllm=vllm.__version__)
    report.setdefault("formats", {})
    root = Path("/tmp/lmhq-4bit")
    ok = True
    for fmt in args.formats.split(","):
        entry = report["formats"].setdefault(fmt, {"quantization_config": FORMATS[fmt]})
        if "accuracy" in args.parts:
            path = checkpoint(root, fmt, 2, weights=True)
            runs = {}
            for head in args.heads.split(","):
                try:
                    runs[head] = gpu_e2e.isolated("accuracy", path, True, {**HEADS[head], "dtype": "float16"})
                    # each engine's raw result as soon as it exists: a run cut short by its time limit keeps them
                    (args.out / f"accuracy_{fmt}_{head}.json").write_text(json.dumps(runs[head]))
                except RuntimeError as e:  # keep the other heads' results
                    entry[f"accuracy_{head}"] = {"error": str(e)[-1500:]}
                    ok = False
                    print(fmt, head, "FAILED", str(e)[-600:], flush=True)
            for head, r in runs.items():
                row = {k: r.get(k) for k in ("kv_tokens", "model_load_gib", "head", "start_s")}
                if "oracle" in runs:
                    row["vs_oracle"] = gpu_e2e.compare(r, runs["oracle"])
                entry[f"accuracy_{head}"] = row
                print(fmt, head, json.dumps(row), flush=True)
            if "fp32" in runs and "oracle" in runs:
                ok &= entry["accuracy_fp32"]["vs_oracle"]["bitwise_all"]
            out_json.write_text(json.dumps(report, indent=1))
        if "throughput" in args.parts:
            path = checkpoint(root, fmt, 36)
            extra = {**gpu_e2e.DUMMY_KW, "dtype": "float16"}
            for head in ("bf16", "int8"):
                key = f"throughput_{head}"
                try:
                    entry[key] = gpu_e2e.isolated(
                        "throughput", path, False, {**HEADS[head], **extra}, n_seqs=64, repeats=args.repeats
                    )
                except RuntimeError as e:
                    entry[key] = {"error": str(e)[-1500:]}
                    ok = False
                print(fmt, key, json.dumps(entry[key]), flush=True)
                out_json.write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
