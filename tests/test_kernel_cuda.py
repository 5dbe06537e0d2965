"""Correctness of the weight-only FP8/INT8 Triton head GEMM against an fp64 reference (needs a CUDA GPU).

Error bounds, derived (u = unit roundoff):
  * The products x[m,k] * q are exact in fp32 (8/11-bit significands times e4m3's 4-bit or int8's 7-bit one),
    so all arithmetic error comes from fp32 accumulation over K terms and from the final store.
  * fp32 accumulation: the rigorous worst case is |err| <= K * 2u_32 * S with S = scale * sum_k |x||q|
    (2u_32 = 2^-23 allows a truncating accumulator, as tensor cores may use). For random data the error
    grows like sqrt(K) * u_32 * |partial sums|, i.e. ~1e-6 of max|ref| at K = 4096; we assert
    max|err| <= 1e-5 * max|ref| for fp32 output (the "~1e-5 relative" budget) and the rigorous bound on top.
  * 16-bit output adds one round-to-nearest: |err| <= u_out * |ref| with u_out = 2^-8 (bf16, ~3.9e-3) or 2^-11
    (fp16), checked elementwise as u_out * |ref| + 1e-5 * max|ref|.
Outputs are poisoned with NaN through the caching allocator before each call, so an element the kernel never
writes fails the test instead of passing on stale memory.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: the FP8/INT8 Triton kernel only runs on CUDA", allow_module_level=True)

from helpers import capture  # noqa: E402

from vllm_lmhead_quant.kernels import device, tables  # noqa: E402
from vllm_lmhead_quant.kernels import weight_only as wo  # noqa: E402
from vllm_lmhead_quant.quant import FORMATS, quantize_rows  # noqa: E402

DEV = torch.device("cuda")
if not wo.is_supported(torch.empty(1, 8, dtype=torch.bfloat16, device=DEV)):
    pytest.skip("weight_only.is_supported() is False here (needs triton and SM >= 8.0)", allow_module_level=True)

NATIVE = device.device_path(torch.cuda.current_device())
_FACTS = device.facts(torch.cuda.current_device())


def _forced(capability, smem_kib: int, hip: bool = False) -> device.KernelPath:
    """Another family's path on this GPU: its conversions, loads and generic table (tests and benchmarks)."""
    facts = _FACTS._replace(name="forced", capability=capability, smem_per_block=smem_kib * 1024, hip=hip)
    return device.path_for(facts)


AMPERE = _forced((8, 0), 163)  # FP8 decoded from its bits, pointer loads, generic_smem_163k
ROCM_LIKE = _forced((9, 4), 64, hip=True)  # also INT8 by Triton's plain cast (no PTX), generic_smem_64k

pytestmark = pytest.mark.cuda

U_OUT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}
TYPICAL_REL = 1e-5  # max|err| / max|ref| budget of fp32 accumulation (see module docstring)

_WEIGHTS: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


@pytest.fixture(params=sorted(FORMATS), autouse=True)
def fmt(request):
    """Every test runs for both weight formats; _weight() reads the current one."""
    global _FMT
    _FMT = FORMATS[request.param]
    return _FMT


def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized head of shape [n, k] in the current format, rows of very different magnitudes (so per-row scales
    matter); cached."""
    if (n, k, _FMT.name) not in _WEIGHTS:
        g = torch.Generator(device=DEV).manual_seed(n * 7919 + k)
        w = torch.randn(n, k, device=DEV, generator=g)
        w *= torch.exp(torch.randn(n, 1, device=DEV, generator=g) * 2.0) * 0.02
        _WEIGHTS[(n, k, _FMT.name)] = quantize_rows(w.to(torch.bfloat16), _FMT)
    return _WEIGHTS[(n, k, _FMT.name)]


def _poisoned_call(x, q, scale, out_dtype, **kw) -> torch.Tensor:
    """Call the kernel after filling the allocator block its output will reuse with NaN."""
    m = x.reshape(-1, x.shape[-1]).shape[0]
    poison = torch.full((m, q.shape[0]), float("nan"), dtype=out_dtype, device=DEV)
    del poison
    return wo.weight_only_mm(x, q, scale, out_dtype, **kw)


def _check(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out_dtype) -> float:
    """Assert the bounds of the module docstring; return max|err| / max|ref| for the report."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    ref = (x2 @ q.double().T) * scale.double()
    s_abs = (x2.abs() @ q.double().abs().T) * scale.double()
    y = y.reshape(ref.shape)
    assert y.dtype == out_dtype
    assert bool(torch.isfinite(y).all()), "NaN/inf in output (unwritten elements?)"
    err = (y.double() - ref).abs()
    ref_max = ref.abs().max().item()
    k = x.shape[-1]
    rigorous = (k * 2.0**-23 + 2.0**-23) * s_abs + U_OUT[out_dtype] * ref.abs()
    assert bool((err <= rigorous * (1 + 1e-9) + 1e-30).all()), "elementwise rigorous bound violated"
    typical = U_OUT[out_dtype] * ref.abs() + TYPICAL_REL * ref_max
    worst = (err / typical).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x over the typical bound (max|err|={err.max().item():.3g})"
    return err.max().item() / ref_max


