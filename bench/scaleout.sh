#!/usr/bin/env bash
# livepipe scale-out benchmark, in one command (see bench/README.md, "Scale-out"):
#   bash bench/scaleout.sh
# Aggregate deliveries/s of one topic fanned out to subscribers spread over 1, 2 and 3
# `livepipe --scale-out` nodes over NATS (core), W1's ladder; each node's CPU, the broker's
# CPU, and what each node receives from the broker; the CPU a node spends per broker message
# (one subscriber per node, published straight into NATS); the node-to-node traffic
# (heartbeats, session records) and what the records cost in memory and CPU. Every process it
# starts is stopped when it ends, however it ends. Results: .bench-out/scaleout/results.jsonl.
# About 5 minutes.
#
# Settings (environment):
#   SCALEOUT_NODES="1 2 3"                node counts
#   SCALEOUT_SUBSCRIBERS="1000 10000"     subscribers in all, spread evenly over the nodes (empty: skip)
#   SCALEOUT_FANIN_RATES=2000,4000,8000,16000,32000   msg/s of the fan-in run (empty: skip it)
#   SCALEOUT_RECORDS=10000                idle sessions for the record phase (0: skip it)
#   SCALEOUT_BROKER_URL=nats://host:port  use this NATS server instead of a private one (its
#                                         CPU is then measured only if it runs here, and the
#                                         broker's message counts are not: no monitoring port)
#   BENCH_SERVER_CPU=0 BENCH_LOADGEN_CPU=1   the nodes and the broker share the first core,
#                                            the loadgen has the second
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=$ROOT/.bench-out/scaleout
NODE=$ROOT/node_modules/.bin/node # node 24: the system's node may be older
export PATH="$ROOT/node_modules/.bin:$PATH"
NODE_COUNTS=${SCALEOUT_NODES:-1 2 3}
SUBSCRIBERS=${SCALEOUT_SUBSCRIBERS-1000 10000}
RECORDS=${SCALEOUT_RECORDS:-10000}
FANIN_RATES=${SCALEOUT_FANIN_RATES-2000,4000,8000,16000,32000}
BROKER_URL=${SCALEOUT_BROKER_URL:-}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
LOADGEN_CPU=${BENCH_LOADGEN_CPU:-1}
DEADLINE=$((SECONDS + 570)) # the whole run stays under 10 minutes

