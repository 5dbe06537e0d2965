#!/usr/bin/env bash
# Online: `vllm serve` with an INT8 LM head (--quantization int8_lm_head), then one /v1/completions request with
# logprobs, then a clean stop.
#   bash examples/serve.sh [MODEL_DIR] [METHOD]   (defaults: the built-in tiny model, int8_lm_head)
# Needs the checkout's .venv (`bash tools/bootstrap.sh`, README.md), or PY=/path/to/python of an environment with vLLM
# and this package. On a GPU drop --kv-cache-memory-bytes (CPU needs it) and --enforce-eager (it skips a ~50 s
# torch.compile on CPU; a GPU wants CUDA graphs).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
if ! "$PY" -c "import vllm, vllm_lmhead_quant" >/dev/null 2>&1; then
  echo "examples/serve.sh needs vLLM and vllm_lmhead_quant in $PY: run \`bash tools/bootstrap.sh\` (README.md) first." >&2
  exit 1
fi
MODEL=${1:-$("$PY" -c 'from vllm_lmhead_quant.tiny import cached_model; print(cached_model("llama"))')}
METHOD=${2:-int8_lm_head}
PORT=${PORT:-8765}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}  # seconds; about 30-60 s on 2 CPU cores
LOG=${LOG:-$(mktemp -t vllm-serve.XXXXXX.log)}

echo "starting: vllm serve $MODEL --quantization $METHOD (port $PORT; the server's output: $LOG)"
# The venv's own `vllm` CLI: a `vllm` on PATH may belong to another Python without torch.
# --shutdown-timeout and VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS: how long vLLM waits for its engine and worker processes
# to exit on SIGTERM before it kills them (defaults: 0 and 5 s). An upper bound: each process's exit alone takes
# 5-8 s on 2 busy CPU cores, and a process killed in it leaves its shared memory to Python's resource tracker.
VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS=${VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS:-30} \
"$(dirname "$PY")/vllm" serve "$MODEL" --quantization "$METHOD" --host 127.0.0.1 --port "$PORT" --dtype bfloat16 \
  --max-model-len 256 --kv-cache-memory-bytes 67108864 --enforce-eager --served-model-name tiny \
  --shutdown-timeout 30 >"$LOG" 2>&1 &
SERVER=$!
# SIGTERM and a wait: the server stops its engine processes itself.
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

start=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  if ! kill -0 $SERVER 2>/dev/null; then
    echo "the server exited during start-up; its last lines ($LOG):" >&2; tail -n 20 "$LOG" >&2; exit 1
  fi
  if (( $(date +%s) - start > STARTUP_TIMEOUT )); then
    echo "the server was not ready after ${STARTUP_TIMEOUT} s (STARTUP_TIMEOUT); its last lines ($LOG):" >&2
    tail -n 20 "$LOG" >&2; exit 1
  fi
  sleep 1
done
echo "ready after $(( $(date +%s) - start )) s; the head's binding, from the server's log:"
grep -o "\[vllm_lmhead_quant\].*" "$LOG" | sed 's/^/  /'

curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny", "prompt": "def main():", "max_tokens": 8, "temperature": 0, "logprobs": 3}' |
  "$PY" -c '
import json, sys
lp = json.load(sys.stdin)["choices"][0]["logprobs"]
print("%-14s %11s   %s" % ("token", "logprob", "top-3 alternatives"))
for tok, val, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
    print("%-14r %11.6f   %s" % (tok, val, ", ".join("%r %.3f" % kv for kv in top.items())))
'
echo "Greedy tokens and their logprobs from the $METHOD head (fp32 logits), served by vLLM; without MODEL_DIR the"
echo "model is the random tiny one, so the text is gibberish. vLLM's own head for comparison: vllm_lmhead_quant.check."
