#!/usr/bin/env bash
# Builds a slim, offline torch 2.14.0 + vLLM 0.34.0 + triton 3.8.0 bundle for the GPU host (Python 3.12, torch
# 2.11.0+cu130 and its CUDA 13 wheels, transformers 5.17, no package index), as git-ignored folders
# .gpu034_1 ... .gpu034_N in the repo root, each one piece of one tar.xz, small enough for one device call's carry.
# How to move it to the host and what was left out: tools/gpu034/README.md. Usage, from anywhere:
#   bash tools/gpu034/build.sh            download (cached in $GPU034_WORK), slim, compress, split
#   STAGE_ONLY=1 bash tools/gpu034/build.sh   stop after the slimmed tree ($GPU034_WORK/stage/site034)
# Knobs: GPU034_WORK (default /tmp/gpu034-work), PIECE_MIB (default 58: the call also carries the ~3 MB work
# tree, under 64 MiB in all), PRUNE=0 keeps GPU code of every architecture (about 520 MB more, ~9 more pieces).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${GPU034_WORK:-/tmp/gpu034-work}
PIECE_MIB=${PIECE_MIB:-58}
PRUNE=${PRUNE:-1}
WHL=$WORK/wheels
STAGE=$WORK/stage
S=$STAGE/site034
T0=$(date +%s)
log() { echo "[gpu034 $(($(date +%s) - T0))s] $*" >&2; }
mkdir -p "$WHL"

