#!/usr/bin/env bash
# livepipe side by side with nchan, Pushpin, better-sse and a bare node:http server, in one
# command (see bench/README.md, "Rivals"):
#   bash bench/rivals.sh
# For each workload and each server: start the server pinned to one core (configured here,
# on 127.0.0.1), run the Go loadgen pinned to the other, stop the server. Then writes
# bench/RESULTS.md (tables, ratios to nchan) from this run's .bench-out/rivals/results.jsonl.
# Every process it starts is stopped when it ends, however it ends. About 14 minutes.
#
# Needs: go, taskset, curl, nginx + libnginx-mod-nchan, pushpin (Debian packages), better-sse
# (npm, devDependency). Settings (environment):
#   RIVALS_SERVERS="nchan pushpin better-sse raw-node livepipe"   which servers
#   RIVALS_WORKLOADS="w1 w2 w3 w4"                                 which workloads
#   RIVALS_OUT=bench/RESULTS.md                                    where the tables go
#   RIVALS_DIR=.bench-out/rivals                                   raw data (emptied first)
#   RIVALS_IDLE_BIG=50000                                          W2's second step (0: skip it)
#   BENCH_SERVER_CPU=0 BENCH_LOADGEN_CPU=1                         cores to pin to
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${RIVALS_DIR:-$ROOT/.bench-out/rivals}
NODE=$ROOT/node_modules/.bin/node
export PATH="$ROOT/node_modules/.bin:$PATH"
SERVERS=${RIVALS_SERVERS:-nchan pushpin better-sse raw-node livepipe}
WORKLOADS=${RIVALS_WORKLOADS:-w1 w2 w3 w4}
RESULTS_MD=${RIVALS_OUT:-$ROOT/bench/RESULTS.md}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
LOADGEN_CPU=${BENCH_LOADGEN_CPU:-1}
IDLE_BIG=${RIVALS_IDLE_BIG:-50000}
# W2's big step opens more sockets than one process may hold here (the open-file hard limit
# is 20,000 and cannot be raised), so the servers that can run several processes (livepipe
# --workers, nginx worker_processes) run this many, and so does the loadgen, each loadgen
# process from its own source address (one address has ~28,000 ephemeral ports).
IDLE_PROCS=3
DEADLINE=$((SECONDS + 870 + (IDLE_BIG > 0 ? 120 : 0))) # the whole run stays under 15 (W2 big step: 17) minutes

