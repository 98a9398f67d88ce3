#!/usr/bin/env bash
# Local stand-ins for cloud brokers, for livepipe's gcppubsub:// and awssns:// / awssqs:// tests.
#
#   scripts/cloud-emulators.sh up     [name...]   install what is missing, start, wait until ready
#   scripts/cloud-emulators.sh down   [name...]   stop what `up` started and wait for it to exit
#   scripts/cloud-emulators.sh status [name...]   one line per emulator; exit 1 if any named one is down
#
# Names: pubsub moto (none = all).
#
#   pubsub  Google's in-memory Pub/Sub server (the Go package pstest), built from
#           scripts/pubsub-emulator with `go build` (modules from the Go module proxy).
#           Clients: PUBSUB_EMULATOR_HOST=127.0.0.1:8085
#   moto    moto in server mode (PyPI moto[server], in a venv): SNS and SQS, with
#           SNS-to-SQS fan-out. Clients: endpoint http://127.0.0.1:4566, any region
#           and any access key (e.g. test/test).
#
# Both keep all state in memory: `down X && up X` starts X empty. Each keeps its
# build or venv, log and pid file in ${LIVEPIPE_BROKERS_DIR:-/tmp/livepipe-brokers}/<name>
# and listens on 127.0.0.1 only. Installing may need root (apt-get, only when go
# or python3's venv module is missing). Environment:
#   LIVEPIPE_BROKERS_DIR      base directory             (default /tmp/livepipe-brokers)
#   LIVEPIPE_BROKERS_TIMEOUT  readiness timeout, seconds (default 120)
# shellcheck disable=SC2016  # literal $ in single quotes, as in brokers.sh
set -euo pipefail

ALL_EMULATORS=(pubsub moto)
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${LIVEPIPE_BROKERS_DIR:-/tmp/livepipe-brokers}
TIMEOUT=${LIVEPIPE_BROKERS_TIMEOUT:-120}
HOST=127.0.0.1
PROG=cloud-emulators
# shellcheck source=scripts/lib/servers.sh
source "$SCRIPT_DIR/lib/servers.sh"
MOTO_VERSION=5.2.5
export DEBIAN_FRONTEND=noninteractive
export HOME=${HOME:-/root} # go and pip keep their caches there

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

port_of() { case $1 in pubsub) echo 8085 ;; moto) echo 4566 ;; esac; }

url_of() {
  case $1 in
    pubsub) echo "PUBSUB_EMULATOR_HOST=$HOST:8085" ;;
    moto) echo "http://$HOST:4566" ;;
  esac
}

# What /proc/PID/cmdline must contain for a pid file to still be ours.
proc_pattern() { case $1 in pubsub) echo 'pubsub-emulator' ;; moto) echo 'moto_server' ;; esac; }

apt_install() {
  [[ $(id -u) == 0 ]] || die "missing packages ($*); run as root to install them"
  log "installing: $*"
  {
    apt-get update -q &&
      apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 "$@"
  } </dev/null >>"$BASE/apt.log" 2>&1 || {
    tail -n 30 "$BASE/apt.log" >&2
    die "apt-get install $* failed; full log: $BASE/apt.log"
  }
}

# ----------------------------------------------------------------- pubsub

PUBSUB_SRC=$SCRIPT_DIR/pubsub-emulator

# The binary is named after a hash of its sources, so an edit rebuilds it.
pubsub_bin() {
  local h
  h=$(cat "$PUBSUB_SRC/go.mod" "$PUBSUB_SRC/go.sum" "$PUBSUB_SRC/main.go" | sha256sum | cut -c1-12)
  echo "$(dir_of pubsub)/bin/pubsub-emulator-$h"
}

