"""Tiny quantized checkpoints in the on-disk layouts the real quantization tools write, built offline.

``quantize_checkpoint(src, dst, scheme)`` copies an unquantized checkpoint (e.g. ``tiny.cached_model(...)``) and
quantizes every body linear weight (``*_proj.weight``) with round-to-nearest; the input embedding and the LM head
stay in the checkpoint's dtype unless ``quantize_head=True``. No tool is run (no AWQ scale search, no GPTQ Hessian
updates): what is reproduced is each tool's *file format*: tensor names, dtypes, shapes, bit packing and
config keys, the things a loader reads.

========================  ==============================================================================
scheme                    layout (per quantized linear ``P``; ``[out, in]`` is the fp weight's shape)
========================  ==============================================================================
``awq-g32/-g128``         AutoAWQ GEMM: ``P.qweight`` int32 [in, out/8] (nibbles in AWQ's order 0,2,4,6,1,3,5,7),
                          ``P.qzeros`` int32 [in/g, out/8] (same order), ``P.scales`` fp16 [in/g, out]; asymmetric
``gptq-g32/-g128``        AutoGPTQ v1 (``checkpoint_format: gptq``): ``P.qweight`` int32 [in/8, out] (sequential
                          along in), ``P.qzeros`` int32 [in/g, out/8] holding zero-1, ``P.scales`` fp16 [in/g, out],
                          ``P.g_idx`` int32 [in]; symmetric (zero 8, stored 7)
``gptq-g128-desc``        the same with ``desc_act: true``: ``g_idx`` is an act-order permutation's groups
``ct-w4a16``              llm-compressor ``pack-quantized`` W4A16, group 128, symmetric: ``P.weight_packed`` int32
                          [out, in/8] (value+8, sequential along in), ``P.weight_scale`` [out, in/g] (model dtype),
                          ``P.weight_shape`` int64 [2]
``ct-nvfp4``              llm-compressor ``nvfp4-pack-quantized`` (W4A4): ``P.weight_packed`` uint8 [out, in/2],
                          ``P.weight_scale`` e4m3 [out, in/16], ``P.weight_global_scale`` / ``P.input_global_scale``
                          fp32 [1] (stored as divisors: 448*6/amax)
``modelopt-fp8``          ModelOpt FP8 (``hf_quant_config.json``): ``P.weight`` e4m3 [out, in], ``P.weight_scale`` and
                          ``P.input_scale`` fp32 scalars (static per-tensor activation scale)
``modelopt-nvfp4``        ModelOpt NVFP4: ``P.weight`` uint8 [out, in/2], ``P.weight_scale`` e4m3 [out, in/16],
                          ``P.weight_scale_2`` / ``P.input_scale`` fp32 scalars (amax/(6*448))
``block-fp8``             DeepSeek-style vLLM ``fp8`` with ``weight_block_size: [128, 128]``: ``P.weight`` e4m3,
                          ``P.weight_scale_inv`` fp32 [ceil(out/128), ceil(in/128)] (dequant: ``q * scale_inv``)
========================  ==============================================================================

Static activation scales (ModelOpt, NVFP4) come from a calibration pass: the source checkpoint runs in fp32 through
``transformers`` on a few texts of the tiny tokenizer's corpus, and each linear's input amax is recorded. Fused
projections (q/k/v, gate/up) share their per-tensor weight scale, as llm-compressor and ModelOpt export them.

``fake_quant=True`` writes the *dequantized* weights in the source layout instead (no ``quantization_config``): an
unquantized twin whose every body weight is exactly what the quantized checkpoint decodes to (rounded to the
checkpoint dtype), so an engine run on the quantized checkpoint can be compared with one on its twin (only
kernel arithmetic differs) as well as with the original.

``quantization_config(scheme)`` returns just the config (for dummy-weight GPU runs); ``cached_quantized(...)`` builds
base + quantized checkpoint once into a cache directory.

GPT-OSS MXFP4 is not a ``SCHEMES`` entry (it quantizes 3-D MoE expert tensors, not ``*_proj.weight`` linears):
``quantize_gpt_oss_mxfp4(src, dst)`` / ``cached_gpt_oss_mxfp4()`` write OpenAI's release layout from a bf16 tiny
GPT-OSS (``tiny.cached_model("gpt_oss")``). Per expert tensor ``P`` (``gate_up_proj``, ``down_proj``) of
``model.layers.{i}.mlp.experts``, with the bf16 parameter ``P`` of shape ``[E, in, out]``: ``P_blocks`` uint8
``[E, out, in/32, 16]`` (E2M1 codes, element ``2j`` in the low nibble), ``P_scales`` uint8 ``[E, out, in/32]`` (E8M0,
value ``2^(s-127)``), ``P_bias`` unchanged; ``gate_up``'s rows keep the bf16 checkpoint's gate/up interleave. Config:
:data:`GPT_OSS_MXFP4_CONFIG` (attention, router, embeddings and ``lm_head`` stay bf16). transformers'
``convert_moe_packed_tensors`` decodes ``P_blocks``/``P_scales`` back to the bf16 layout ``[E, in, out]``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "AWQ_ORDER",
    "BASE_KW",
    "GPT_OSS_MXFP4_CONFIG",
    "SCHEMES",
    "cached_gpt_oss_mxfp4",
    "cached_quantized",
    "mxfp4_quantize",
    "pack_fp4",
    "pack_int4",
    "quantization_config",
    "quantize_checkpoint",
    "quantize_gpt_oss_mxfp4",
    "unpack_fp4",
    "unpack_int4",
]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a word holds column order[i] of its 8
SEQUENTIAL = tuple(range(8))
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0..7; bit 3 is the sign
# A base checkpoint every scheme accepts with vLLM's kernels: hidden 256 with 4 heads makes k/v 128 wide (block FP8
# needs every fused part but the last a multiple of 128), intermediate 512, all multiples of 128 (group 128, CPU
# W4A16 kernel: multiples of 32). For cached_model(arch, **BASE_KW).
BASE_KW: dict[str, Any] = {"hidden_size": 256}
CONFIG_FILE = "config.json"
MODELOPT_FILE = "hf_quant_config.json"
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}  # fmt: skip


@dataclass(frozen=True)
class Scheme:
    family: str
    defaults: dict[str, Any] = field(default_factory=dict)
    head: bool = True  # quantize_head allowed (the format and vLLM's loader have a quantized-head path)
    calibrate: bool = False  # needs activation amax (static input scales)
    note: str = ""


SCHEMES: dict[str, Scheme] = {
    "awq-g32": Scheme("awq", {"group_size": 32}, head=False, note="AutoAWQ never quantizes lm_head"),
    "awq-g128": Scheme("awq", {"group_size": 128}, head=False, note="AutoAWQ never quantizes lm_head"),
    "gptq-g32": Scheme("gptq", {"group_size": 32, "desc_act": False, "sym": True, "seed": 0}),
    "gptq-g128": Scheme("gptq", {"group_size": 128, "desc_act": False, "sym": True, "seed": 0}),
    "gptq-g128-desc": Scheme("gptq", {"group_size": 128, "desc_act": True, "sym": True, "seed": 0}),
    "ct-w4a16": Scheme("ct-w4a16", {"group_size": 128}),
    "ct-nvfp4": Scheme("ct-nvfp4", calibrate=True),
    "modelopt-fp8": Scheme("modelopt-fp8", calibrate=True),
    "modelopt-nvfp4": Scheme("modelopt-nvfp4", calibrate=True),
    "block-fp8": Scheme("block-fp8", {"block_size": (128, 128)}, head=False,
                        note="vLLM's Fp8Config quantizes LinearBase only: a block-FP8 lm_head would not load"),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------------


def pack_int4(values: torch.Tensor, dim: int, order: Iterable[int] = SEQUENTIAL) -> torch.Tensor:
    """Pack unsigned 4-bit ``values`` (ints in [0, 15]) along ``dim`` into int32, 8 per word.

    Nibble ``i`` (bits ``4i..4i+3``) of word ``k`` holds element ``8k + order[i]``: ``SEQUENTIAL`` is GPTQ's and
    compressed-tensors' packing, ``AWQ_ORDER`` AutoAWQ's GEMM packing.
    """
    order = list(order)
    v = values.to(torch.int32).movedim(dim, -1)
    if v.shape[-1] % 8:
        raise ValueError(f"cannot pack {v.shape[-1]} values along dim {dim} into int32 words of 8")
    if int(v.min()) < 0 or int(v.max()) > 15:
        raise ValueError("pack_int4 takes unsigned 4-bit values in [0, 15]")
    v = v.reshape(*v.shape[:-1], -1, 8)[..., order]
    out = torch.zeros(v.shape[:-1], dtype=torch.int32)
    for i in range(8):
        out |= v[..., i] << (4 * i)
    return out.movedim(-1, dim).contiguous()


def unpack_int4(packed: torch.Tensor, dim: int, order: Iterable[int] = SEQUENTIAL) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 words -> int32 values in [0, 15], 8 per word along ``dim``."""
    order = list(order)
    p = packed.to(torch.int32).movedim(dim, -1)
    out = torch.empty(*p.shape, 8, dtype=torch.int32)
    for i in range(8):
        out[..., order[i]] = (p >> (4 * i)) & 0xF
    return out.reshape(*p.shape[:-1], -1).movedim(-1, dim).contiguous()


def fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15, bit 3 = sign) of ``x`` (already scaled to [-6, 6]), rounded to nearest with ties to
    the even code, as compressed-tensors' ``cast_to_fp4`` and ModelOpt round; a negative value that rounds to 0 keeps
    its sign bit (code 8), as compressed-tensors' ``pack_fp4_to_uint8`` writes it."""
    a = x.abs()
    mag = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int() + (a > 2.5).int()
           + (a >= 3.5).int() + (a > 5.0).int())  # fmt: skip
    return (mag + 8 * (x < 0).int()).to(torch.uint8)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes."""
    table = torch.tensor(E2M1, dtype=torch.float32)
    codes = codes.to(torch.int64)
    return table[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two E2M1 codes per byte along the last dim: element ``2j`` in the low nibble, ``2j+1`` in the high one (the
    layout of compressed-tensors, ModelOpt and vLLM's NVFP4 kernels)."""
    if codes.shape[-1] % 2:
        raise ValueError("FP4 packing needs an even number of columns")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> E2M1 codes uint8 [..., n]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


# --------------------------------------------------------------------------------------------------------
# Quantizers: fp weight [out, in] -> (tensors by suffix, dequantized weight fp32)
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """What a quantizer may need besides the weight."""

    name: str  # module name (the weight's name without ".weight")
    weight_amax: float  # amax over the fused group (q/k/v, gate/up) or the weight itself
    input_amax: float | None  # calibrated input activation amax (schemes with static input scales)
    generator: torch.Generator


