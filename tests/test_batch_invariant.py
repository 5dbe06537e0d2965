"""The heads under vLLM's batch-invariant mode (``VLLM_BATCH_INVARIANT=1``, issue #29), without a GPU.

* ``bf16_last_layer_fp32`` reaches the same aten op as vLLM's own ``head_dtype=float32`` path on CUDA, ROCm and CPU,
  in that mode and out of it, on vLLM 0.32 (here) and 0.34 (its venv; 0.33 was checked the same way before 0.34
  replaced it in CI), through tests/batch_invariant_checks.py, which reads and runs vLLM's own ``_apply_head``; on
  the CPU bitwise through vLLM's real ``LogitsProcessor``. Which kernel that op reaches is vLLM's mode's business,
  per version and device; the start-up line says which, and warns where the logits are not batch invariant.
* The quantized heads pin one kernel config for every M in that mode (``pick_config``), for every shipped table.
* The trainer twin's ``batch_invariant`` option: the engine method's bits on the CPU, refusals where it cannot hold.

The GPU halves (the kernels the ops reach, bits across M = 1..4096, engines) are benchmarks/gpu_batch_invariant.py
and the ``cuda``-marked test at the end.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_lmhead_quant import ops, trainer
from vllm_lmhead_quant.kernels import device, tables
from vllm_lmhead_quant.kernels import weight_only as wo
from vllm_lmhead_quant.methods.fp32_head import FP32HeadMethod, describe_batch_invariant

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "batch_invariant_checks.py"
VENVS = {"0.32": Path(sys.executable), "0.34": ROOT / ".venv-vllm034/bin/python"}


# --- vLLM's head_dtype path, per vLLM version (one subprocess per venv) -----------------------------------------------
@pytest.fixture(scope="module", params=list(VENVS))
def version(request) -> tuple[str, dict]:
    py = VENVS[request.param]
    if not py.exists():
        pytest.skip(f"no venv with vLLM {request.param} ({py.parent.parent.name}; tools/bootstrap.sh builds 0.34's)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    done = subprocess.run([str(py), str(CHECKS)], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["env"]["vllm"].startswith(request.param), report["env"]
    return request.param, report["checks"]


def facts(checks: dict, name: str) -> dict:
    assert checks[name]["ok"], checks[name]["error"]
    return checks[name]["facts"]


def test_fp32_head_runs_vllms_head_dtype_op_on_every_platform(version):
    """The branch of vLLM's ``_apply_head`` that each platform takes, run as vLLM's own statements, dispatches the
    same aten ops as ``FP32HeadMethod.apply``, built with and without the mode. On CUDA and ROCm that is one
    ``aten::mm.dtype`` (bf16 x bf16 -> fp32, no copy of the weight), whatever the mode: the old head switched to the
    upcast there."""
    _, checks = version
    f = facts(checks, "head_dtype_path_per_platform")
    assert f["batch_invariant_env"] is True and f["ours_bi_flag"] == [True, False]
    assert f["apply_head_mentions_batch_invariance"] is False  # vLLM's fp32 head takes no mode-dependent branch
    for platform in ("cuda", "rocm"):
        row = f[platform]
        assert "torch.mm(" in row["vllm_branch"] and "out_dtype=self.head_dtype" in row["vllm_branch"]
        assert row["vllm_ops"] == row["ours_ops"] == row["ours_without_the_mode_ops"]
        assert row["ours_ops"] == ["aten.mm.dtype(bfloat16,bfloat16)->float32"]
        assert row["weight_copied_to_fp32"] is False
        assert row["dtypes"] == ["torch.float32"] * 2
    cpu = f["cpu"]
    assert cpu["vllm_branch"].startswith("return F.linear(hidden_states.to(self.head_dtype)")
    assert cpu["vllm_ops"] == cpu["ours_ops"] == cpu["ours_without_the_mode_ops"]
    assert cpu["bitwise_equal"] is True


def test_cpu_bitwise_through_vllms_logits_processor(version):
    """vLLM's fp32 head (``hf_overrides`` head_dtype float32) and ours, built from real configs, through vLLM's
    ``LogitsProcessor`` in batch-invariant mode: same bits and same ops at M = 1, 2, 7, 64."""
    _, checks = version
    f = facts(checks, "cpu_logits_processor_bitwise")
    assert f["oracle"] == {"method": "UnquantizedEmbeddingMethod", "head_dtype": "torch.float32"}
    assert f["ours"]["method"] == "FP32HeadMethod"
    for m in (1, 2, 7, 64):
        assert f[f"M={m}"]["bitwise_equal"] and f[f"M={m}"]["same_ops"], f[f"M={m}"]
        assert f[f"M={m}"]["dtype"] == "torch.float32"
    print("CPU row 0 bitwise the same at M = 1 and 64:", f["row0_same_bits_at_M1_and_M64"])


def test_which_kernel_the_op_reaches_per_version(version):
    """``_compat.batch_invariant_mm_dtype`` against what the version's ``enable_batch_invariant_mode`` registers:
    0.34 replaces ``aten::mm.dtype`` (on SM 8.x and ROCm, where it replaces ``aten::mm``); 0.32 and 0.33 do not."""
    name, checks = version
    f = facts(checks, "mm_dtype_override")
    assert f["registers_mm_dtype"] is f["has_mm_dtype_batch_invariant"]
    assert "aten::mm" in f["registered"] and f["mode_active_here"] is False
    if name == "0.34":
        assert "aten::mm.dtype" in f["registered"] and "aten::mm.dtype_out" in f["registered"]
        assert f["compat"] == {"sm90": False, "sm100": False, "sm80": True, "sm86": True, "sm89": True, "rocm": True}
    else:
        assert "aten::mm.dtype" not in f["registered"]
        assert not any(f["compat"].values())


def test_start_up_line_on_cpu(version):
    """On the CPU the mode cannot hold: one WARNING per device says so, for two heads."""
    _, checks = version
    lines = facts(checks, "start_up_line")["lines"]
    assert len(lines) == 1 and lines[0][0] == "WARNING", lines
    assert "NOT batch invariant" in lines[0][1] and "bitwise equal to it" in lines[0][1]


# --- the fp32 head's start-up line, per device ------------------------------------------------------------------------
def _override(hip, capability):  # vLLM 0.34's rule (_compat.batch_invariant_mm_dtype on 0.34)
    return hip or capability[0] == 8


def _no_override(hip, capability):  # vLLM 0.26 to 0.33
    return False


@pytest.mark.parametrize(
    ("device_type", "hip", "capability", "override", "level", "phrase"),
    [
        ("cuda", False, (9, 0), _no_override, logging.INFO, "cuBLASLt without split-K"),
        ("cuda", False, (10, 0), _no_override, logging.INFO, "cuBLASLt without split-K"),
        ("cuda", False, (9, 0), _override, logging.INFO, "cuBLASLt without split-K"),
        ("cuda", False, (8, 0), _override, logging.INFO, "batch-invariant Triton kernel"),
        ("cuda", True, (9, 4), _override, logging.INFO, "on ROCm vLLM's mode runs it in its batch-invariant Triton"),
        ("cuda", False, (8, 0), _no_override, logging.WARNING, "NOT guaranteed batch invariant on SM 8.0"),
        ("cuda", True, (9, 4), _no_override, logging.WARNING, "NOT guaranteed batch invariant on ROCm"),
        ("cuda", False, (7, 5), _no_override, logging.WARNING, "NOT guaranteed batch invariant on SM 7.5"),
        ("cpu", False, None, _no_override, logging.WARNING, "NOT batch invariant"),
    ],
)
def test_fp32_start_up_line_per_device(device_type, hip, capability, override, level, phrase):
    got_level, line = describe_batch_invariant(device_type, torch.bfloat16, hip, capability, override)
    assert (got_level, phrase in line) == (level, True), line
    assert "bitwise equal to it" in line  # vLLM's head_dtype op everywhere


def test_fp32_start_up_line_for_an_fp32_model():
    level, line = describe_batch_invariant("cuda", torch.float32, False, (9, 0), _no_override)
    assert level == logging.WARNING and "float32" in line and "changes nothing" in line


def test_no_batch_invariance_line_outside_the_mode(monkeypatch, caplog):
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from vllm_lmhead_quant import _log

    monkeypatch.setattr(_log, "_said", set())
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    head = ParallelLMHead(100, 16, params_dtype=torch.bfloat16, disable_tp=True)
    with caplog.at_level("INFO", logger="vllm.lmhead_quant"):
        FP32HeadMethod("lm_head").process_weights_after_loading(head)
    assert caplog.records and not any("batch invariant" in r.getMessage() for r in caplog.records)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["0", "1"], ids=["plain", "batch-invariant"])
@pytest.mark.parametrize("shape", [(1, 64), (33, 64), (2, 3, 64)], ids=["M1", "M33", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fp32_head_on_cuda_tensors_is_one_fp32_output_gemm(monkeypatch, mode, shape, bias):
    """On (fake) CUDA tensors, in either mode: one bf16 x bf16 -> fp32 GEMM, no fp32 copy of the weight."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    monkeypatch.setenv("VLLM_BATCH_INVARIANT", mode)
    method = FP32HeadMethod("lm_head")
    assert method.batch_invariant is (mode == "1")
    with FakeTensorMode(), torch.device("cuda"):
        head = ParallelLMHead(1000, 64, params_dtype=torch.bfloat16, disable_tp=True)
        x = torch.empty(shape, dtype=torch.bfloat16)
        b = torch.empty(1024, dtype=torch.bfloat16) if bias else None
        with _Ops() as rec:
            out = method.apply(head, x, b)
    assert out.dtype == torch.float32 and out.shape == (*shape[:-1], 1024)
    assert rec.ops.count("aten.mm.dtype") == 1
    casts = [op for op in rec.ops if op.startswith("aten._to_copy")]
    assert casts == (["aten._to_copy.default"] if bias else [])  # only the bias is cast, never the weight