install_pubsub() {
  local bin
  bin=$(pubsub_bin)
  [[ -x $bin ]] && return 0
  if ! command -v go >/dev/null 2>&1; then
    if [[ -x /usr/local/go/bin/go ]]; then
      export PATH=$PATH:/usr/local/go/bin
    else
      apt_install golang-go ca-certificates
    fi
  fi
  log "pubsub: building the pstest emulator ($(go version | cut -d' ' -f3)) into $bin"
  mkdir -p "$(dir_of pubsub)/bin"
  # -mod=readonly: go.sum pins every module; GOTOOLCHAIN=auto may fetch a newer go from the proxy.
  (cd "$PUBSUB_SRC" && GOFLAGS=-mod=readonly GOTOOLCHAIN=auto go build -o "$bin.tmp" .) \
    </dev/null >"$(dir_of pubsub)/build.log" 2>&1 || {
    tail -n 30 "$(dir_of pubsub)/build.log" >&2
    die "pubsub: go build failed; log: $(dir_of pubsub)/build.log"
  }
  mv "$bin.tmp" "$bin"
}

start_pubsub() { spawn pubsub "$(pubsub_bin)" -addr "$HOST:8085"; }

ready_pubsub() { wait_until pubsub "port 8085" port_open 8085; }

# ------------------------------------------------------------------- moto

moto_venv() { echo "$(dir_of moto)/venv"; }

install_moto() {
  local venv
  venv=$(moto_venv)
  [[ -f $venv/.complete-$MOTO_VERSION ]] && return 0
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  log "moto: installing moto[server]==$MOTO_VERSION into $venv"
  rm -rf "$venv"
  mkdir -p "$(dir_of moto)"
  {
    python3 -m venv "$venv" &&
      "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input "moto[server]==$MOTO_VERSION"
  } </dev/null >"$(dir_of moto)/pip.log" 2>&1 || {
    tail -n 30 "$(dir_of moto)/pip.log" >&2
    die "moto: pip install failed; log: $(dir_of moto)/pip.log"
  }
  touch "$venv/.complete-$MOTO_VERSION"
}

start_moto() { spawn moto "$(moto_venv)/bin/moto_server" -H "$HOST" -p 4566; }

# moto's own API answers once the server dispatches requests.
moto_probe() {
  "$(moto_venv)/bin/python" -c \
    "import urllib.request; urllib.request.urlopen('http://$HOST:4566/moto-api/', timeout=3)"
}

ready_moto() { wait_until moto "HTTP on port 4566" moto_probe; }

# ---------------------------------------------------------------- commands

up_one() {
  local name=$1 pid t0=$SECONDS
  mkdir -p "$(dir_of "$name")"
  "install_$name"
  pid=$(live_pid "$name")
  if [[ -n $pid ]]; then
    "ready_$name"
    log "$name already running (pid $pid) at $(url_of "$name")"
    return 0
  fi
  rm -f "$(pidfile_of "$name")"
  check_port_free "$name"
  echo "=== starting $name $(date -Is)" >>"$(logfile_of "$name")"
  "start_$name"
  local deadline=$((SECONDS + 30))
  until [[ -n $(live_pid "$name") ]]; do
    ((SECONDS < deadline)) || fail_log "$name" "did not start (no live process behind its pid file after 30s)"
    sleep 0.1
  done
  "ready_$name"
  log "$name up (pid $(live_pid "$name"), $((SECONDS - t0))s) at $(url_of "$name")"
}

main() {
  (($#)) || usage
  local cmd=$1; shift
  local names=("$@") n
  ((${#names[@]})) || names=("${ALL_EMULATORS[@]}")
  for n in "${names[@]}"; do
    [[ " ${ALL_EMULATORS[*]} " == *" $n "* ]] || die "unknown emulator '$n' (known: ${ALL_EMULATORS[*]})"
  done

  case $cmd in
    up | down)
      mkdir -p "$BASE"
      # One up/down at a time (the restart tests run down + up). Not brokers.sh's lock:
      # the two scripts manage different servers and may run side by side.
      exec 9>"$BASE/.cloud-emulators.lock"
      flock -w 300 9 || die "another cloud-emulators.sh up/down holds $BASE/.cloud-emulators.lock"
      ;;
  esac

  case $cmd in
    up) for n in "${names[@]}"; do up_one "$n"; done ;;
    down) for n in "${names[@]}"; do down_one "$n"; done ;;
    status)
      local rc=0
      for n in "${names[@]}"; do status_one "$n" || rc=1; done
      return "$rc"
      ;;
    *) usage ;;
  esac
}

main "$@"
