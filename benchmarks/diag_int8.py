"""Which INT8 kernel configs give wrong results, on which data (diagnostic for the M > 128 table row)."""

import sys

import torch

sys.path.insert(0, ".")
from vllm_lmhead_quant.kernels import weight_only as wo  # noqa: E402
from vllm_lmhead_quant.quant import FORMATS, quantize_rows  # noqa: E402

C = wo.KernelConfig
CFGS = [
    C(256, 128, 128, 8, 3, tma=True, fp16_math=True),
    C(256, 128, 128, 8, 3, tma=True),
    C(256, 128, 128, 8, 2, tma=True, fp16_math=True),
    C(256, 128, 64, 8, 3, tma=True, fp16_math=True),
    C(128, 256, 64, 8, 3, tma=True, fp16_math=True),
    C(128, 128, 64, 8, 4, swap_ab=False, tma=True, fp16_math=True),
    C(128, 128, 64, 8, 4, tma=True, fp16_math=True),
    C(64, 128, 128, 8, 4, tma=True, fp16_math=True),
]


def weights(n, k, varied):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    if varied:
        w *= torch.exp(torch.randn(n, 1, device="cuda", generator=g) * 2.0)
    return w.to(torch.bfloat16)


for fmt in ("int8", "fp8"):
    for n, varied in ((151936, False), (151936, True), (75975, False), (75975, True), (75904, True)):
        q, s = quantize_rows(weights(n, 1024, varied), FORMATS[fmt])
        x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ q.double().T) * s.double()
        row = []
        for cfg in CFGS:
            y = wo.weight_only_mm(x, q, s, torch.float32, config=cfg).double()
            bad = (y - ref).abs() > 1e-5 * ref.abs().max() + 1e-6 * ref.abs()
            where = ""
            if bad.any():
                ms, ns = bad.nonzero(as_tuple=True)
                where = f" n[{ns.min().item()}..{ns.max().item()}] m[{ms.min().item()}..{ms.max().item()}]"
            row.append(f"{bad.float().mean().item():.3f}{where}")
        print(fmt, n, "varied" if varied else "uniform", " | ".join(row), flush=True)
