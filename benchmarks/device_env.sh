#!/usr/bin/env bash
# On the GPU host, from the repo root, after `bash .gpuB/install.sh` (shared/gpu/README.md): `source` this file.
# Makes the checkout importable and visible to vLLM's plugin loader without pip (the host has no package index and
# no build backend to rely on): a dist-info with our entry point next to the vLLM bundle, so worker processes
# (TP, PP, DP) load the plugin exactly as they would from a pip install. The argument names the bundle's site folder:
# /tmp/site (vLLM 0.26, the default) or /tmp/site034 (vLLM 0.34, tools/gpu034/README.md, after its env.sh).
site=${1:-/tmp/site}
info=$site/vllm_lmhead_quant-0.0.0.dist-info
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: vllm-lmhead-quant\nVersion: 0.0.0\n' > "$info/METADATA"
printf '[vllm.general_plugins]\nlmhead_quant = vllm_lmhead_quant:register\n' > "$info/entry_points.txt"
export PYTHONPATH="$site:$PWD" VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 VLLM_NO_USAGE_STATS=1
