"""After tools/gpu034/install.sh: does the bundle's torch 2.14 + vLLM 0.34 run on this GPU, alone?

python3 check.py DEST HOST_SITE_PACKAGES  (DEST first on PYTHONPATH). Each probe runs on the GPU and reports on
its own line: a bf16 matmul (cuBLAS 13.1.0 of the host), causal SDPA (torch's own sm_90 kernels, kept by
fatbin_keep.py), vLLM's rms_norm (its _C library) and FlashAttention-3, a Triton kernel (triton 3.8's JIT:
ptxas and the launcher build), a one-rank NCCL all-reduce (the bundled NCCL 2.30.7) and cuDNN (the host's
9.19, older than the 9.24 torch 2.14 was built with). Then the shared libraries loaded, and any of the host's
torch 2.11 among them. Exit status 1 if a probe failed.
"""

import os
import re
import sys
import tempfile
import traceback


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    dest, host_sp = sys.argv[1], sys.argv[2]
    import torch
    import torch.nn.functional as F

    assert torch.__file__.startswith(dest), torch.__file__
    failed = []

    def probe(name, fn):
        try:
            print(f"  {name}: {fn()}")
        except Exception as e:
            failed.append(name)
            print(f"  {name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc(limit=-2)

    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.bfloat16)

    def matmul():
        return f"rel.err {rel_err(x @ x, x.double() @ x.double()):.1e}"

    def sdpa():
        ref = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
        return f"rel.err {rel_err(F.scaled_dot_product_attention(q, q, q, is_causal=True), ref):.1e}"

    def vllm_c():
        import vllm._C_stable_libtorch  # noqa: F401

        w = torch.rand(256, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        torch.ops._C.rms_norm(y, x, w, 1e-6)
        return f"rms_norm rel.err {rel_err(y, F.rms_norm(x.float(), (256,), w.float(), 1e-6)):.1e}"

    def fa3():
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        t = q[0].transpose(0, 1).contiguous()  # (tokens, heads, dim)
        cu = torch.tensor([0, 128], device="cuda", dtype=torch.int32)
        o = flash_attn_varlen_func(
            t, t, t, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=128, max_seqlen_k=128, causal=True, fa_version=3
        )
        ref = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)[0].transpose(0, 1)
        return f"varlen rel.err {rel_err(o, ref):.1e}"

    def triton_kernel():
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(p, n, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(p + i, tl.load(p + i, mask=i < n) + 1.0, mask=i < n)

        t = torch.zeros(1000, device="cuda")
        add_one[(4,)](t, 1000, BLOCK=256)
        return f"triton {triton.__version__}, ok={bool((t == 1).all())}"

    def nccl():
        import torch.distributed as dist

        with tempfile.TemporaryDirectory() as d:
            dist.init_process_group("nccl", init_method=f"file://{d}/store", rank=0, world_size=1)
            s = torch.full((4,), 3.0, device="cuda")
            dist.all_reduce(s)
            torch.cuda.synchronize()
            dist.destroy_process_group()
        return f"NCCL {torch.cuda.nccl.version()}, all-reduce ok={bool((s == 3).all())}"

    def cudnn():
        v = torch.backends.cudnn.version()
        c = torch.nn.functional.conv2d(torch.randn(1, 4, 16, 16, device="cuda"), torch.randn(4, 4, 3, 3, device="cuda"))
        return f"runtime {v}, conv2d finite={bool(c.isfinite().all())}"

    import torchvision
    import vllm

    print(
        f"torch {torch.__version__} from {os.path.dirname(torch.__file__)}, vLLM {vllm.__version__}, "
        f"torchvision {torchvision.__version__}, {torch.cuda.get_device_name()}"
    )
    for name, fn in [
        ("matmul", matmul),
        ("SDPA", sdpa),
        ("vLLM _C", vllm_c),
        ("FlashAttention-3", fa3),
        ("Triton", triton_kernel),
        ("NCCL", nccl),
        ("cuDNN", cudnn),
    ]:
        probe(name, fn)
    with open("/proc/self/maps") as f:
        libs = sorted(set(re.findall(r"(/\S+\.so[.\d]*)\s*$", f.read(), re.M)))
    host_torch = [p for p in libs if p.startswith(os.path.join(host_sp, "torch", ""))]
    print("host torch 2.11 libraries loaded:", host_torch or "none")
    print("CUDA libraries loaded:", *[p for p in libs if "/nvidia/" in p or "libcuda" in p], sep="\n  ")
    if failed:
        print("FAILED:", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