@pytest.mark.parametrize("k", [1024, 2048, 4096])
@pytest.mark.parametrize("n", [1000, 151936 // 2 + 7, 4096 + 13])
@pytest.mark.parametrize("m", [1, 3, 17, 64, 255, 2048])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("out_kind", ["act", "fp32"])
def test_matches_fp64_reference(m, n, k, act_dtype, out_kind):
    q, scale = _weight(n, k)
    x = torch.randn(m, k, device=DEV, dtype=act_dtype)
    out_dtype = act_dtype if out_kind == "act" else torch.float32
    y = _poisoned_call(x, q, scale, out_dtype)
    assert y.shape == (m, n)
    rel = _check(y, x, q, scale, out_dtype)
    print(f"max|err|/max|ref| M={m} N={n} K={k} {act_dtype} -> {out_dtype}: {rel:.3g}")  # shown with -s


_EXTRA_CONFIGS = [
    wo.KernelConfig(64, 128, 64, 8, 3, swap_ab=False),
    wo.KernelConfig(16, 32, 128, 4, 3),
    wo.KernelConfig(16, 64, 128, 4, 6, tma=True),
    wo.KernelConfig(128, 128, 64, 8, 4, swap_ab=False, tma=True),
]


_TABLE_CONFIGS = [
    cfg
    for path in sorted(tables.SHIPPED.glob("*.json"))
    for rows in tables.load(path).rows.values()
    for _, cfg in rows
]
# Schedules Triton 3.6 miscompiles with INT8 weights (wrong logits; benchmarks/diag_int8.py, docs/bench/head_gemm.md):
# the 256-token tile with 3 stages, the FP8 tables' M > 128 row. No INT8 table uses them.
_INT8_MISCOMPILED = {(256, 128, 128, 3), (256, 128, 64, 3)}


def _skip_miscompiled(cfg) -> None:
    if _FMT.dtype == torch.int8 and (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages) in _INT8_MISCOMPILED:
        pytest.skip(f"{cfg} gives wrong INT8 results on Triton 3.6; the INT8 table does not use it")


@pytest.mark.parametrize("cfg", list(dict.fromkeys(_TABLE_CONFIGS + _EXTRA_CONFIGS)), ids=str)
# 1000: K % 16 != 0 (pointer kernel, masked K tail); 1040: TMA-legal K with a zero-filled tail; 4096: even.
@pytest.mark.parametrize("k", [1000, 1040, 4096])
def test_every_config_and_ragged_k(cfg, k):
    """Every table config, non-swapped, narrow and TMA paths are correct, ragged K too."""
    _skip_miscompiled(cfg)
    q, scale = _weight(3000 + 5, k)
    for m in (1, 19, 200):
        for out_dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            _check(_poisoned_call(x, q, scale, out_dtype, config=cfg), x, q, scale, out_dtype)


def test_noncontiguous_and_batched_inputs():
    q, scale = _weight(4096 + 13, 1024)
    base = torch.randn(37, 2 * 1024, device=DEV, dtype=torch.bfloat16)
    for x in (base[:, ::2], base[:, :1024], base[:, 1024:], base.t().contiguous().t()[:, :1024]):
        _check(_poisoned_call(x, q, scale, torch.float32), x, q, scale, torch.float32)
    x3 = torch.randn(2, 5, 1024, device=DEV, dtype=torch.bfloat16)
    y3 = wo.weight_only_mm(x3, q, scale, torch.bfloat16)
    assert y3.shape == (2, 5, q.shape[0])
    _check(y3, x3, q, scale, torch.bfloat16)


def test_tiny_shapes_and_zero_rows():
    for n, m in ((1, 1), (7, 5), (33, 1)):
        q, scale = _weight(n, 1024)
        x = torch.randn(m, 1024, device=DEV, dtype=torch.float16)
        _check(_poisoned_call(x, q, scale, torch.float16), x, q, scale, torch.float16)
    q, scale = _weight(64, 256)
    empty = torch.empty(0, 256, device=DEV, dtype=torch.bfloat16)
    assert wo.weight_only_mm(empty, q, scale).shape == (0, 64)


def test_rejects_bad_inputs():
    q, scale = _weight(64, 256)
    with pytest.raises(ValueError):
        wo.weight_only_mm(torch.randn(2, 128, device=DEV, dtype=torch.bfloat16), q, scale)
    with pytest.raises(TypeError):
        wo.weight_only_mm(torch.randn(2, 256, device=DEV), q, scale)
    assert not wo.is_supported(torch.randn(2, 256, device=DEV))  # fp32 activations
    assert not wo.is_supported(torch.randn(2, 256, dtype=torch.bfloat16))  # CPU


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_capture_and_replay(out_dtype):
    """Capture after one warm-up per config; replays with new inputs match eager bit for bit."""
    q, scale = _weight(151936 // 8, 2048)  # a TP-8 shard of a 151936 vocab
    for m in (1, 8, 64, 300):
        static_x = torch.randn(m, 2048, device=DEV, dtype=torch.bfloat16)
        wo.weight_only_mm(static_x, q, scale, out_dtype)  # warm-up: compiles outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = wo.weight_only_mm(static_x, q, scale, out_dtype)
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            eager = wo.weight_only_mm(static_x, q, scale, out_dtype)
            torch.cuda.synchronize()
            assert torch.equal(static_y, eager)
            _check(static_y, static_x, q, scale, out_dtype)


_FP16_BASES = [
    wo.KernelConfig(64, 128, 128, 8, 4, tma=True),
    wo.KernelConfig(256, 128, 64, 8, 3),
    wo.KernelConfig(128, 128, 64, 8, 4, swap_ab=False, tma=True),
]


@pytest.mark.parametrize("cfg", _FP16_BASES, ids=str)
@pytest.mark.parametrize("k", [1000, 4096])
def test_fp16_math_is_bitwise_the_bf16_math(cfg, k):
    """The per-token power-of-two fp16 path gives the bf16 path's bits (rows of very different magnitudes)."""
    _skip_miscompiled(cfg)
    q, scale = _weight(4096 + 13, k)
    g = torch.Generator(device=DEV).manual_seed(k)
    for m in (1, 64, 300):
        x = torch.randn(m, k, device=DEV, generator=g) * torch.exp(torch.randn(m, 1, device=DEV, generator=g) * 4)
        x = x.to(torch.bfloat16)
        for out_dtype in (torch.float32, torch.bfloat16):
            ref = wo.weight_only_mm(x, q, scale, out_dtype, config=cfg)
            y = _poisoned_call(x, q, scale, out_dtype, config=cfg._replace(fp16_math=True))
            _check(y, x, q, scale, out_dtype)
            assert torch.equal(y, ref), f"M={m} {out_dtype}: fp16 math differs from bf16 math"


def test_a_tokens_logits_do_not_depend_on_the_batch():
    """Every table config accumulates K in the same order, so a row's logits are the same at any batch size."""
    q, scale = _weight(151936 // 4 + 3, 2048)
    x = torch.randn(2048, 2048, device=DEV, dtype=torch.bfloat16)
    for out_dtype in (torch.float32, torch.bfloat16):
        ref = wo.weight_only_mm(x[:8], q, scale, out_dtype)
        for m in (1, 17, 33, 64, 100, 200, 700, 2048):
            y = wo.weight_only_mm(x[:m], q, scale, out_dtype)
            rows = min(m, 8)
            assert torch.equal(y[:rows], ref[:rows]), f"M={m} ({wo.pick_config(m, q.shape[0], 2048, q.dtype)})"


@pytest.mark.parametrize("cfg", list(dict.fromkeys(_TABLE_CONFIGS + _EXTRA_CONFIGS + _FP16_BASES)), ids=str)
def test_fast_launch_equals_the_plain_launch(cfg, monkeypatch):
    """Cached CompiledKernel launches give the plain Triton launch's bits, also for unaligned/odd arguments."""
    _skip_miscompiled(cfg)
    if not wo.FAST_LAUNCH:
        pytest.skip(f"fast launch is off on triton {wo.triton.__version__}")
    q, scale = _weight(3000 + 5, 1040)
    base = torch.randn(301, 1041, device=DEV, dtype=torch.bfloat16)
    for x in (base[:, :1040], base[:, 1:], base[:7, :1040].contiguous(), base[:1, :1040]):
        fast = [wo.weight_only_mm(x, q, scale, torch.float32, config=cfg) for _ in range(2)]
        monkeypatch.setattr(wo, "FAST_LAUNCH", False)
        plain = wo.weight_only_mm(x, q, scale, torch.float32, config=cfg)
        monkeypatch.setattr(wo, "FAST_LAUNCH", True)
        assert torch.equal(fast[0], plain) and torch.equal(fast[1], plain)
        _check(plain, x, q, scale, torch.float32)


@pytest.mark.parametrize("path", [NATIVE, AMPERE, ROCM_LIKE], ids=["native", "ampere", "rocm-like"])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_byte_converts_like_torch(path, act_dtype):
    """All 256 weight bytes through each path's conversion (hardware e4m3, bit decoding, PTX, plain cast) equal
    PyTorch's cast of the format, NaN included: q[n, 0] = byte n, x = e_0, scale = 1."""
    byte = torch.arange(256, dtype=torch.uint8, device=DEV)
    q = torch.zeros(256, 32, dtype=torch.uint8, device=DEV)
    q[:, 0] = byte
    q = q.view(_FMT.dtype)
    x = torch.zeros(1, 32, dtype=act_dtype, device=DEV)
    x[0, 0] = 1
    scale = torch.ones(256, device=DEV)
    y = wo.weight_only_mm(x, q, scale, torch.float32, config=wo.KernelConfig(16, 64, 32, 4, 2), path=path)[0]
    expected = byte.view(_FMT.dtype).float()
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(y[finite], expected[finite])


@pytest.mark.parametrize("cfg", list(dict.fromkeys(c._replace(tma=False) for c in _TABLE_CONFIGS)), ids=str)
def test_ampere_and_rocm_conversions_are_bitwise_the_native_ones(cfg):
    """Same config, same loads: decoding e4m3 from its bits (and INT8 without PTX) gives the native path's bits."""
    _skip_miscompiled(cfg)
    q, scale = _weight(3000 + 5, 2048)
    for m in (1, 64, 300):
        x = torch.randn(m, 2048, device=DEV, dtype=torch.bfloat16)
        native = wo.weight_only_mm(x, q, scale, torch.float32, config=cfg)
        for path in (AMPERE, ROCM_LIKE):
            y = _poisoned_call(x, q, scale, torch.float32, config=cfg, path=path)
            assert torch.equal(y, native), f"{path.family} M={m}"


@pytest.mark.parametrize("path", [AMPERE, ROCM_LIKE], ids=["ampere", "rocm-like"])
def test_forced_paths_with_their_own_tables(path):
    """Each family's path with its generic table: the fp64 bounds at decode and prefill sizes."""
    q, scale = _weight(151936 // 4 + 3, 2048)
    for m in (1, 16, 33, 64, 100, 300):
        for out_dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, 2048, device=DEV, dtype=torch.bfloat16)
            _check(_poisoned_call(x, q, scale, out_dtype, path=path), x, q, scale, out_dtype)


def test_a_config_that_does_not_fit_is_shrunk_once_with_one_warning(caplog, monkeypatch):
    """Never a crash: a config needing more shared memory than the GPU has runs as the next smaller one."""
    monkeypatch.setattr(wo, "_FITS", {})
    huge = wo.KernelConfig(256, 256, 128, 8, 6, tma=True)  # ~600 KiB of pipeline buffers
    q, scale = _weight(3000 + 5, 2048)
    x = torch.randn(40, 2048, device=DEV, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="vllm.lmhead_quant"):
        for _ in range(3):
            _check(_poisoned_call(x, q, scale, torch.float32, config=huge), x, q, scale, torch.float32)
    smaller = wo._FITS[(DEV.index or 0, huge)]
    assert smaller.num_stages < huge.num_stages or smaller.block_k < huge.block_k
    warnings = [r for r in caplog.records if "does not fit" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


@pytest.mark.parametrize("k", [1024, 4096])
def test_bound_kernel_is_bitwise_weight_only_mm(k):
    """BoundKernel (the head's per-call fast path) gives weight_only_mm's bits at every batch size and output dtype,
    serves repeated signatures from its kept plans, follows in-place weight updates, keeps a plan for a strided input
    the kernel reads as is and none for one that needed a copy."""
    q, scale = _weight(151936 // 2 + 7, k)
    q, scale = q.clone(), scale.clone()  # updated in place below
    bound = wo.BoundKernel(q, scale)
    for m in (1, 7, 64, 200):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        for out_dtype in (torch.float32, torch.bfloat16):
            ref = wo.weight_only_mm(x, q, scale, out_dtype)
            first, again = bound(x, out_dtype), bound(x.clone(), out_dtype)
            assert torch.equal(first, ref) and torch.equal(again, ref), f"M={m} {out_dtype}"
    assert bound.hits == (8 if wo.FAST_LAUNCH else 0), bound.plans.keys()
    if wo.FAST_LAUNCH:  # fp16 maths' pre-pass (a second launch) is kept with the plan too
        plans = list(bound.plans.values())
        assert all(p.runner is not None and (p.pre_runner is not None) == p.token_scale for p in plans)
        assert any(p.token_scale for p in plans), "no fp16-math plan: M = 200 should take one"
    x = torch.randn(64, k, device=DEV, dtype=torch.bfloat16)
    new_q, new_scale = quantize_rows(torch.randn(q.shape, device=DEV, dtype=torch.bfloat16) * 0.02, _FMT)
    q.copy_(new_q)  # what the RL weight loader does: same storage, new values
    scale.copy_(new_scale)
    assert torch.equal(bound(x, torch.float32), wo.weight_only_mm(x, new_q, new_scale, torch.float32))
    kept = len(bound.plans)
    rows = torch.randn(64, k + 8, device=DEV, dtype=torch.bfloat16)[:, :k]  # a row stride the kernel takes as is
    assert torch.equal(bound(rows, torch.float32), wo.weight_only_mm(rows, q, scale, torch.float32))
    assert len(bound.plans) == kept + 1
    odd = torch.randn(64, k + 3, device=DEV, dtype=torch.bfloat16)[:, 1 : 1 + k]  # needs a copy: no plan kept
    assert torch.equal(bound(odd, torch.float32), wo.weight_only_mm(odd, q, scale, torch.float32))
    assert len(bound.plans) == kept + 1


@pytest.mark.parametrize("m", [8, 200])
def test_bound_kernel_in_cuda_graphs(m):
    """A kept plan launches inside CUDA-graph capture (its first call compiled outside) and replays like eager;
    M = 200 takes fp16 maths, whose kept pre-pass allocates inside the capture."""
    q, scale = _weight(151936 // 8, 2048)
    bound = wo.BoundKernel(q, scale)
    static_x = torch.randn(m, 2048, device=DEV, dtype=torch.bfloat16)
    graph, static_y = capture(lambda: bound(static_x, torch.float32))
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, wo.weight_only_mm(static_x, q, scale, torch.float32))


def test_a_bound_kernel_leaves_fp32_activations_to_the_generic_path():
    """The kernel takes bf16/fp16 activations only; with fp32 ones (an fp32 model) the head falls back as before."""
    from vllm_lmhead_quant import ops

    q, scale = _weight(4096 + 13, 1024)
    kernel = wo.BoundKernel.bind(q, scale)
    x = torch.randn(3, 1024, device=DEV)
    y = ops.quantized_logits(x, q, scale, out_dtype=torch.float32, kernel=kernel)
    assert torch.equal(y, ops.chunked_logits(x, q, scale, out_dtype=torch.float32))
    assert kernel.hits == 0 and not kernel.plans
