#!/usr/bin/env bash
# The GPU host's open work (issues #29, #32, #33) as named steps, so that one warm machine runs them in few short
# `run` calls. From the repo root, after the vLLM 0.26 bundle is installed (shared/gpu/README.md: .gpuA, then
# `bash .gpuB/install.sh`):
#
#     bash benchmarks/gpu_steps.sh groups bi          # one call: steps run in order, each with its own time limit
#
# Steps: groups (tests/test_kernel_groups_cuda.py), kernel (tests/test_kernel_cuda.py, fast subset), bench (head GEMM,
# group scales and the large-M candidate side by side), bi (batch-invariant mode, #29), gptq (Marlin checkpoint
# accuracy, #28/#33), e2e (decode with CUDA graphs, Qwen3-8B shape). Results go to $OUT/<step>/ (the device's
# return folder); a step that fails does not stop the next. On the vLLM 0.34 bundle (tools/gpu034/README.md):
# `source /tmp/site034/env.sh && SITE=/tmp/site034 bash benchmarks/gpu_steps.sh groups e2e`.
set -u
# shellcheck disable=SC1091
source benchmarks/device_env.sh "${SITE:-/tmp/site}"
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

step() {
  local name=$1 limit=$2
  shift 2
  mkdir -p "$OUT/$name"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name/log.txt" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s"
  tail -n 12 "$OUT/$name/log.txt"
}

for s in "$@"; do
  case $s in
    groups) step groups 240 python -m pytest -q -p no:cacheprovider tests/test_kernel_groups_cuda.py ;;
    kernel) step kernel 240 python -m pytest -q -p no:cacheprovider tests/test_kernel_cuda.py \
              -k "bound or graph or fp16_math or batch or byte" ;;
    bench) step bench 300 python benchmarks/bench_head_gemm.py --out "$OUT/bench" \
             --shapes 151936x4096,151936x1024 --ms 1,16,64,256,1024,4096 \
             --variants bf16,out_dtype_fp32,int8_bf16_out,int8_fp32_out,int8_g32_bf16_out,int8_g32_fp32_out,int8_g128_fp32_out,int8_dequant_chunks_cublas_fp32_out ;;
    bi) step bi 330 python benchmarks/gpu_batch_invariant.py --out "$OUT/bi" --budget-s 240 ;;
    gptq) step gptq 240 python benchmarks/gpu_quantized_checkpoints.py --out "$OUT/gptq" --formats gptq \
            --parts accuracy --heads oracle,fp32,int8,bf16 ;;
    e2e) step e2e 420 python benchmarks/gpu_e2e.py --part graphs --out "$OUT/e2e" --only qwen3-8b-shape-dummy \
           --heads bf16,int8,fp32 --batch 64 --repeats 3 ;;
    *) echo "unknown step $s (groups kernel bench bi gptq e2e)" ;;
  esac
done