def _need(cond: bool, name: str, what: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {what}")


def _awq(w: torch.Tensor, ctx: _Ctx, *, group_size: int):
    """AutoAWQ's ``pseudo_quantize_tensor`` (asymmetric, zero point) + ``WQLinear_GEMM.from_linear`` packing."""
    out, inp = w.shape
    g = inp if group_size == -1 else group_size
    _need(inp % g == 0, ctx.name, f"in_features {inp} is not a multiple of group_size {g}")
    _need(out % 8 == 0, ctx.name, f"out_features {out} is not a multiple of 8 (AWQ packs 8 outputs per int32)")
    wg = w.float().reshape(out, inp // g, g)
    mx, mn = wg.amax(-1), wg.amin(-1)
    scale = ((mx - mn).clamp(min=1e-5) / 15).half()  # stored fp16; quantize with the stored value
    s = scale.float()
    zero = (-torch.round(mn / s)).clamp(0, 15)
    q = (torch.round(wg / s[..., None]) + zero[..., None]).clamp(0, 15)
    deq = ((q - zero[..., None]) * s[..., None]).reshape(out, inp)
    tensors = {
        "qweight": pack_int4(q.reshape(out, inp).t(), 1, AWQ_ORDER),  # [in, out/8]
        "qzeros": pack_int4(zero.t(), 1, AWQ_ORDER),  # [in/g, out/8]
        "scales": scale.t().contiguous(),  # [in/g, out] fp16
    }
    return tensors, deq


def gptq_g_idx(inp: int, group_size: int, desc_act: bool, generator: torch.Generator) -> torch.Tensor:
    """GPTQ's ``g_idx`` [in]: column ``i``'s group. With act-order (``desc_act``) GPTQ quantizes the columns in a
    permuted order ``perm`` (by decreasing Hessian diagonal; here a seeded random permutation) in consecutive groups
    and stores ``g_idx[perm[j]] = j // group_size`` with the weights left in the original column order."""
    ranks = torch.arange(inp, dtype=torch.int32)
    if not desc_act:
        return ranks // group_size
    perm = torch.randperm(inp, generator=generator)
    g_idx = torch.empty(inp, dtype=torch.int32)
    g_idx[perm] = ranks // group_size
    return g_idx


def _gptq(w: torch.Tensor, ctx: _Ctx, *, group_size: int, desc_act: bool, sym: bool, seed: int):
    """AutoGPTQ's quantizer grid (round to nearest; no Hessian updates) and its v1 packing (``pack`` of
    ``QuantLinear``): qweight sequential along in, qzeros = zero - 1 sequential along out."""
    del seed  # consumed by the generator
    out, inp = w.shape
    g = inp if group_size == -1 else group_size
    _need(inp % g == 0, ctx.name, f"in_features {inp} is not a multiple of group_size {g}")
    _need(inp % 8 == 0 and out % 8 == 0, ctx.name, f"GPTQ packs 8 values per int32: shape {out}x{inp}")
    g_idx = gptq_g_idx(inp, g, desc_act, ctx.generator)
    order = torch.argsort(g_idx, stable=True)  # columns grouped: group k is order[k*g:(k+1)*g]
    wg = w.float()[:, order].reshape(out, inp // g, g)
    if sym:
        scale = (2 * wg.abs().amax(-1) / 15).clamp(min=1e-10).half()
        s = scale.float()
        zero = torch.full_like(s, 8.0)
    else:
        mx, mn = wg.amax(-1).clamp(min=0), wg.amin(-1).clamp(max=0)
        scale = ((mx - mn) / 15).clamp(min=1e-10).half()
        s = scale.float()
        zero = torch.round(-mn / s).clamp(0, 15)
    q_sorted = (torch.round(wg / s[..., None]) + zero[..., None]).clamp(0, 15).reshape(out, inp)
    deq_sorted = (q_sorted.reshape(out, inp // g, g) - zero[..., None]) * s[..., None]
    q = torch.empty_like(q_sorted)
    q[:, order] = q_sorted
    deq = torch.empty(out, inp)
    deq[:, order] = deq_sorted.reshape(out, inp)
    tensors = {
        "qweight": pack_int4(q.t(), 0),  # [in/8, out]
        "qzeros": pack_int4(((zero.to(torch.int32) - 1) & 0xF).t(), 1),  # [in/g, out/8], v1: zero - 1
        "scales": scale.t().contiguous(),  # [in/g, out] fp16
        "g_idx": g_idx,
    }
    return tensors, deq


def _ct_w4a16(w: torch.Tensor, ctx: _Ctx, *, group_size: int):
    """llm-compressor W4A16 (``calculate_qparams`` symmetric: scale = amax / 7.5 in the weight's dtype) and
    compressed-tensors' ``PackedQuantizationCompressor`` (``pack_to_int32``: value + 8, sequential along in)."""
    out, inp = w.shape
    _need(inp % group_size == 0, ctx.name, f"in_features {inp} is not a multiple of group_size {group_size}")
    _need(inp % 8 == 0, ctx.name, f"in_features {inp} is not a multiple of 8")
    wg = w.reshape(out, inp // group_size, group_size)  # the checkpoint dtype, as the tool computes
    scale = (wg.abs().amax(-1) / 7.5).to(w.dtype)
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale)
    q = torch.round(wg / scale[..., None]).clamp(-8, 7)
    deq = (q.to(scale.dtype) * scale[..., None]).float().reshape(out, inp)
    tensors = {
        "weight_packed": pack_int4((q.to(torch.int32) + 8).reshape(out, inp), 1),  # [out, in/8]
        "weight_scale": scale.contiguous(),  # [out, in/g]
        "weight_shape": torch.tensor([out, inp], dtype=torch.int64),
    }
    return tensors, deq


def _nvfp4_blocks(w: torch.Tensor, ctx: _Ctx, global_div: torch.Tensor):
    """NVFP4 with a per-tensor divisor ``global_div`` (compressed-tensors' global scale, 448*6/amax): per 16 inputs
    an e4m3 scale ``global_div * amax16 / 6``; value = code * scale / global_div."""
    out, inp = w.shape
    _need(inp % 16 == 0, ctx.name, f"in_features {inp} is not a multiple of 16 (NVFP4 groups)")
    wg = w.float().reshape(out, inp // 16, 16)
    scale = (global_div * (wg.abs().amax(-1) / FP4_MAX)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    scale = torch.where(scale.float() == 0, torch.finfo(torch.float8_e4m3fn).eps, scale.float()).to(torch.float8_e4m3fn)
    eff = scale.float() / global_div  # [out, in/16]
    codes = fp4_codes((wg / eff[..., None]).clamp(-FP4_MAX, FP4_MAX)).reshape(out, inp)
    deq = (fp4_values(codes).reshape(out, inp // 16, 16) * eff[..., None]).reshape(out, inp)
    return pack_fp4(codes), scale, deq


def _ct_nvfp4(w: torch.Tensor, ctx: _Ctx):
    global_div = torch.tensor([FP8_MAX * FP4_MAX / max(ctx.weight_amax, 1e-12)], dtype=torch.float32)
    packed, scale, deq = _nvfp4_blocks(w, ctx, global_div)
    assert ctx.input_amax is not None
    tensors = {
        "weight_packed": packed,  # uint8 [out, in/2]
        "weight_scale": scale,  # e4m3 [out, in/16]
        "weight_global_scale": global_div,  # fp32 [1], a divisor
        "input_global_scale": torch.tensor([FP8_MAX * FP4_MAX / max(ctx.input_amax, 1e-12)], dtype=torch.float32),
    }
    return tensors, deq


def _modelopt_nvfp4(w: torch.Tensor, ctx: _Ctx):
    scale_2 = torch.tensor(max(ctx.weight_amax, 1e-12) / (FP8_MAX * FP4_MAX), dtype=torch.float32)
    packed, scale, deq = _nvfp4_blocks(w, ctx, 1.0 / scale_2)
    assert ctx.input_amax is not None
    tensors = {
        "weight": packed,  # uint8 [out, in/2]
        "weight_scale": scale,  # e4m3 [out, in/16]
        "weight_scale_2": scale_2,  # fp32 scalar, a multiplier
        "input_scale": torch.tensor(max(ctx.input_amax, 1e-12) / (FP8_MAX * FP4_MAX), dtype=torch.float32),
    }
    return tensors, deq


def _modelopt_fp8(w: torch.Tensor, ctx: _Ctx):
    scale = torch.tensor(max(ctx.weight_amax, 1e-12) / FP8_MAX, dtype=torch.float32)
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert ctx.input_amax is not None
    tensors = {
        "weight": q,
        "weight_scale": scale,  # fp32 scalar
        "input_scale": torch.tensor(max(ctx.input_amax, 1e-12) / FP8_MAX, dtype=torch.float32),
    }
    return tensors, q.float() * scale


def _block_fp8(w: torch.Tensor, ctx: _Ctx, *, block_size):
    """DeepSeek-V3's ``weight_block_size`` FP8: scale_inv = block amax / 448 (a multiplier despite its name)."""
    bn, bk = block_size
    out, inp = w.shape
    nb, kb = -(-out // bn), -(-inp // bk)
    padded = torch.zeros(nb * bn, kb * bk)
    padded[:out, :inp] = w.float()
    blocks = padded.reshape(nb, bn, kb, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # [nb, kb] fp32
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    deq = (q.float() * scale[:, None, :, None]).reshape(nb * bn, kb * bk)[:out, :inp]
    q = q.reshape(nb * bn, kb * bk)[:out, :inp].contiguous()
    return {"weight": q, "weight_scale_inv": scale}, deq


_QUANTIZERS: dict[str, Callable] = {
    "awq": _awq,
    "gptq": _gptq,
    "ct-w4a16": _ct_w4a16,
    "ct-nvfp4": _ct_nvfp4,
    "modelopt-fp8": _modelopt_fp8,
    "modelopt-nvfp4": _modelopt_nvfp4,
    "block-fp8": _block_fp8,
}


# --------------------------------------------------------------------------------------------------------
# Configs, as each tool writes them
# --------------------------------------------------------------------------------------------------------


def _ct_weights_args(**kw) -> dict[str, Any]:
    args = {
        "actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 4,
        "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True, "type": "int",
    }  # fmt: skip
    args.update(kw)
    return args


def _ct_config(fmt: str, weights: dict, input_activations: dict | None, head: bool) -> dict[str, Any]:
    return {
        "config_groups": {
            "group_0": {
                "format": fmt,
                "input_activations": input_activations,
                "output_activations": None,
                "targets": ["Linear", "re:.*lm_head"] if head else ["Linear"],
                "weights": weights,
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": [] if head else ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.12.2",
    }


def quantization_config(scheme: str, *, quantize_head: bool = False, **kw: Any) -> tuple[str, dict[str, Any]]:
    """``(file, config)``: the quantization config ``scheme`` writes, and where. ``file`` is ``"config.json"`` (the
    dict goes under its ``quantization_config`` key) or ``"hf_quant_config.json"`` (ModelOpt's legacy separate
    file, the whole file). Useful on its own for dummy-weight engines (``load_format="dummy"``)."""
    spec, opts = _resolve(scheme, quantize_head, kw)
    fam = spec.family
    if fam == "awq":
        return CONFIG_FILE, {"quant_method": "awq", "zero_point": True, "group_size": opts["group_size"], "bits": 4,
                             "version": "gemm", "modules_to_not_convert": None}  # fmt: skip
    if fam == "gptq":  # AutoGPTQ 0.7's BaseQuantizeConfig.to_dict()
        return CONFIG_FILE, {
            "bits": 4, "group_size": opts["group_size"], "damp_percent": 0.01, "desc_act": opts["desc_act"],
            "static_groups": False, "sym": opts["sym"], "true_sequential": True, "lm_head": quantize_head,
            "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq",
            "checkpoint_format": "gptq",
        }  # fmt: skip
    if fam == "ct-w4a16":
        weights = _ct_weights_args(group_size=opts["group_size"])
        return CONFIG_FILE, _ct_config("pack-quantized", weights, None, quantize_head)
    if fam == "ct-nvfp4":
        weights = _ct_weights_args(group_size=16, strategy="tensor_group", type="float")
        acts = {**weights, "dynamic": "local"}
        return CONFIG_FILE, _ct_config("nvfp4-pack-quantized", weights, acts, quantize_head)
    if fam in ("modelopt-fp8", "modelopt-nvfp4"):
        quant: dict[str, Any] = {"quant_algo": "FP8" if fam == "modelopt-fp8" else "NVFP4", "kv_cache_quant_algo": None}
        if fam == "modelopt-nvfp4":
            quant["group_size"] = 16
        quant["exclude_modules"] = [] if quantize_head else ["lm_head"]
        return MODELOPT_FILE, {"producer": {"name": "modelopt", "version": "0.29.0"}, "quantization": quant}
    assert fam == "block-fp8"
    return CONFIG_FILE, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                         "weight_block_size": list(opts["block_size"])}  # fmt: skip


def _resolve(scheme: str, quantize_head: bool, kw: dict[str, Any]) -> tuple[Scheme, dict[str, Any]]:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    spec = SCHEMES[scheme]
    unknown = set(kw) - set(spec.defaults)
    if unknown:
        allowed = ", ".join(spec.defaults) or "none"
        raise TypeError(f"scheme {scheme!r} takes no option(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
    if quantize_head and not spec.head:
        raise ValueError(f"scheme {scheme!r} cannot quantize the head: {spec.note}")
    return spec, {**spec.defaults, **kw}


# --------------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------------


def _fused_name(module: str) -> str:
    prefix, _, leaf = module.rpartition(".")
    return f"{prefix}.{_FUSED.get(leaf, leaf)}"


def calibrate_input_amax(src: str | Path, modules: Iterable[str], n_texts: int = 8) -> dict[str, float]:
    """Input-activation amax of each of ``modules`` over ``n_texts`` texts of the tiny corpus, the source checkpoint
    running in fp32 through ``transformers`` (what a calibration pass of ModelOpt / llm-compressor records)."""
    import transformers

    from vllm_lmhead_quant.tiny import _corpus

    wanted = set(modules)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    amax: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if name in wanted:

            def hook(_mod, args, _out, name=name):
                amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))

            hooks.append(module.register_forward_hook(hook))
    missing = wanted - {n for n, _ in model.named_modules()}
    if missing:
        raise ValueError(f"calibration: modules not found in the transformers model: {sorted(missing)[:4]}")
    with torch.no_grad():
        for text in _corpus(n_texts):
            ids = tok(text, return_tensors="pt").input_ids[:, :256]
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return amax


def quantize_checkpoint(
    src: str | Path, dst: str | Path, scheme: str, *, quantize_head: bool = False, fake_quant: bool = False, **kw: Any
) -> Path:
    """Copy ``src`` to ``dst`` with every body linear weight (``*_proj.weight``) quantized in ``scheme``'s layout.

    ``quantize_head``: the untied ``lm_head.weight`` too (GPTQ ``lm_head: true``; compressed-tensors without the
    ``lm_head`` ignore; ModelOpt without the exclusion), for checkpoints whose head is already quantized.
    ``fake_quant``: write the dequantized weights in the source layout and no quantization config (see the module
    docstring). ``kw``: the scheme's options (``SCHEMES[scheme].defaults`` lists them and their defaults).
    """
    from safetensors.torch import load_file, save_file

    spec, opts = _resolve(scheme, quantize_head, kw)
    src, dst = Path(src), Path(dst)
    from vllm_lmhead_quant.tiny import COMPLETE_MARKER

    tensors = load_file(str(src / "model.safetensors"))
    targets = [n for n, w in tensors.items() if n.endswith("_proj.weight") and w.dim() == 2]
    if quantize_head:
        if "lm_head.weight" not in tensors:
            raise ValueError(f"{src}: quantize_head needs an untied checkpoint with its own lm_head.weight")
        targets.append("lm_head.weight")
    if not targets:
        raise ValueError(f"{src}: no '*_proj.weight' linear weights to quantize")
    modules = [n.removesuffix(".weight") for n in targets]

    # Per-tensor weight scales are shared by fused projections (vLLM runs q/k/v and gate/up as one GEMM).
    fused_amax: dict[str, float] = {}
    for n, m in zip(targets, modules):
        key = _fused_name(m)
        fused_amax[key] = max(fused_amax.get(key, 0.0), float(tensors[n].float().abs().max()))
    input_amax = calibrate_input_amax(src, modules) if spec.calibrate else {}
    generator = torch.Generator().manual_seed(int(opts.get("seed", 0)))
    quantizer = _QUANTIZERS[spec.family]

    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if name not in targets:
            out[name] = w
            continue
        module = name.removesuffix(".weight")
        ctx = _Ctx(module, fused_amax[_fused_name(module)], input_amax.get(module), generator)
        q, deq = quantizer(w, ctx, **opts)
        if fake_quant:
            out[name] = deq.to(w.dtype)
        else:
            out.update({f"{module}.{suffix}": t.contiguous() for suffix, t in q.items()})

    dst.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("model.safetensors", COMPLETE_MARKER, MODELOPT_FILE)
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=skip)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / CONFIG_FILE).read_text())
    config.pop("quantization_config", None)
    if not fake_quant:
        file, qcfg = quantization_config(scheme, quantize_head=quantize_head, **kw)
        if file == CONFIG_FILE:
            config["quantization_config"] = qcfg
        else:
            (dst / file).write_text(json.dumps(qcfg, indent=2) + "\n")
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return dst


def cached_quantized(
    scheme: str,
    *,
    arch: str = "llama",
    tied: bool | None = False,
    root: str | Path | None = None,
    base: dict[str, Any] | None = None,
    quantize_head: bool = False,
    fake_quant: bool = False,
    **kw: Any,
) -> Path:
    """``quantize_checkpoint`` of ``tiny.cached_model(arch, tied=tied, **base)`` (``base`` defaults to
    :data:`BASE_KW`), built once into ``root`` (the tiny cache by default) and reused."""
    from vllm_lmhead_quant import tiny

    base = dict(BASE_KW if base is None else base)
    src = tiny.cached_model(arch, tied=tied, root=root, **base)
    _resolve(scheme, quantize_head, kw)  # fail fast, before the cache key
    key = {"src": src.name, "scheme": scheme, "head": quantize_head, "fake": fake_quant,
           "kw": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(kw.items())}, "format": 1}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    label = f"{scheme}{'-head' if quantize_head else ''}{'-fake' if fake_quant else ''}"
    target = src.parent / f"{src.name}.{label}-{digest}"
    return tiny.build_once(
        target,
        lambda out: quantize_checkpoint(src, out, scheme, quantize_head=quantize_head, fake_quant=fake_quant, **kw),
        key,
    )


# --------------------------------------------------------------------------------------------------------
# GPT-OSS MXFP4 (OpenAI's release): MoE experts in MXFP4, everything else bf16
# --------------------------------------------------------------------------------------------------------

MXFP4_BLOCK = 32
GPT_OSS_MXFP4_CONFIG: dict[str, Any] = {  # as openai/gpt-oss-20b and -120b carry it in config.json
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
_GPT_OSS_EXPERTS = ("gate_up_proj", "down_proj")


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXFP4 along the last dim of ``w``: ``(blocks uint8 [..., n/32, 16], scales uint8 [..., n/32], dequantized fp32
    [..., n])``. Per 32 values one E8M0 scale ``2^(s-127)`` chosen as the OCP MX spec and vLLM's ``downcast_to_mxfp``
    choose it, ``2^(floor(log2(amax)) - 2)`` with amax's mantissa first rounded to one bit (a block whose amax would
    exceed 7 scale steps takes the next exponent); values round to the nearest E2M1 code, ties to even, beyond 6
    saturating. Two codes per byte, element ``2j`` in the low nibble (:func:`pack_fp4`)."""
    *lead, n = w.shape
    if n % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs the quantized dim to be a multiple of {MXFP4_BLOCK}, got {n}")
    x = w.float().reshape(*lead, n // MXFP4_BLOCK, MXFP4_BLOCK)
    amax_exp = ((x.abs().amax(-1).view(torch.int32) + 0x200000) >> 23) & 0xFF  # biased exponent of the rounded amax
    scales = (amax_exp - 2).clamp(0, 254)
    step = torch.where(scales > 0, scales << 23, 0x400000).view(torch.float32)  # 2^(s-127) exactly (s=0: subnormal)
    codes = fp4_codes((x / step[..., None]).clamp(-FP4_MAX, FP4_MAX))
    deq = (fp4_values(codes) * step[..., None]).reshape(*lead, n)
    blocks = pack_fp4(codes.reshape(*lead, n)).reshape(*lead, n // MXFP4_BLOCK, MXFP4_BLOCK // 2)
    return blocks, scales.to(torch.uint8), deq


def quantize_gpt_oss_mxfp4(src: str | Path, dst: str | Path, *, fake_quant: bool = False) -> Path:
    """Copy the bf16 GPT-OSS checkpoint ``src`` to ``dst`` with its MoE experts in OpenAI's MXFP4 layout (module
    docstring) and :data:`GPT_OSS_MXFP4_CONFIG`. ``fake_quant``: the dequantized experts in the bf16 layout instead,
    no quantization config (the twin)."""
    from safetensors.torch import load_file, save_file

    from vllm_lmhead_quant.tiny import COMPLETE_MARKER

    src, dst = Path(src), Path(dst)
    config = json.loads((src / CONFIG_FILE).read_text())
    if config.get("model_type") != "gpt_oss":
        raise ValueError(f"{src}: not a GPT-OSS checkpoint (model_type {config.get('model_type')!r})")
    out: dict[str, torch.Tensor] = {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if not name.endswith(tuple(f".mlp.experts.{p}" for p in _GPT_OSS_EXPERTS)):
            out[name] = w
            continue
        blocks, scales, deq = mxfp4_quantize(w.transpose(1, 2))  # [E, in, out] -> [E, out, in]: blocks along in
        if fake_quant:
            out[name] = deq.transpose(1, 2).to(w.dtype).contiguous()
        else:
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks.contiguous(), scales.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", COMPLETE_MARKER))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config.pop("quantization_config", None)
    if not fake_quant:
        config["quantization_config"] = GPT_OSS_MXFP4_CONFIG
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return dst


def cached_gpt_oss_mxfp4(
    *, root: str | Path | None = None, base: dict[str, Any] | None = None, fake_quant: bool = False
) -> Path:
    """:func:`quantize_gpt_oss_mxfp4` of ``tiny.cached_model("gpt_oss", **base)`` (the tiny default: hidden 128,
    intermediate 256, 4 experts), built once into ``root`` (the tiny cache by default) and reused."""
    from vllm_lmhead_quant import tiny

    src = tiny.cached_model("gpt_oss", root=root, **(base or {}))
    key = {"src": src.name, "scheme": "gpt-oss-mxfp4", "fake": fake_quant, "format": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    target = src.parent / f"{src.name}.gpt-oss-mxfp4{'-fake' if fake_quant else ''}-{digest}"
    return tiny.build_once(target, lambda out: quantize_gpt_oss_mxfp4(src, out, fake_quant=fake_quant), key)