NODE_PIDS=()
NODE_URLS=()
NATS_PID=
LOADGEN_PID=
cleanup() {
  local p
  for p in $LOADGEN_PID "${NODE_PIDS[@]}" $NATS_PID; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in $LOADGEN_PID "${NODE_PIDS[@]}" $NATS_PID; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NAME=scaleout
source bench/lib.sh
bench_checks go taskset curl nats-server ss
rm -rf "$OUT"
mkdir -p "$OUT"

log "building the loadgen and livepipe"
build_loadgen
# The nodes run a copy of the build: other engineers' `npm run build` (the test suite runs it)
# rewrites dist/ meanwhile, and a node started while dist/ is half written does not start.
APP=$OUT/app
for try in 1 2 3; do
  npm run --silent build >"$OUT/build.log" 2>&1 || printf 'scaleout: npm run build reported errors (see %s); trying the emitted code anyway\n' "$OUT/build.log" >&2
  rm -rf "$APP"
  mkdir -p "$APP"
  cp -r bin dist package.json "$APP"/ 2>/dev/null || true
  # Packages resolve from the checkout's node_modules, up the tree from $APP.
  "$NODE" "$APP/bin/livepipe.js" --version >/dev/null 2>&1 && [[ -f $APP/dist/scaleout/peers.js ]] && break
  ((try < 3)) || die "the build in $APP does not run (see $OUT/build.log)"
  sleep 5
done

wait_http() { # url, what
  for _ in $(seq 100); do
    curl -sf -m 1 -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  die "$2 did not answer $1 within 10 s (logs in $OUT)"
}
metric() { # base url, metric name: its value (first series)
  curl -sf -m 5 "$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 {print $2; exit}'
}
kb() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# ---- the broker: a private core NATS server (no JetStream) with its monitoring port, so that
# no other process's traffic is in its CPU and counts, and no other livepipe node on a shared
# server hears these nodes' broadcasts (livepipe-control.all is one subject for everyone).
MON=
if [[ -z $BROKER_URL ]]; then
  NATS_PORT=$(free_port)
  MON=$(free_port)
  while [[ $MON == "$NATS_PORT" ]]; do MON=$(free_port); done
  taskset -c "$SERVER_CPU" nats-server -a 127.0.0.1 -p "$NATS_PORT" -m "$MON" >"$OUT/nats.log" 2>&1 &
  NATS_PID=$!
  BROKER_URL=nats://127.0.0.1:$NATS_PORT
  wait_http "http://127.0.0.1:$MON/varz" nats-server
else
  port=${BROKER_URL##*:}
  port=${port%%/*}
  NATS_OWNER=$(ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
  [[ -n $NATS_OWNER ]] || printf 'scaleout: %s does not run here: no broker CPU\n' "$BROKER_URL" >&2
fi
BROKER_PID=${NATS_PID:-${NATS_OWNER:-}}
varz() { # the broker's message and byte counters, as JSON (empty without monitoring)
  [[ -n $MON ]] || { echo null; return; }
  curl -sf -m 5 "http://127.0.0.1:$MON/varz" | "$NODE" -e 'const v=JSON.parse(require("fs").readFileSync(0,"utf8"));console.log(JSON.stringify({in_msgs:v.in_msgs,out_msgs:v.out_msgs,in_bytes:v.in_bytes,out_bytes:v.out_bytes}))'
}

read -r LOAD1 LOAD5 _ </proc/loadavg
printf '{"mode":"machine","date":"%s","cpu":"%s","cores":%s,"mem_kb":%s,"kernel":"%s","node":"%s","go":"%s","nats":"%s","broker":"%s","livepipe":"%s","loadavg_before":[%s,%s],"server_cpu":"%s","loadgen_cpu":"%s"}\n' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" "$(nproc)" \
  "$(awk '/MemTotal/ {print $2}' /proc/meminfo)" "$(uname -r)" "$($NODE --version)" "$(go env GOVERSION)" \
  "$(nats-server --version | awk '{print $2}')" "$BROKER_URL${NATS_PID:+ (private)}" \
  "$("$NODE" -p "require('./package.json').version")@$(git rev-parse --short HEAD)$([[ -z $(git status --porcelain -- src) ]] || echo '+changes')" \
  "$LOAD1" "$LOAD5" "$SERVER_CPU" "$LOADGEN_CPU" >"$OUT/results.jsonl"
if awk "BEGIN {exit !($LOAD1 > 0.5)}"; then
  printf 'scaleout: the machine is busy (1-minute load %s): CPU and latency figures will be noisy\n' "$LOAD1" >&2
fi

# ---- nodes ----

NODE_FLAGS=() # node's own flags for the nodes
start_nodes() { # count, config file
  local i port
  NODE_PIDS=() NODE_URLS=()
  for ((i = 1; i <= $1; i++)); do
    port=$(free_port)
    taskset -c "$SERVER_CPU" "$NODE" "${NODE_FLAGS[@]}" "$APP/bin/livepipe.js" --scale-out --broker "$BROKER_URL" --port "$port" --log-level warn --config "$2" \
      >"$OUT/node-$i.log" 2>&1 &
    NODE_PIDS+=($!)
    NODE_URLS+=("http://127.0.0.1:$port")
  done
  for ((i = 0; i < $1; i++)); do wait_http "${NODE_URLS[$i]}/healthz" "node $((i + 1))"; done
  sleep 1.5 # every node has heard the others' heartbeat (once a second)
}

stop_nodes() {
  local p
  for p in "${NODE_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for p in "${NODE_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${NODE_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait "${NODE_PIDS[@]}" 2>/dev/null || true
  NODE_PIDS=() NODE_URLS=()
}

# Each node's own figures, as a JSON array: broker messages in, deliveries out, sessions, memory.
node_figures() {
  local i sep=''
  printf '['
  for ((i = 0; i < ${#NODE_PIDS[@]}; i++)); do
    printf '%s{"messages_in":%s,"messages_out":%s,"sessions":%s,"heap_used":%s,"rss_kb":%s,"peak_rss_kb":%s}' "$sep" \
      "$(metric "${NODE_URLS[$i]}" livepipe_messages_in_total)" "$(metric "${NODE_URLS[$i]}" livepipe_messages_out_total)" \
      "$(metric "${NODE_URLS[$i]}" livepipe_sessions)" "$(metric "${NODE_URLS[$i]}" livepipe_nodejs_heap_size_used_bytes)" \
      "$(kb "${NODE_PIDS[$i]}" VmRSS)" "$(kb "${NODE_PIDS[$i]}" VmHWM)"
    sep=,
  done
  printf ']'
}

loadgen() { # label, loadgen flags... (the nodes' URLs and pids are added)
  local label=$1
  shift
  ((SECONDS < DEADLINE)) || { printf 'scaleout: out of time before %s\n' "$label" >&2; return 1; }
  local urls pids
  urls=$(IFS=,; echo "${NODE_URLS[*]}")
  pids=$(IFS=,; echo "${NODE_PIDS[*]}")
  # 64 POSTs in flight, not 16: a publish over NATS waits for the broker's flush, and a node
  # sharing a saturated core answers in tens of ms; 16 would cap publishing near 370 msg/s.
  timeout $((DEADLINE - SECONDS)) taskset -c "$LOADGEN_CPU" "$OUT/loadgen" -url "$urls" -pid "$pids" -broker-pid "${BROKER_PID:-0}" -publishers 64 "$@" \
    >"$OUT/$label.json" 2>"$OUT/$label.err" &
  LOADGEN_PID=$!
  if ! wait "$LOADGEN_PID"; then
    LOADGEN_PID=
    printf 'scaleout: loadgen %s failed: %s\n' "$label" "$(tail -2 "$OUT/$label.err")" >&2
    return 1
  fi
  LOADGEN_PID=
  tail -1 "$OUT/$label.err" >&2
}

printf 'publish: true\n' >"$OUT/fanout.yaml"

# ---- (a) fan-out: W1's plan (bench/rivals.sh) with the subscribers spread over the nodes and
# the publishes round-robin over them. The node counts of one size run back to back, so that
# they are compared under the same conditions.
for n in $SUBSCRIBERS; do
  for k in $NODE_COUNTS; do
    label=fanout-$n-$k
    log "W1 fan-out to $n subscribers over $k node(s)"
    start_nodes "$k" "$OUT/fanout.yaml"
    v0=$(varz)
    if loadgen "$label" -mode fanout -n "$n" -rate "$((100000 / n))" -duration 5s -warmup 2s \
      -steps "$(steps_for "$n")" -step-duration 2s -other-limit 0.3 -repeats 1 -repeat-budget 20s; then
      printf '{"label":"%s","nodes":%s,"broker_before":%s,"broker_after":%s,"node_figures":%s,%s\n' "$label" "$k" "$v0" "$(varz)" "$(node_figures)" \
        "$(sed 's/^{//' "$OUT/$label.json")" >>"$OUT/results.jsonl"
    fi
    stop_nodes
  done
done

# ---- (b) fan-in: what a node spends per message it receives from the broker. One subscriber
# per node, so that each message costs a node one broker message and one delivery; the loadgen
# publishes straight into NATS (as a backend would), so no POST is in the nodes' CPU.
if [[ -n $FANIN_RATES ]]; then
  for k in 1 3; do
    label=fanin-$k
    log "fan-in: $k node(s), one subscriber each, $FANIN_RATES msg/s"
    start_nodes "$k" "$OUT/fanout.yaml"
    v0=$(varz)
    if loadgen "$label" -mode fanout -n "$k" -nats-pub "$BROKER_URL" -steps "$FANIN_RATES" -step-duration 2s -warmup 1s \
      -other-limit 0.3 -repeats 1 -repeat-budget 15s; then
      printf '{"label":"%s","nodes":%s,"broker_before":%s,"broker_after":%s,"node_figures":%s,%s\n' "$label" "$k" "$v0" "$(varz)" "$(node_figures)" \
        "$(sed 's/^{"mode":"fanout"/"mode":"fanin"/' "$OUT/$label.json")" >>"$OUT/results.jsonl"
    fi
    stop_nodes
  done
fi

# ---- (c) node-to-node traffic and session records, on 3 idle nodes: heartbeats over 5 s;
# then RECORDS streams opened on nodes 2 and 3 only, so that node 1 holds their records and
# nothing else; the streams close and the sessions expire (sessionTtlMs 10 s), which each
# owner broadcasts too. Node 1's heap is read after a full GC: a heap snapshot (SIGUSR2)
# collects garbage first.
gc_node1() {
  kill -USR2 "${NODE_PIDS[0]}"
  sleep 1
  rm -f "$OUT"/snapshots/*.heapsnapshot
}
if ((RECORDS > 0)) && ((SECONDS < DEADLINE - 60)); then
  log "node-to-node traffic: heartbeats, then $RECORDS sessions opened and expired"
  printf 'publish: true\nsessionTtlMs: 10000\n' >"$OUT/records.yaml"
  mkdir -p "$OUT/snapshots"
  NODE_FLAGS=(--heapsnapshot-signal=SIGUSR2 "--diagnostic-dir=$OUT/snapshots")
  start_nodes 3 "$OUT/records.yaml"
  NODE_FLAGS=()
  # Node 1's CPU in ms and the time, read outside the heap snapshots (which cost CPU too).
  node1_cpu() { printf '[%s,%s]' "$(awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15) * 1000 / t}' "/proc/${NODE_PIDS[0]}/stat")" "$(date +%s.%N)"; }
  v0=$(varz)
  c0=$(node1_cpu)
  sleep 5
  v1=$(varz)
  c1=$(node1_cpu)
  gc_node1
  before=$(node_figures)
  c2=$(node1_cpu)
  saved_urls=("${NODE_URLS[@]}")
  NODE_URLS=("${saved_urls[@]:1}") # the loadgen opens its streams on nodes 2 and 3
  loadgen records-open -mode idle -n "$RECORDS" -settle 2s || true
  NODE_URLS=("${saved_urls[@]}")
  v2=$(varz)
  c3=$(node1_cpu)
  gc_node1
  held=$(node_figures) # the streams are closed, their sessions not expired yet
  c3b=$(node1_cpu)
  sleep 12 # sessionTtlMs + a heartbeat or two
  v3=$(varz)
  c4=$(node1_cpu)
  gc_node1
  after=$(node_figures)
  # The expiry window starts after the second snapshot: shift its start by the snapshot's CPU.
  c4=$("$NODE" -e "const [a,b,c]=[$c3,$c3b,$c4]; console.log(JSON.stringify([c[0]-(b[0]-a[0]), c[1]-(b[1]-a[1])]))")
  printf '{"label":"records","mode":"records-live","sessions":%s,"broker":[%s,%s,%s,%s],"node_figures":[%s,%s,%s],"node1_cpu":[%s,%s,%s,%s,%s],"idle":%s}\n' \
    "$RECORDS" "$v0" "$v1" "$v2" "$v3" "$before" "$held" "$after" "$c0" "$c1" "$c2" "$c3" "$c4" \
    "$(cat "$OUT/records-open.json" 2>/dev/null || echo null)" >>"$OUT/results.jsonl"
  stop_nodes
fi

log "what one session record costs a node's heap (1,000,000 records, node --expose-gc)"
taskset -c "$SERVER_CPU" "$NODE" --expose-gc bench/scaleout-records.ts 1000000 >>"$OUT/results.jsonl"

read -r LOAD1 LOAD5 _ </proc/loadavg
printf '{"mode":"end","date":"%s","loadavg_after":[%s,%s]}\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$LOAD1" "$LOAD5" >>"$OUT/results.jsonl"

log "results ($OUT/results.jsonl)"
"$NODE" bench/scaleout-summary.ts "$OUT/results.jsonl"