# 1. Wheels for CPython 3.12 on x86-64 from PyPI (the local venvs here are 3.11; the host has 3.12).
PLAT=(--platform any --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
for n in 5 12 17 18 24 25 26 27 28 31 34; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
pipdl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    --index-url https://pypi.org/simple -d "$WHL" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
# torch 2.14.0's own pins; nvidia-nccl-cu13: torch 2.14 calls NCCL >= 2.29 functions the host's 2.28.9 lacks;
# torchvision 0.29.0 (vLLM's pin): the host's 0.26 fails to register its ops on torch 2.14 and `import vllm`
# then dies with "operator torchvision::nms does not exist".
BIG=(torch==2.14.0 triton==3.8.0 vllm==0.34.0 nvidia-nccl-cu13==2.30.7 torchvision==0.29.0)
# What vLLM 0.34 imports for an offline LLM run that the host image lacks (README.md: how this list was found).
DEPS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  msgspec==0.23.0 pyzmq==27.3.0 cbor2==6.3.0 blake3==1.0.11 cachetools==8.0.2 pybase64==1.5.1
  setproctitle==1.3.8 ijson==3.6.0 python-json-logger==4.2.0 partial-json-parser==0.2.1.1.post7
  openai==2.54.0 distro==1.9.0 jiter==0.19.0 sniffio==1.3.1
  compressed-tensors==0.17.0 loguru==0.7.3 depyf==0.20.0 astor==0.8.1 dill==0.4.1 watchfiles==1.3.0
  lark==1.2.2 xgrammar==0.2.8 apache-tvm-ffi==0.1.11 llguidance==1.7.6 outlines-core==0.2.14
  lm-format-enforcer==0.11.3 interegular==0.3.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1 mistral-common==1.13.1 pycountry==26.2.16 pydantic-extra-types==2.11.1
  fastapi==0.136.3 starlette==1.10.0 uvicorn==0.55.0 prometheus-fastapi-instrumentator==8.1.0
  oss-harmony==0.0.11 model-hosting-container-standards==0.1.16 orjson==3.11.6 gguf==0.19.0 diskcache==5.6.3
)
shopt -s nullglob
wheel_of() {  # the downloaded wheel file of NAME==VERSION, if any (file names use _ for - and any case)
  local name=${1%%==*} ver=${1#*==} f
  for f in "$WHL"/*.whl; do
    b=$(basename "$f" | tr 'A-Z' 'a-z')
    [[ $b == "$(echo "$name" | tr 'A-Z-' 'a-z_')-$ver-"* ]] && { echo "$f"; return; }
  done
}
for spec in "${BIG[@]}" "${DEPS[@]}"; do
  [ -n "$(wheel_of "$spec")" ] || pipdl "$spec"
done
log "wheels in $WHL: $(du -sh "$WHL" | cut -f1)"

# 2. One tree, as site-packages: every wheel unpacked into $S (pip: .data folders, RECORD, dist-info).
rm -rf "$STAGE" && mkdir -p "$S"
wheels=()
for spec in "${BIG[@]}" "${DEPS[@]}"; do
  w=$(wheel_of "$spec")
  [ -n "$w" ] || { echo "no wheel for $spec" >&2; exit 1; }
  wheels+=("$w")
done
python3 -m pip install -q --no-deps --no-compile --no-index --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLAT[@]}" --target "$S" "${wheels[@]}" 2>&1 | grep -v "^WARNING: Location" || true
log "unpacked: $(du -sh "$S" | cut -f1)"

# 3. Slim. Each line: what goes, and why a single-GPU Hopper run of a dense model needs none of it.
cd "$S"
rm -rf bin                                         # console scripts pip wrote (shebang of this machine)
find . -name '*.pyi' -delete                       # type stubs
find . -name __pycache__ -prune -exec rm -rf {} +
rm -rf torch/include torch/share torch/bin/protoc torch/bin/protoc-3.* # C++ headers, cmake files, protoc (no
                                                   # extension builds there; Inductor's GPU path emits Triton)
rm -f torch/lib/*.a
rm -rf triton/backends/nvidia/lib/cupti triton/backends/nvidia/lib/cupti-blackwell \
  triton/backends/nvidia/bin/ptxas-blackwell triton/backends/nvidia/bin/nvdisasm triton/backends/nvidia/bin/cuobjdump \
  triton/_C/libproton.so triton/FileCheck triton/instrumentation/*.so triton/plugins/*.so
                                                   # profiler (proton/CUPTI), sm_100+ ptxas, disassemblers (only
                                                   # for dumping SASS; the host's CUDA 13 has both), test plugins
rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so     # FA2 (pre-Hopper): Hopper uses FA3, which stays
rm -f vllm/_moe_C_stable_libtorch.abi3.so vllm/_flashkda_C.abi3.so vllm/_deepselect_C.abi3.so
                                                   # MoE kernels, Kimi delta attention, DeepSeek sparse select
rm -rf vllm/third_party/deep_gemm vllm/third_party/fmha_sm100 vllm/vllm-rs # DeepGEMM, sm100 FMHA, Rust frontend
rm -rf mistral_common/data pycountry/locales     # Mistral's own tokenizer files, country-name translations
rm -rf nvidia/nccl/include nvidia/nccl/lib/*.a nvidia/nccl/lib/*.bc   # NCCL headers, static and device libs
find . -path '*/tests' -prune -type d ! -path './torch/*' -exec rm -rf {} +   # test suites of dependencies
# GPU code for other architectures (fatbin_keep.py), then symbol tables and debug info of the big libraries.
mapfile -t LIBS < <(find torch/lib triton/_C vllm nvidia torchvision torchvision.libs -name '*.so*' -type f -size +1M)
if [ "$PRUNE" = 1 ]; then python3 "$HERE/fatbin_keep.py" --arch 90 "${LIBS[@]}"; fi
for f in "${LIBS[@]}"; do [[ $f == *.libs/* ]] || strip --strip-unneeded "$f"; done  # not auditwheel-patched ones
log "slimmed: $(du -sh "$S" | cut -f1)"
[ "${STAGE_ONLY:-0}" = 1 ] && exit 0

# 4. One tar.xz (multi-block, so the host can inflate it with threads), split into pieces of PIECE_MIB.
OUT=$WORK/out
rm -rf "$OUT" && mkdir -p "$OUT"
(cd "$STAGE" && tar --owner=0 --group=0 --numeric-owner -cf - site034) |
  nice -n 10 xz -9 -T2 --block-size=64MiB | split -b "${PIECE_MIB}m" -d -a 2 - "$OUT/gpu034.tar.xz.part"
parts=("$OUT"/gpu034.tar.xz.part*)
N=${#parts[@]}
(cd "$OUT" && sha256sum gpu034.tar.xz.part* > SHA256SUMS)
rm -rf "$ROOT"/.gpu034_*
for i in $(seq 1 "$N"); do
  d=$ROOT/.gpu034_$i
  mkdir -p "$d" && mv "${parts[$((i - 1))]}" "$d/" && cp "$OUT/SHA256SUMS" "$d/"
done
git -C "$ROOT" check-ignore -q .gpu034_1 || { echo "add '/.gpu034_*/' to .gitignore" >&2; exit 1; }
log "done: $N pieces"
du -sh "$ROOT"/.gpu034_* | sed 's|'"$ROOT"'/||'