SERVER_PIDS=() # every process of the server under test (pushpin is several)
LAUNCH_PID=
ORIGIN_PID=
LOADGEN_PID=
cleanup() {
  local p
  for p in $LOADGEN_PID $ORIGIN_PID $LAUNCH_PID "${SERVER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in $LOADGEN_PID $ORIGIN_PID $LAUNCH_PID "${SERVER_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NAME=rivals
source bench/lib.sh
bench_checks go taskset curl nginx pushpin
[[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ]] || die "libnginx-mod-nchan is not installed"
[[ -d node_modules/better-sse ]] || die "better-sse is not installed (npm install --save-dev better-sse)"
rm -rf "$OUT"
mkdir -p "$OUT"

log "building the loadgen and livepipe"
build_loadgen
npm run --silent build >"$OUT/build.log" 2>&1 || printf 'rivals: npm run build reported errors (see %s); trying the emitted code anyway\n' "$OUT/build.log" >&2

descendants() { # pid: the pid and all its descendants
  local p=$1 c
  echo "$p"
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do descendants "$c"; done
}
wait_http() { # url, label
  for _ in $(seq 150); do
    curl -sf -m 1 -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  printf 'rivals: %s did not answer %s within 15 s (logs in %s)\n' "$2" "$1" "$OUT" >&2
  return 1
}

versions() {
  printf '{"mode":"machine","date":"%s","cpu":"%s","cores":%s,"mem_kb":%s,"kernel":"%s","nofile_hard":%s,"loadavg_1m_before":"%s",' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" "$(nproc)" \
    "$(awk '/MemTotal/ {print $2}' /proc/meminfo)" "$(uname -r)" "$(ulimit -Hn)" "$(cut -d' ' -f1 /proc/loadavg)"
  printf '"node":"%s","go":"%s","nginx":"%s","nchan":"%s","pushpin":"%s","better_sse":"%s","livepipe":"%s"}\n' \
    "$($NODE --version)" "$(go env GOVERSION)" "$(nginx -v 2>&1 | sed 's/.*nginx\///')" \
    "$(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null)" "$(pushpin --version 2>/dev/null | awk '{print $2}')" \
    "$("$NODE" -p "require('./node_modules/better-sse/package.json').version")" \
    "$("$NODE" -p "require('./package.json').version")@$(git rev-parse --short HEAD)$(git diff --quiet -- src || echo '+changes')"
}
versions >"$OUT/results.jsonl"

# ---- servers: start_<name> sets PORT, SERVER_PIDS and (pushpin) PUB_URL ----

PROCS=1 # start_*: how many server processes (W2's big step: IDLE_PROCS)
start_nchan() {
  local dir=$OUT/nginx reuseport=
  mkdir -p "$dir/tmp"
  PORT=$(free_port)
  # Several workers: the kernel spreads the connections over them (one accept queue each).
  ((PROCS > 1)) && reuseport=' reuseport'
  cat >"$dir/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
daemon off;
worker_processes $PROCS;
worker_rlimit_nofile $(ulimit -Hn);
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $(($(ulimit -Hn) - 100)); multi_accept on; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  server {
    listen 127.0.0.1:$PORT backlog=4096$reuseport;
    location = /sub  { nchan_subscriber eventsource; nchan_channel_id \$arg_c; }
    location = /sub2 { nchan_subscriber eventsource; nchan_channel_id \$arg_c \$arg_d; }
    location = /pub  { nchan_publisher http; nchan_channel_id \$arg_c; }
    location = /healthz { return 200; }
  }
}
EOF
  taskset -c "$SERVER_CPU" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
  LAUNCH_PID=$!
  wait_http "http://127.0.0.1:$PORT/healthz" nginx || return 1
  # The master only supervises; the workers carry the connections (all are counted).
  wait_procs $((PROCS + 1)) || return 1
  mapfile -t SERVER_PIDS < <(descendants "$LAUNCH_PID")
}
wait_procs() { # count: until the launched server has this many processes
  for _ in $(seq 100); do
    (($(descendants "$LAUNCH_PID" | wc -l) >= $1)) && return 0
    sleep 0.1
  done
  printf 'rivals: the server did not start %s processes\n' "$1" >&2
  return 1
}

start_pushpin() {
  local dir=$OUT/pushpin origin_port
  mkdir -p "$dir/run" "$dir/log"
  PORT=$(free_port)
  origin_port=$PORT
  while [[ $origin_port == "$PORT" ]]; do origin_port=$(free_port); done # the kernel may hand out the same port twice
  # Pushpin's packaged config, with its own run/log dirs, port and route; zurl (which makes
  # the proxy's requests to the origin) started by the runner and reached in the run dir; log
  # level warn (livepipe runs at warn too); the handler's delivery rate limit (message_rate,
  # 2,500/s by default) lifted so that the server, not a configured cap, is measured. Its
  # publish API stays on 127.0.0.1:5561; condure listens on 0.0.0.0 (not configurable here).
  sed -e "s|^rundir=.*|rundir=$dir/run|" -e "s|^logdir=.*|logdir=$dir/log|" -e "s|^http_port=.*|http_port=$PORT|" \
    -e "s|^services=.*|services=condure,zurl,pushpin-proxy,pushpin-handler|" -e "s|^log_level=.*|log_level=1|" \
    -e 's|^\[proxy\]$|[proxy]\nzurl_out_specs=ipc://{rundir}/{ipc_prefix}zurl-in\nzurl_out_stream_specs=ipc://{rundir}/{ipc_prefix}zurl-in-stream\nzurl_in_specs=ipc://{rundir}/{ipc_prefix}zurl-out|' \
    -e "s|^routesfile=.*|routesfile=$dir/routes|" -e "s|^message_rate=.*|message_rate=10000000|" \
    -e "s|^message_hwm=.*|message_hwm=10000000|" -e "s|^client_maxconn=.*|client_maxconn=$(($(ulimit -Hn) - 100))|" \
    /etc/pushpin/pushpin.conf >"$dir/pushpin.conf"
  echo "* 127.0.0.1:$origin_port" >"$dir/routes"
  taskset -c "$SERVER_CPU" "$NODE" bench/peers/grip-origin.ts --port "$origin_port" >"$dir/origin.log" 2>&1 &
  ORIGIN_PID=$!
  taskset -c "$SERVER_CPU" pushpin --config="$dir/pushpin.conf" >"$dir/stdout.log" 2>&1 &
  LAUNCH_PID=$!
  wait_http "http://127.0.0.1:$PORT/healthz" pushpin || return 1
  wait_http_publish || return 1
  mapfile -t SERVER_PIDS < <(descendants "$LAUNCH_PID"; echo "$ORIGIN_PID")
  PUB_URL=http://127.0.0.1:5561/publish/
}
wait_http_publish() {
  for _ in $(seq 100); do
    curl -sf -m 1 -o /dev/null -H 'Content-Type: application/json' -d '{"items":[]}' http://127.0.0.1:5561/publish/ && return 0
    sleep 0.1
  done
  printf "rivals: pushpin's publish API (127.0.0.1:5561) did not answer\n" >&2
  return 1
}

start_node_peer() { # script
  PORT=$(free_port)
  taskset -c "$SERVER_CPU" "$NODE" "$1" --port "$PORT" >"$OUT/$(basename "$1" .ts).log" 2>&1 &
  LAUNCH_PID=$!
  wait_http "http://127.0.0.1:$PORT/healthz" "$1" || return 1
  SERVER_PIDS=("$LAUNCH_PID")
}
start_better-sse() { start_node_peer bench/peers/better-sse.ts; }
start_raw-node() { start_node_peer bench/peers/raw-node.ts; }
start_livepipe() {
  PORT=$(free_port)
  local workers=()
  ((PROCS > 1)) && workers=(--workers "$PROCS")
  taskset -c "$SERVER_CPU" "$NODE" bin/livepipe.js --port "$PORT" --log-level warn "${workers[@]}" >"$OUT/livepipe.log" 2>&1 &
  LAUNCH_PID=$!
  wait_http "http://127.0.0.1:$PORT/healthz" livepipe || return 1
  # --workers: the primary (which only supervises) and its workers; a moment for the last to listen.
  if ((PROCS > 1)); then
    wait_procs $((PROCS + 1)) || return 1
    sleep 2
  fi
  mapfile -t SERVER_PIDS < <(descendants "$LAUNCH_PID")
}

stop_server() {
  local p
  for p in $ORIGIN_PID $LAUNCH_PID; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do
    kill -0 "$LAUNCH_PID" 2>/dev/null || break
    sleep 0.1
  done
  for p in $ORIGIN_PID $LAUNCH_PID "${SERVER_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  SERVER_PIDS=() LAUNCH_PID='' ORIGIN_PID=''
}

# Starts a server, up to 3 times: a port free on 127.0.0.1 may still be taken on 0.0.0.0
# (condure binds there) by a connection of the previous workload waiting in TIME_WAIT.
start() { # server, workload label
  local try
  for try in 1 2 3; do
    "start_$1" && return 0
    stop_server
  done
  printf '{"server":"%s","workload":"%s","failed":"the server did not start"}\n' "$1" "$2" >>"$OUT/results.jsonl"
  return 1
}

loadgen() { # server, workload label, loadgen flags...
  local server=$1 label=$2
  shift 2
  ((SECONDS < DEADLINE)) || { printf 'rivals: out of time before %s %s\n' "$server" "$label" >&2; return 0; }
  local pids
  pids=$(IFS=,; echo "${SERVER_PIDS[*]}")
  # Pushpin cancels some of 200 connections opened at once ("zhttp server: received message
  # out of sequence", then 502): it gets 50 at a time.
  local par=200
  [[ $server == pushpin ]] && par=50
  timeout $((DEADLINE - SECONDS)) taskset -c "$LOADGEN_CPU" "$OUT/loadgen" -peer "$server" -url "http://127.0.0.1:$PORT" \
    -connect-concurrency "$par" -pub-url "${PUB_URL:-http://127.0.0.1:5561/publish/}" -pid "$pids" "$@" >"$OUT/$server-$label.json" 2>"$OUT/$server-$label.err" &
  LOADGEN_PID=$!
  if ! wait "$LOADGEN_PID"; then
    printf 'rivals: loadgen %s %s failed: %s\n' "$server" "$label" "$(tail -2 "$OUT/$server-$label.err")" >&2
    printf '{"server":"%s","workload":"%s","failed":"%s"}\n' "$server" "$label" "$(tail -1 "$OUT/$server-$label.err" | tr -d '"\\')" >>"$OUT/results.jsonl"
    LOADGEN_PID=
    return 0
  fi
  LOADGEN_PID=
  tail -1 "$OUT/$server-$label.err" >&2
  sed "s/^{/{\"server\":\"$server\",\"workload\":\"$label\",/" "$OUT/$server-$label.json" >>"$OUT/results.jsonl"
}

rss_sum() { # VmRSS of every server process, in kB
  local p total=0 kb
  for p in "${SERVER_PIDS[@]}"; do
    kb=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    total=$((total + ${kb:-0}))
  done
  echo "$total"
}

# W2's big step: IDLE_PROCS loadgens at once, each opening its share of the streams from its
# own source address (127.0.0.2, .3, …); RSS summed over every server process before they
# start and once every stream is open (and 3 s more), established connections counted by ss.
idle_split() { # server, workload label, total streams
  local server=$1 label=$2 total=$3 k n pids before after established all_open=1
  ((SECONDS + 150 < DEADLINE)) || { printf 'rivals: out of time before %s %s\n' "$server" "$label" >&2; return 0; }
  pids=$(IFS=,; echo "${SERVER_PIDS[*]}")
  before=$(rss_sum)
  local lg=()
  for ((k = 0; k < IDLE_PROCS; k++)); do
    n=$((total / IDLE_PROCS + (k == IDLE_PROCS - 1 ? total % IDLE_PROCS : 0)))
    # 100 connecting at a time per loadgen: 300 in all stay within node's default listen backlog (511).
    taskset -c "$LOADGEN_CPU" "$OUT/loadgen" -peer "$server" -url "http://127.0.0.1:$PORT" -mode idle -n "$n" -connect-concurrency 100 \
      -sources 1 -source-first $((SOURCE_FIRST + k)) -connect-timeout 100s -settle 3s -hold 15s -pid "$pids" \
      >"$OUT/$server-$label-$k.json" 2>"$OUT/$server-$label-$k.err" &
    lg+=($!)
  done
  LOADGEN_PID="${lg[*]}"
  # Until each loadgen has every stream open (or has given up on some): its log says so.
  for _ in $(seq 1100); do
    all_open=1
    for ((k = 0; k < IDLE_PROCS; k++)); do grep -q 'got their config event' "$OUT/$server-$label-$k.err" 2>/dev/null || all_open=0; done
    ((all_open)) && break
    sleep 0.1
  done
  sleep 3
  after=$(rss_sum)
  established=$(ss -Htn state established "( sport = :$PORT )" | wc -l)
  for k in "${lg[@]}"; do wait "$k" || true; done
  LOADGEN_PID=
  "$NODE" -e '
    const [server, workload, procs, before, after, established, ...files] = process.argv.slice(1);
    const runs = files.map((f) => { try { return JSON.parse(require("fs").readFileSync(f, "utf8")); } catch { return undefined; } });
    const sum = (k) => runs.reduce((s, r) => s + (r?.[k] ?? 0), 0);
    const connected = sum("connected");
    const row = { server, workload, mode: "idle", n: sum("n"), processes: +procs, loadgens: files.length, loadgens_reporting: runs.filter(Boolean).length,
      connected, failed_streams: sum("failed"), still_open: sum("still_open"), established_at_measure: +established,
      connect_s: Math.max(...runs.map((r) => r?.connect_s ?? 0)), server_rss_before_kb: +before, server_rss_after_kb: +after,
      server_rss_per_conn_bytes: connected > 0 ? Math.round(((after - before) * 1024) / connected) : 0,
      first_failure: runs.map((r) => r?.first_failure).find(Boolean) };
    console.log(JSON.stringify(row));
  ' "$server" "$label" "${#SERVER_PIDS[@]}" "$before" "$after" "$established" $(for ((k = 0; k < IDLE_PROCS; k++)); do echo "$OUT/$server-$label-$k.json"; done) | tee -a "$OUT/results.jsonl" >&2
}

# Phases other processes disturbed (> 0.3 core) are run once more, within 20 s per run.
REPEAT=(-other-limit 0.3 -repeats 1 -repeat-budget 20s)

run_workload() { # server, workload
  local server=$1 w=$2 n
  case $w in
  w1)
    for n in 1000 10000; do
      log "$server W1 fan-out to $n"
      start "$server" "w1-$n" || continue
      # 15 s at 100k/s: at 1,000 subscribers that is 1,500 messages, so the p99 rests on 15 of
      # them (5 s left it to 5, and one GC or scheduler hiccup moved it by half).
      loadgen "$server" "w1-$n" -mode fanout -n "$n" -rate "$((100000 / n))" -duration 15s -warmup 2s \
        -steps "$(steps_for "$n")" -step-duration 2s "${REPEAT[@]}"
      stop_server
    done
    ;;
  w2)
    log "$server W2 10,000 idle"
    start "$server" w2-10000 || return 0
    loadgen "$server" w2-10000 -mode idle -n 10000 -settle 3s
    stop_server
    ;;
  w2-big) # after every other workload: see the end of this script
    case $server in
    livepipe | nchan)
      log "$server W2 $IDLE_BIG idle over $IDLE_PROCS server processes"
      PROCS=$IDLE_PROCS
      start "$server" "w2-$IDLE_BIG" && idle_split "$server" "w2-$IDLE_BIG" "$IDLE_BIG"
      PROCS=1
      stop_server
      # The next server's loadgens come from addresses of their own, should any port of these linger.
      SOURCE_FIRST=$((SOURCE_FIRST + IDLE_PROCS))
      ;;
    *) printf '{"server":"%s","workload":"w2-%s","skipped":"one process only, and one process may hold at most %s sockets here"}\n' "$server" "$IDLE_BIG" "$(ulimit -Hn)" >>"$OUT/results.jsonl" ;;
    esac
    ;;
  w3)
    log "$server W3 10,000 own topics + 1 shared"
    start "$server" w3-10000 || return 0
    # Shared topic at 5 msg/s (50,000 deliveries/s) and 2,000 msg/s to the own topics.
    loadgen "$server" w3-10000 -mode fanout -n 10000 -own-topics -own-rate 2000 -rate 5 -duration 10s -warmup 2s "${REPEAT[@]}"
    stop_server
    ;;
  w4)
    log "$server W4 churn during fan-out to 1,000"
    start "$server" w4-1000 || return 0
    # W1 at 20,000 deliveries/s while 16 loops connect, wait until ready and disconnect.
    loadgen "$server" w4-1000 -mode fanout -n 1000 -rate 20 -duration 10s -warmup 2s -churn 16 "${REPEAT[@]}"
    stop_server
    ;;
  esac
}

# W2's big step comes last: its loadgens bind source addresses explicitly, and a port bound so
# and then in TIME_WAIT is refused for a minute to any connect() that lets the kernel choose
# (the other workloads' loadgens, curl). The loadgen resets those streams rather than closing
# them, which leaves none in TIME_WAIT; running the step last keeps that from mattering anyway.
SOURCE_FIRST=2
for w in $WORKLOADS $([[ " $WORKLOADS " == *" w2 "* ]] && ((IDLE_BIG > 0)) && echo w2-big); do
  for server in $SERVERS; do
    run_workload "$server" "$w"
  done
done

log "writing $RESULTS_MD"
"$NODE" bench/rivals-summary.ts "$OUT/results.jsonl" >"$RESULTS_MD"
cat "$RESULTS_MD"
