"""The fused kernel with fp16 group scales (issue #32; needs a CUDA GPU; the CPU interpreter's check is in
tests/test_kernel_compile.py).

The kernel multiplies each converted weight tile by its group scales in fp16 before the MMA, so its numbers are
those of the fp16 weight ``w16 = fp16(q * scale[:, k // G])`` with per-row scale 1: the per-row kernel run on
``w16`` itself (fp16 maths, same config) is its bitwise reference. Against fp64 of the exact dequantized weight the
error adds that one fp16 rounding per weight (2^-11 relative) to fp32 accumulation's.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: the Triton kernel only runs on CUDA", allow_module_level=True)

from helpers import capture  # noqa: E402

from vllm_lmhead_quant.kernels import device  # noqa: E402
from vllm_lmhead_quant.kernels import weight_only as wo  # noqa: E402
from vllm_lmhead_quant.quant import FP8, INT8, dequantize_rows, quantize_rows  # noqa: E402

DEV = torch.device("cuda")
if not wo.is_supported(torch.empty(1, 8, dtype=torch.bfloat16, device=DEV)):
    pytest.skip("weight_only.is_supported() is False here (needs triton and SM >= 8.0)", allow_module_level=True)

pytestmark = pytest.mark.cuda
NATIVE = device.device_path(torch.cuda.current_device())
_FACTS = device.facts(torch.cuda.current_device())
AMPERE = device.path_for(_FACTS._replace(name="forced", capability=(8, 0), smem_per_block=163 * 1024))
PATHS = {"native": NATIVE, "ampere": AMPERE}
_CACHE: dict = {}


def _grouped(n: int, k: int, group: int, fmt=INT8):
    """A head with rows and groups of very different magnitudes, quantized with fp16 group scales; cached."""
    key = (n, k, group, fmt.name)
    if key not in _CACHE:
        g = torch.Generator(device=DEV).manual_seed(n + k + group)
        w = torch.randn(n, k, device=DEV, generator=g) * 0.02
        w *= torch.exp(torch.randn(n, k // group, 1, device=DEV, generator=g)).repeat_interleave(group, 1).view(n, k)
        _CACHE[key] = quantize_rows(w.to(torch.bfloat16), fmt, group_size=group)
    return _CACHE[key]


def _reference(x, q, scale, out_dtype, cfg, path):
    """The per-row kernel on the fp16 weight the group kernel builds in its tiles, with fp16 maths and the same tile."""
    w16 = dequantize_rows(q, scale, torch.float16)  # fp16(q * scale): the kernel's weight
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty(x2.shape[0], q.shape[0], dtype=out_dtype, device=DEV)
    wo._gemm(x2, w16, torch.ones(q.shape[0], device=DEV), y, cfg._replace(fp16_math=True), path)
    return y


def _cases():
    """(path, config, group, K): every INT8 row of the device's table with groups of 32 (and a K tail), groups of 128
    on the decode row, one row of the Ampere path (pointer loads, no TMA)."""
    rows = list(dict.fromkeys(cfg for _, cfg in NATIVE.table.rows["int8"]))
    cases = [("native", cfg, 32, 4096) for cfg in rows] + [("native", rows[0], 32, 1056)]
    cases += [("native", rows[0], 128, 4096), ("native", rows[-1], 128, 4096)]
    ampere = AMPERE.table.rows["int8"][0][1]
    return cases + [("ampere", ampere, 32, 1056), ("ampere", ampere, 128, 4096)]


@pytest.mark.parametrize("path_name, cfg, group, k", _cases(), ids=str)
def test_group_scales_are_bitwise_the_fp16_weight(path_name, cfg, group, k):
    """Both activation dtypes, fp32 logits (and bf16 on the first row), M from 1 to 300."""
    path = PATHS[path_name]
    q, scale = _grouped(4096 + 13, k, group)
    gen = torch.Generator(device=DEV).manual_seed(k)
    outs = (torch.float32, torch.bfloat16) if cfg == path.table.rows["int8"][0][1] else (torch.float32,)
    for m in (1, 17, 300):
        for act in (torch.bfloat16, torch.float16):
            x = (torch.randn(m, k, device=DEV, generator=gen) * 3).to(act)
            for out_dtype in outs:
                y = wo.weight_only_mm(x, q, scale, out_dtype, config=cfg, path=path)
                ref = _reference(x, q, scale, out_dtype, cfg, path)
                assert torch.equal(y, ref), f"M={m} {act} -> {out_dtype}"


@pytest.mark.parametrize("fmt", [INT8, FP8], ids=lambda f: f.name)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_group_scales_against_fp64(fmt, group):
    """Against fp64 of the exact dequantized weight: the fp16 rounding of each product q * scale (2^-11) plus fp32
    accumulation, elementwise; and far closer to the bf16 weight than per-row scales on groups of mixed size."""
    n, k = 151936 // 4 + 3, 2048
    q, scale = _grouped(n, k, group, fmt)
    x = torch.randn(64, k, device=DEV, dtype=torch.bfloat16)
    deq = dequantize_rows(q, scale, torch.float64)
    ref = x.double() @ deq.T
    bound = (2.0**-11 + k * 2.0**-23) * (x.double().abs() @ deq.abs().T)
    y = wo.weight_only_mm(x, q, scale, torch.float32)
    assert bool(((y.double() - ref).abs() <= bound).all())
    rms = ((y.double() - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert rms < 2.0**-12, rms


def test_group_logits_do_not_depend_on_the_batch():
    """The shipped table's configs accumulate K alike with group scales too: a token's logits at any batch size."""
    q, scale = _grouped(151936 // 4 + 3, 2048, 32)
    x = torch.randn(2048, 2048, device=DEV, dtype=torch.bfloat16)
    for out_dtype in (torch.float32, torch.bfloat16):
        ref = wo.weight_only_mm(x[:8], q, scale, out_dtype)
        for m in (1, 17, 64, 100, 200, 700, 2048):
            y = wo.weight_only_mm(x[:m], q, scale, out_dtype)
            assert torch.equal(y[: min(m, 8)], ref[: min(m, 8)]), f"M={m}"


@pytest.mark.parametrize("m", [8, 200])
def test_bound_group_kernel_in_cuda_graphs(m):
    """BoundKernel with group scales: kept plans, capture and replay, bitwise weight_only_mm; an in-place update of
    the weight and its scales (the RL loader's) is seen by the replay."""
    q, scale = (t.clone() for t in _grouped(151936 // 8, 2048, 32))
    bound = wo.BoundKernel.bind(q, scale)
    static_x = torch.randn(m, 2048, device=DEV, dtype=torch.bfloat16)
    graph, static_y = capture(lambda: bound(static_x, torch.float32))
    new_q, new_scale = quantize_rows(torch.randn(q.shape, device=DEV, dtype=torch.bfloat16) * 0.02, INT8, group_size=32)
    q.copy_(new_q)
    scale.copy_(new_scale)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, wo.weight_only_mm(static_x, new_q, new_scale, torch.float32))


def test_group_scales_must_be_fp16_with_a_power_of_two_group():
    q, scale = _grouped(256, 1024, 32)
    x = torch.randn(4, 1024, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="group scales must be float16"):
        wo.weight_only_mm(x, q, scale.float())
    with pytest.raises(ValueError, match="power of two >= 16"):
        wo.weight_only_mm(x, q, scale[:, :-1].contiguous())
