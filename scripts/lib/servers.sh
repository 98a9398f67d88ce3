# shellcheck shell=bash
# Process plumbing shared by scripts/brokers.sh and scripts/cloud-emulators.sh: each server
# runs detached with a pid file and a log under $BASE/<name>/, listening on $HOST.
#
# The sourcing script sets PROG (log prefix), BASE, HOST and TIMEOUT (readiness, seconds) and
# defines port_of NAME, url_of NAME and proc_pattern NAME (what /proc/PID/cmdline must contain
# for a pid file to still be ours). Optional hooks: server_pidfile NAME (a pid file other than
# our own, e.g. postmaster.pid) and stop_NAME PID (a gentler stop than SIGTERM).

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

dir_of() { echo "$BASE/$1"; }
logfile_of() { echo "$BASE/$1/$1.log"; }
pidfile_of() { echo "$BASE/$1/$1.pid"; }

# True if something accepts TCP connections on $HOST:$1.
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Which process listens on port $1 (best effort, for error messages).
port_owner() {
  if command -v ss >/dev/null 2>&1; then
    ss -Hltnp "sport = :$1" 2>/dev/null | head -3
  fi
}

# True if process $1 exists and is not a zombie (our daemons are reparented to PID 1, which
# may reap them late; kill -0 succeeds on zombies).
pid_alive() {
  local st
  kill -0 "$1" 2>/dev/null || return 1
  st=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $st && $st != Z && $st != X ]]
}

# Prints the pid recorded for server $1 if that process is alive and is the server we
# started; prints nothing otherwise.
live_pid() {
  local name=$1 pidfile pid
  pidfile=$(pidfile_of "$name")
  if declare -F server_pidfile >/dev/null; then pidfile=$(server_pidfile "$name" "$pidfile"); fi
  [[ -s $pidfile ]] || return 0
  pid=$(head -n1 "$pidfile" | tr -dc '0-9')
  [[ -n $pid ]] || return 0
  pid_alive "$pid" || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -- "$(proc_pattern "$name")" >/dev/null || return 0
  echo "$pid"
}

# fail_log NAME MESSAGE: the error, the end of the server's log, exit 1.
fail_log() {
  local name=$1 msg=$2 lf
  lf=$(logfile_of "$name")
  {
    printf '%s: ERROR: %s %s; log: %s\n' "$PROG" "$name" "$msg" "$lf"
    if [[ -f $lf ]]; then
      echo "---- last lines of $lf ----"
      tail -n 25 "$lf"
      echo "----"
    fi
  } >&2
  exit 1
}

# Refuse to start when a foreign process already holds the port.
check_port_free() {
  local name=$1 port
  port=$(port_of "$name")
  if port_open "$port"; then
    die "$name: port $port on $HOST is already in use by a process this script did not start:
$(port_owner "$port")
Stop that process (or, if it is ours from another LIVEPIPE_BROKERS_DIR, 'down' it there), then run '$0 up $name' again."
  fi
}

# wait_until NAME DESCRIPTION CMD...: retry CMD until it succeeds, the server process dies,
# or $TIMEOUT seconds pass.
wait_until() {
  local name=$1 what=$2; shift 2
  local deadline=$((SECONDS + TIMEOUT))
  while :; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    [[ -n $(live_pid "$name") ]] || fail_log "$name" "exited while waiting for $what"
    ((SECONDS < deadline)) || fail_log "$name" "not ready after ${TIMEOUT}s (waiting for $what)"
    sleep 0.2
  done
}

# gone_within PID TENTHS: true once PID has exited, false if it still runs after TENTHS × 0.1 s.
gone_within() {
  local pid=$1 i
  for ((i = 0; i < $2; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  return 1
}

# stop_pid NAME PID: SIGTERM, wait up to 60 s for exit, SIGKILL as a last resort.
stop_pid() {
  local name=$1 pid=$2
  kill -TERM "$pid" 2>/dev/null || true
  gone_within "$pid" 600 && return 0
  log "$name (pid $pid) ignored SIGTERM for 60s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  gone_within "$pid" 50 && return 0
  die "$name (pid $pid) would not exit"
}

# spawn NAME CMD...: start a long-running foreground server detached from our session and our
# stdio (callers such as test runners wait for EOF on their pipes), recording its pid. The
# lock's descriptor 9 is closed, or the server would hold the up/down lock for good.
spawn() {
  local name=$1; shift
  # shellcheck disable=SC2016 # $$ and $1 belong to the inner bash
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' spawn "$(pidfile_of "$name")" "$@" \
    </dev/null 9>&- >>"$(logfile_of "$name")" 2>&1 &
}

# Stops server $1 if it runs (through its stop_NAME hook when there is one) and forgets its pid.
down_one() {
  local name=$1 pid
  pid=$(live_pid "$name")
  if [[ -z $pid ]]; then
    rm -f "$(pidfile_of "$name")"
    log "$name not running"
    return 0
  fi
  if declare -F "stop_$name" >/dev/null; then
    "stop_$name" "$pid"
  else
    stop_pid "$name" "$pid"
  fi
  rm -f "$(pidfile_of "$name")"
  log "$name stopped"
}

# One line for server $1: name, running or stopped, URL; false when it is not running.
status_one() {
  local name=$1 pid
  pid=$(live_pid "$name")
  if [[ -n $pid ]] && port_open "$(port_of "$name")"; then
    printf '%-10s %-8s %s\n' "$name" running "$(url_of "$name")"
    return 0
  fi
  printf '%-10s %-8s %s\n' "$name" stopped "$(url_of "$name")"
  return 1
}