# --- quantized heads: one kernel config for every M ---------------------------------------------------------------
SM90 = device.DeviceFacts("NVIDIA H100 80GB HBM3", (9, 0), 232448, 132)
SHAPES = [(151936, 4096), (151936, 1024), (151936 // 8, 4096), (32000, 2048), (1000, 256)]
QS = [torch.int8, torch.float8_e4m3fn]
ALL_M = range(1, 4097)


def _tables():
    return [tables.load(p) for p in sorted(tables.SHIPPED.glob("*.json"))]


@pytest.mark.parametrize("table", _tables(), ids=lambda t: t.source)
@pytest.mark.parametrize("facts", [SM90, device.DeviceFacts("NVIDIA A100-SXM4-80GB", (8, 0), 166912, 108),
                                   device.DeviceFacts("AMD Instinct MI300X", (9, 4), 65536, 304, hip=True)],
                         ids=["sm90", "sm80", "rocm"])  # fmt: skip
def test_batch_invariant_mode_pins_one_config_for_every_m(table, facts):
    path = device.path_for(facts, table, batch_invariant=True)
    for q in QS:
        row = tables.batch_invariant_row(table.rows[wo._FORMAT_OF[q]])
        assert row == wo.pick_config(tables.BATCH_INVARIANT_M, 10**9, 4096, q, device.path_for(facts, table))
        for n, k in SHAPES:
            got = {wo.pick_config(m, n, k, q, path) for m in ALL_M}
            block_n = row.block_n
            while block_n > 32 and -(-n // block_n) < path.min_tiles:
                block_n //= 2
            assert got == {row._replace(block_n=block_n, fp16_math=row.fp16_math and k >= wo._FP16_MIN_K)}, (n, k)


def test_the_tuned_tables_change_the_reduction_between_m_buckets():
    """Why pinning: outside the mode the H100 table's buckets differ in block_k, swap AB and fp16 maths."""
    path = device.path_for(SM90)
    for q in QS:
        configs = {wo.pick_config(m, 151936, 4096, q, path) for m in ALL_M}
        shapes = {(c.block_k, c.swap_ab, c.fp16_math) for c in configs}
        assert len(shapes) > 1, shapes


def test_the_start_up_line_names_the_pinned_config():
    path = device.path_for(SM90, batch_invariant=True)
    for fmt, other in (("int8", "fp8"), ("fp8", "int8")):
        line = path.describe(fmt)
        row = path.pinned_rows()[fmt]
        assert "one config for every M" in line and f"{fmt} {device.pinned(row)}" in line
        assert f"{other} block" not in line
    assert "batch-invariant" not in device.path_for(SM90).describe("int8")
    assert device.pinned(tables.KernelConfig(64, 128, 128, 8, 4, True, True, True)) == (
        "block 64x128x128, 8 warps, 4 stages, swap AB, TMA, fp16 maths"
    )


def test_kernel_paths_follow_vllms_flag(monkeypatch):
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert device.batch_invariant_mode() is True
    level, line = ops.head_path(torch.device("cpu"), torch.int8)
    assert level == logging.WARNING and line.endswith(ops.BI_GENERIC)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    assert device.batch_invariant_mode() is False
    assert not ops.head_path(torch.device("cpu"), torch.int8)[1].endswith(ops.BI_GENERIC)


# --- the trainer twin ---------------------------------------------------------------------------------------------
def _engine_head(vocab=1000, hidden=128, seed=0):
    """A real vLLM head (padded to 1024 rows) with bf16_last_layer_fp32's method, and the trainer's [V, H] weight."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.05).to(torch.bfloat16)
    head = ParallelLMHead(vocab, hidden, params_dtype=torch.bfloat16, disable_tp=True)
    head.weight.weight_loader(head.weight, weight)
    method = FP32HeadMethod("lm_head")
    method.process_weights_after_loading(head)
    hidden_states = (torch.randn(64, hidden, generator=g) * 2).to(torch.bfloat16)
    return head, method, weight, hidden_states


@pytest.mark.filterwarnings("ignore:batch_invariant=True on CPU")
@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("batch_invariant", [False, True], ids=["plain", "batch_invariant"])
def test_twin_gives_the_engine_methods_bits_for_the_same_batch(m, batch_invariant):
    """The twin on the trainer's unpadded weight = the engine's method on vLLM's padded head, same rows (CPU: the
    same batch; across batch sizes needs the GPU mode)."""
    head, method, weight, hidden = _engine_head()
    engine = method.apply(head, hidden[:m])[:, : weight.shape[0]]
    twin = trainer.fp32_lm_head_logits(hidden[:m], weight, batch_invariant=batch_invariant)
    assert torch.equal(engine, twin)
    with_grad = trainer.fp32_lm_head_logits(
        hidden[:m].clone().requires_grad_(), weight.clone().requires_grad_(), batch_invariant=batch_invariant
    )
    assert torch.equal(with_grad.detach(), engine)


def test_twin_on_cpu_says_once_that_only_the_same_batch_matches():
    _, _, weight, hidden = _engine_head()
    with pytest.warns(RuntimeWarning, match="only for the same batch"):
        trainer.fp32_lm_head_logits(hidden, weight, batch_invariant=True)


def test_twin_refuses_other_operand_dtypes():
    _, _, weight, hidden = _engine_head()
    for x, w in ((hidden.float(), weight.float()), (hidden, weight.float()), (hidden.half(), weight)):
        with pytest.raises(TypeError, match="bf16/fp16 weight"):
            trainer.fp32_lm_head_logits(x, w, batch_invariant=True)


def test_twin_on_a_gpu_refuses_without_vllms_mode_in_the_process():
    """(Fake) CUDA tensors in this process, where vLLM's mode was never switched on: an error that says how."""
    with FakeTensorMode(), torch.device("cuda"):
        x = torch.empty(4, 64, dtype=torch.bfloat16)
        w = torch.empty(100, 64, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="init_batch_invariance"):
            trainer.fp32_lm_head_logits(x, w, batch_invariant=True)
        assert trainer.fp32_lm_head_logits(x, w).dtype == torch.float32  # the plain twin does not ask


@pytest.mark.filterwarnings("ignore:batch_invariant=True on CPU")
def test_enable_fp32_lm_head_with_the_option():
    _, _, weight, hidden = _engine_head()
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(weight)
    trainer.enable_fp32_lm_head(head, batch_invariant=True)
    assert head.fp32_batch_invariant is True
    with pytest.warns(RuntimeWarning):
        out = head(hidden)
    assert torch.equal(out, trainer.fp32_lm_head_logits(hidden, weight))
    trainer.enable_fp32_lm_head(head)  # again, without the option
    assert head.fp32_batch_invariant is False
    trainer.disable_fp32_lm_head(head)
    assert type(head) is torch.nn.Linear and "fp32_batch_invariant" not in vars(head)


GPU_TWIN = textwrap.dedent("""
    import json, os, sys
    os.environ["VLLM_BATCH_INVARIANT"] = sys.argv[1]
    import torch
    from vllm_lmhead_quant import _compat, trainer
    from vllm_lmhead_quant.methods.fp32_head import FP32HeadMethod
    if sys.argv[1] == "1":
        _compat.batch_invariant_module().init_batch_invariance()  # before the first GEMM, as vLLM's workers do
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(32000, 2048, device="cuda", generator=g) * 0.05).bfloat16()
    x = (torch.randn(1024, 2048, device="cuda", generator=g) * 2).bfloat16()
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    method = FP32HeadMethod("lm_head")
    out = {"mode_active": _compat.batch_invariant_mode_active()}
    try:
        twin = trainer.fp32_lm_head_logits(x, w, batch_invariant=True)
        out["rows_equal"] = {m: torch.equal(method.apply(layer, x[:m]), twin[:m]) for m in (1, 3, 64, 257, 1024)}
        grad = trainer.fp32_lm_head_logits(x.clone().requires_grad_(), w.clone().requires_grad_(), batch_invariant=True)
        grad.sum().backward()
        out["with_autograd_equal"] = torch.equal(grad.detach(), twin)
    except RuntimeError as e:
        out["error"] = str(e)[:200]
    print(json.dumps(out))
""")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the twin's kernels under vLLM's mode")
def test_gpu_twin_has_the_engine_methods_bits_at_every_batch_size():
    """In a process running vLLM's batch-invariant mode: the twin at M = 1024 gives, row for row, the bits the
    engine's method gives at M = 1, 3, 64, 257, 1024; without the mode it refuses."""

    def run(mode: str) -> dict:
        done = subprocess.run([sys.executable, "-c", GPU_TWIN, mode], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    on = run("1")
    assert on["mode_active"] is True and "error" not in on, on
    assert all(on["rows_equal"].values()) and on["with_autograd_equal"], on
    off = run("0")
    assert off["mode_active"] is False and "init_batch_invariance" in off["error"], off
