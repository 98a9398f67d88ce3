#!/usr/bin/env bash
# livepipe's fan-out benchmark, in one command (see bench/README.md):
#   bash bench/run.sh
# Builds the Go loadgen, starts the relay pinned to one core and the loadgen on the other,
# runs (a) fan-out to 1,000 and 10,000 subscribers of one topic and (b) memory per idle
# connection, and prints a summary. Everything stays on 127.0.0.1; every process it starts is
# stopped when it ends, however it ends. Results: .bench-out/results.jsonl.
#
# Settings (environment):
#   BENCH_SERVER=auto|cli|script   the CLI (bin/livepipe.js, after npm run build), or
#                                  bench/relay-server.ts; auto: the CLI when it exists
#   BENCH_PROFILE=1                run the relay under node --cpu-prof and print its hot spots
#   BENCH_SUBSCRIBERS="1000 10000" fan-out sizes;  BENCH_IDLE=10000  idle connections
#   BENCH_FIXED_DELIVERIES=10000   deliveries/s of the fixed-rate latency phase
#   BENCH_SERVER_CPU=0 BENCH_LOADGEN_CPU=1   cores to pin to
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=$ROOT/.bench-out
NODE=$ROOT/node_modules/.bin/node
export PATH="$ROOT/node_modules/.bin:$PATH"
SERVER=${BENCH_SERVER:-auto}
PROFILE=${BENCH_PROFILE:-0}
SUBSCRIBERS=${BENCH_SUBSCRIBERS-1000 10000}
IDLE=${BENCH_IDLE-10000}
FIXED_DELIVERIES=${BENCH_FIXED_DELIVERIES:-10000}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
LOADGEN_CPU=${BENCH_LOADGEN_CPU:-1}
DEADLINE=$((SECONDS + 570)) # the whole run stays under 10 minutes

SERVER_PID=
LOADGEN_PID=
cleanup() {
  for pid in $LOADGEN_PID $SERVER_PID; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  sleep 0.5
  for pid in $LOADGEN_PID $SERVER_PID; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NAME=bench
source bench/lib.sh
bench_checks go taskset
rm -rf "$OUT/profiles" "$OUT/results.jsonl" "$OUT"/server-*.log
mkdir -p "$OUT"

log "building the loadgen"
build_loadgen

if [[ $SERVER == auto ]]; then
  if [[ -f bin/livepipe.js ]]; then SERVER=cli; else SERVER=script; fi
fi
if [[ $SERVER == cli ]]; then
  log "building livepipe (npm run build)"
  # tsc still emits when another file fails to typecheck; the health check below decides.
  npm run --silent build >"$OUT/build.log" 2>&1 || printf 'bench: npm run build reported errors (see %s); trying the emitted code anyway\n' "$OUT/build.log" >&2
  SERVER_CMD=(bin/livepipe.js)
else
  SERVER_CMD=(bench/relay-server.ts)
fi

read -r LOAD1 _ </proc/loadavg
jq_machine=$(printf '{"mode":"machine","date":"%s","cpu":"%s","cores":%s,"mem_kb":%s,"node":"%s","go":"%s","kernel":"%s","server":"%s","loadavg_1m_before":%s}' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" "$(nproc)" \
  "$(awk '/MemTotal/ {print $2}' /proc/meminfo)" "$($NODE --version)" "$(go env GOVERSION)" "$(uname -r)" "$SERVER" "$LOAD1")
echo "$jq_machine" >>"$OUT/results.jsonl"
if awk "BEGIN {exit !($LOAD1 > 0.5)}"; then
  printf 'bench: the machine is busy (1-minute load %s): latency figures will be noisy\n' "$LOAD1" >&2
fi


start_server() { # label
  PORT=$(free_port)
  local prof=()
  [[ $PROFILE == 1 ]] && prof=(--cpu-prof "--cpu-prof-dir=$OUT/profiles/$1")
  taskset -c "$SERVER_CPU" "$NODE" "${prof[@]}" "${SERVER_CMD[@]}" --port "$PORT" >"$OUT/server-$1.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || die "the relay exited at start: $(tail -5 "$OUT/server-$1.log")"
    sleep 0.1
  done
  die "the relay did not answer /healthz within 10s"
}

stop_server() { # label
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  if [[ $PROFILE == 1 ]]; then
    local p='' f
    for f in "$OUT/profiles/$1"/*.cpuprofile; do [[ -f $f ]] && p=$f; done # one per relay run
    if [[ -n $p ]]; then
      "$NODE" bench/cpuprofile-top.ts "$p" 30 >"$OUT/profiles/$1.txt"
      head -20 "$OUT/profiles/$1.txt" >&2
    fi
  fi
}

loadgen() { # label, loadgen flags...
  local label=$1
  shift
  ((SECONDS < DEADLINE)) || die "out of time before $label"
  timeout $((DEADLINE - SECONDS)) taskset -c "$LOADGEN_CPU" "$OUT/loadgen" -url "http://127.0.0.1:$PORT" -pid "$SERVER_PID" "$@" >"$OUT/$label.json" &
  LOADGEN_PID=$!
  wait "$LOADGEN_PID" || die "loadgen $label failed"
  LOADGEN_PID=
  jq_label=$(printf '"label":"%s",' "$label")
  sed "s/^{/{$jq_label/" "$OUT/$label.json" >>"$OUT/results.jsonl"
}

for n in $SUBSCRIBERS; do
  # Publish rates giving 10k, 20k, 40k … deliveries/s whatever the number of subscribers.
  steps=$("$NODE" -e "console.log(Array.from({length: 12}, (_, k) => +(10000 * 2 ** k / $n).toPrecision(3)).join(','))")
  fixed=$("$NODE" -e "console.log(+($FIXED_DELIVERIES / $n).toPrecision(3))")
  log "fan-out to $n subscribers: $fixed msg/s for 10s, then steps of $steps msg/s, then closed loop"
  start_server "fanout-$n"
  # A phase during which other processes took over 0.3 cores is run again (2 more times at
  # most, 75 s in all): this machine may be shared.
  loadgen "fanout-$n" -mode fanout -n "$n" -rate "$fixed" -duration 10s -steps "$steps" -step-duration 3s -max-duration 5s \
    -warmup 3s -other-limit 0.3 -repeats 2 -repeat-budget 75s
  stop_server "fanout-$n"
done

if ((IDLE > 0)); then
  log "memory of $IDLE idle connections"
  start_server "idle-$IDLE"
  loadgen "idle-$IDLE" -mode idle -n "$IDLE" -settle 3s
  stop_server "idle-$IDLE"
fi

log "results ($OUT/results.jsonl)"
"$NODE" bench/summarize.ts "$OUT/results.jsonl"
