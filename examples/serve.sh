#!/usr/bin/env bash
# Online: `vllm serve` with an FP8 LM head, then one /v1/completions request with logprobs.
#   bash examples/serve.sh [MODEL_DIR] [METHOD]     (defaults: the built-in tiny model, int8_lm_head)
# On a GPU drop --kv-cache-memory-bytes (CPU needs it) and keep the rest.
set -euo pipefail
PY=${PY:-python}
MODEL=${1:-$($PY -c 'from vllm_lmhead_quant.tiny import cached_model; print(cached_model("llama"))')}
METHOD=${2:-int8_lm_head}
PORT=${PORT:-8765}
vllm serve "$MODEL" --quantization "$METHOD" --host 127.0.0.1 --port "$PORT" --dtype bfloat16 \
  --max-model-len 256 --kv-cache-memory-bytes 67108864 --served-model-name tiny &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 1; done
curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny", "prompt": "def main():", "max_tokens": 8, "temperature": 0, "logprobs": 3}'
echo
