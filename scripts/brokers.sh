#!/usr/bin/env bash
# Local message brokers for livepipe's integration tests.
#
#   scripts/brokers.sh up     [name...]   install what is missing, start, wait until ready
#   scripts/brokers.sh down   [name...]   stop what `up` started and wait for it to exit
#   scripts/brokers.sh status [name...]   one line per broker; exit 1 if any named one is down
#
# Names: rabbitmq nats redis mosquitto postgres kafka (none = all).
#
# Every server listens on 127.0.0.1 only, on its standard port, and keeps its
# data, logs and pid file in ${LIVEPIPE_BROKERS_DIR:-/tmp/livepipe-brokers}/<name>
# (outside the repository). `down` keeps the data, so `down X && up X` is a
# quick restart, e.g. for reconnect tests. To start from scratch: `down`, then
# delete the directory.
#
# URLs:
#   rabbitmq   amqp://guest:guest@127.0.0.1:5672
#   nats       nats://127.0.0.1:4222            (JetStream on)
#   redis      redis://127.0.0.1:6379
#   mosquitto  mqtt://127.0.0.1:1883            (MQTT 3.1.1 and 5, anonymous)
#   postgres   postgres://postgres:postgres@127.0.0.1:5432/livepipe_test
#   kafka      kafka://127.0.0.1:9092           (bootstrap 127.0.0.1:9092, KRaft)
#
# Installing needs root (Debian packages via apt-get; Kafka jars from Maven
# Central via scripts/kafka/pom.xml). Environment:
#   LIVEPIPE_BROKERS_DIR      base directory            (default /tmp/livepipe-brokers)
#   LIVEPIPE_BROKERS_TIMEOUT  readiness timeout, seconds, per broker (default 120)
#   LIVEPIPE_KAFKA_HEAP       Kafka -Xmx                (default 1g)
# shellcheck disable=SC2016,SC2094  # literal $ in single quotes and log files shared by design
set -euo pipefail

ALL_BROKERS=(rabbitmq nats redis mosquitto postgres kafka)
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${LIVEPIPE_BROKERS_DIR:-/tmp/livepipe-brokers}
TIMEOUT=${LIVEPIPE_BROKERS_TIMEOUT:-120}
HOST=127.0.0.1
PROG=brokers
# shellcheck source=scripts/lib/servers.sh
source "$SCRIPT_DIR/lib/servers.sh"
export DEBIAN_FRONTEND=noninteractive

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

port_of() {
  case $1 in
    rabbitmq) echo 5672 ;; nats) echo 4222 ;; redis) echo 6379 ;;
    mosquitto) echo 1883 ;; postgres) echo 5432 ;; kafka) echo 9092 ;;
  esac
}

url_of() {
  case $1 in
    rabbitmq) echo "amqp://guest:guest@$HOST:5672" ;;
    nats) echo "nats://$HOST:4222" ;;
    redis) echo "redis://$HOST:6379" ;;
    mosquitto) echo "mqtt://$HOST:1883" ;;
    postgres) echo "postgres://postgres:postgres@$HOST:5432/livepipe_test" ;;
    kafka) echo "kafka://$HOST:9092" ;;
  esac
}

# PostgreSQL records its own pid in postmaster.pid once it runs (pg_ctl forks).
server_pidfile() {
  local pg
  pg="$(dir_of postgres)/data/postmaster.pid"
  if [[ $1 == postgres && -s $pg ]]; then echo "$pg"; else echo "$2"; fi
}

# What /proc/PID/cmdline must contain for a pid file to still be ours.
proc_pattern() {
  case $1 in
    rabbitmq) echo 'beam' ;; nats) echo 'nats-server' ;; redis) echo 'redis-server' ;;
    mosquitto) echo 'mosquitto' ;; postgres) echo 'postgres' ;; kafka) echo 'kafka.Kafka' ;;
  esac
}

# ------------------------------------------------------------- installing

pkg_installed() {
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

packages_for() {
  case $1 in
    rabbitmq) echo rabbitmq-server ;;
    nats) echo nats-server ;;
    redis) echo redis-server redis-tools ;;
    mosquitto) echo mosquitto mosquitto-clients ;;
    postgres) echo postgresql postgresql-client ;;
    kafka)
      command -v java >/dev/null 2>&1 || echo openjdk-17-jre-headless
      command -v mvn >/dev/null 2>&1 || echo maven
      ;;
  esac
}

# Packages that start a server on install, and the init script that stops it.
initscript_for() {
  case $1 in
    rabbitmq-server) echo rabbitmq-server ;; redis-server) echo redis-server ;;
    mosquitto) echo mosquitto ;; postgresql) echo postgresql ;; nats-server) echo nats-server ;;
  esac
}

install_packages() {
  local missing=() name p
  for name in "$@"; do
    for p in $(packages_for "$name"); do
      pkg_installed "$p" || missing+=("$p")
    done
  done
  ((${#missing[@]})) || return 0
  [[ $(id -u) == 0 ]] || die "missing packages (${missing[*]}); run as root to install them"
  log "installing: ${missing[*]}"

  # No server may start on install (no systemd here, but SysV postinsts would
  # start them on 0.0.0.0 through invoke-rc.d): a policy-rc.d that says no.
  local own_policy=
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# written by livepipe scripts/brokers.sh during apt-get install\nexit 101\n' \
      >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  local rc=0 try apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=120 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  : >"$BASE/apt.log"
  for try in 1 2; do # one retry for a flaky mirror or a held dpkg lock
    rc=0
    {
      apt-get update -q &&
        apt-get install "${apt_opts[@]}" "${missing[@]}"
    } </dev/null >>"$BASE/apt.log" 2>&1 || rc=$?
    ((rc)) || break
    ((try == 2)) || sleep 5
  done
  if [[ -n $own_policy ]]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  if ((rc)); then
    tail -n 30 "$BASE/apt.log" >&2
    die "apt-get install ${missing[*]} failed (exit $rc); full log: $BASE/apt.log"
  fi
  # erlang's postinst may leave an idle epmd listening on 0.0.0.0:4369.
  if command -v epmd >/dev/null 2>&1 && ! epmd -names 2>/dev/null | grep '^name ' >/dev/null; then
    epmd -kill >/dev/null 2>&1 || true
  fi
  # Belt and braces: if a postinst started a packaged server anyway, stop it.
  for p in "${missing[@]}"; do
    local s
    s=$(initscript_for "$p")
    if [[ -n $s && -x /etc/init.d/$s ]]; then
      /etc/init.d/"$s" stop >/dev/null 2>&1 </dev/null || true
    fi
  done
}

# --------------------------------------------------------------- rabbitmq

rabbitmq_env() {
  local d
  d=$(dir_of rabbitmq)
  export RABBITMQ_NODENAME=rabbit@localhost
  export RABBITMQ_NODE_IP_ADDRESS=$HOST RABBITMQ_NODE_PORT=5672 RABBITMQ_DIST_PORT=25672
  export RABBITMQ_CONF_ENV_FILE=$d/rabbitmq-env.conf RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf
  export RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config
  export RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins
  export RABBITMQ_MNESIA_BASE=$d/mnesia RABBITMQ_LOG_BASE=$d/log
  export RABBITMQ_PID_FILE=$d/rabbitmq.pid
  # Erlang distribution (used by rabbitmqctl) and epmd on loopback only.
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
  export ERL_EPMD_ADDRESS=$HOST
  export RABBITMQ_LOGS=$d/rabbitmq.log
  export HOME=/var/lib/rabbitmq # its .erlang.cookie, shared by server and CLI
}

# Run a RabbitMQ program as the rabbitmq user with our environment.
as_rabbitmq() {
  (rabbitmq_env && cd "$(dir_of rabbitmq)" && exec runuser -u rabbitmq -- "/usr/lib/rabbitmq/bin/$1" "${@:2}")
}

start_rabbitmq() {
  local d
  d=$(dir_of rabbitmq)
  mkdir -p "$d/mnesia" "$d/log"
  : >"$d/rabbitmq-env.conf"
  echo '[].' >"$d/enabled_plugins"
  echo '[].' >"$d/advanced.config"
  cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.1 = $HOST:5672
loopback_users.guest = true
log.console = false
log.file.level = info
EOF
  touch "$(logfile_of rabbitmq)"
  chown -R rabbitmq:rabbitmq "$d"
  # epmd (Erlang's node name server, used by rabbitmqctl): an idle one may be
  # left on 0.0.0.0 by the erlang/rabbitmq postinst; replace it by one on
  # loopback. One that has nodes registered belongs to someone else: keep it.
  if port_open 4369 && ! epmd -names 2>/dev/null | grep '^name ' >/dev/null; then
    epmd -kill >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 25; i++)); do port_open 4369 || break; sleep 0.2; done
  fi
  if ! port_open 4369; then
    (export ERL_EPMD_ADDRESS=$HOST && runuser -u rabbitmq -- epmd -daemon -address "$HOST") \
      </dev/null 9>&- >>"$(logfile_of rabbitmq)" 2>&1
  fi
  # -detached returns at once; the VM writes the pid file as it boots.
  as_rabbitmq rabbitmq-server -detached </dev/null 9>&- >>"$(logfile_of rabbitmq)" 2>&1
}

ready_rabbitmq() {
  # Already up and serving AMQP (e.g. `up` twice): nothing to wait for.
  if port_open 5672 && amqp_probe; then return 0; fi
  wait_until rabbitmq "port 5672" port_open 5672
  # await_startup returns once the rabbit app is fully booted.
  as_rabbitmq rabbitmqctl -q await_startup --timeout "$TIMEOUT" </dev/null 9>&- >>"$(logfile_of rabbitmq)" 2>&1 ||
    fail_log rabbitmq "did not finish booting (rabbitmqctl await_startup)"
  wait_until rabbitmq "AMQP handshake" amqp_probe
}

# Send the AMQP 0-9-1 protocol header; a live broker answers with Connection.Start.
amqp_probe() (
  exec 3<>"/dev/tcp/$HOST/5672" || exit 1
  printf 'AMQP\x00\x00\x09\x01' >&3
  reply=$(timeout 3 head -c 7 <&3 | od -An -tx1 | tr -d ' \n') || true
  [[ $reply == 01000000* ]]
)

stop_rabbitmq() {
  local pid=$1
  stop_pid rabbitmq "$pid"
  # epmd was started for RabbitMQ; stop it when no Erlang node is left.
  if command -v epmd >/dev/null 2>&1 && ! epmd -names 2>/dev/null | grep '^name ' >/dev/null; then
    epmd -kill >/dev/null 2>&1 || true
  fi
}

# ------------------------------------------------------------------- nats

start_nats() {
  local d
  d=$(dir_of nats)
  mkdir -p "$d/jetstream"
  spawn nats nats-server -a "$HOST" -p 4222 -js -sd "$d/jetstream" -n livepipe-nats
}

nats_probe() (
  exec 3<>"/dev/tcp/$HOST/4222" || exit 1
  line='' pong=''
  IFS= read -r -t 3 line <&3 || true
  printf 'CONNECT {"verbose":false}\r\nPING\r\n' >&3
  IFS= read -r -t 3 pong <&3 || true
  [[ $line == INFO* && $pong == PONG* ]]
)

ready_nats() { wait_until nats "INFO/PONG on port 4222" nats_probe; }

# ------------------------------------------------------------------ redis

start_redis() {
  local d
  d=$(dir_of redis)
  mkdir -p "$d/data"
  redis-server --daemonize yes --bind "$HOST" --port 6379 --protected-mode yes \
    --dir "$d/data" --pidfile "$(pidfile_of redis)" --logfile "$(logfile_of redis)" \
    --save 60 1 --appendonly no </dev/null 9>&- >>"$(logfile_of redis)" 2>&1
}

ready_redis() {
  wait_until redis "PING on port 6379" \
    bash -c '[[ $(redis-cli -h 127.0.0.1 -p 6379 ping) == PONG ]]'
}

# -------------------------------------------------------------- mosquitto

start_mosquitto() {
  local d
  d=$(dir_of mosquitto)
  mkdir -p "$d/data"
  cat >"$d/mosquitto.conf" <<EOF
pid_file $(pidfile_of mosquitto)
persistence true
persistence_location $d/data/
log_dest file $(logfile_of mosquitto)
log_type error
log_type warning
log_type notice
log_type information
listener 1883 $HOST
allow_anonymous true
EOF
  # Started as root, mosquitto drops to the mosquitto user: it must own its files.
  touch "$(logfile_of mosquitto)"
  chown -R mosquitto: "$d" 2>/dev/null || true
  mosquitto -d -c "$d/mosquitto.conf" </dev/null 9>&- >>"$(logfile_of mosquitto)" 2>&1
}

ready_mosquitto() {
  # A full MQTT CONNECT/SUBSCRIBE round trip: $SYS/broker/version is retained.
  wait_until mosquitto "MQTT round trip on port 1883" \
    mosquitto_sub -h "$HOST" -p 1883 -t '$SYS/broker/version' -C 1 -W 2
}

# --------------------------------------------------------------- postgres

pg_bindir() {
  local b
  b=$(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  [[ -x $b/pg_ctl ]] || die "postgres: no /usr/lib/postgresql/*/bin/pg_ctl (is postgresql installed?)"
  echo "$b"
}

as_postgres() { runuser -u postgres -- "$@"; }

start_postgres() {
  local d bin
  d=$(dir_of postgres)
  bin=$(pg_bindir)
  mkdir -p "$d/run"
  touch "$(logfile_of postgres)"
  chown postgres: "$d" "$d/run" "$(logfile_of postgres)"
  chmod 700 "$d"
  as_postgres test -x "$d" ||
    die "postgres: user postgres cannot reach $d; use a LIVEPIPE_BROKERS_DIR whose parents are world-searchable"
  if [[ ! -s $d/data/PG_VERSION ]]; then
    rm -rf "$d/data"
    local pw="$d/pwfile"
    echo postgres >"$pw"
    chown postgres: "$pw"
    as_postgres "$bin/initdb" -D "$d/data" -U postgres --pwfile="$pw" -E UTF8 --locale=C.UTF-8 \
      --auth-local=trust --auth-host=scram-sha-256 </dev/null 9>&- >>"$(logfile_of postgres)" 2>&1 ||
      fail_log postgres "initdb failed"
    rm -f "$pw"
  fi
  as_postgres "$bin/pg_ctl" -D "$d/data" -l "$(logfile_of postgres)" -W \
    -o "-c listen_addresses=$HOST -p 5432 -c unix_socket_directories=$d/run -c fsync=off" \
    start </dev/null 9>&- >>"$(logfile_of postgres)" 2>&1 || fail_log postgres "pg_ctl start failed"
}

ready_postgres() {
  local d bin
  d=$(dir_of postgres)
  bin=$(pg_bindir)
  wait_until postgres "pg_isready on 5432" "$bin/pg_isready" -q -h "$HOST" -p 5432 -U postgres
  head -n1 "$d/data/postmaster.pid" >"$(pidfile_of postgres)"
  # Create the test database over TCP with the password: this also proves the
  # postgres://postgres:postgres@127.0.0.1:5432 URL works.
  local q
  q=$(PGPASSWORD=postgres "$bin/psql" -h "$HOST" -p 5432 -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'livepipe_test'" 2>>"$(logfile_of postgres)") ||
    fail_log postgres "password login as postgres over TCP failed"
  if [[ $q != 1 ]]; then
    PGPASSWORD=postgres "$bin/psql" -q -h "$HOST" -p 5432 -U postgres -d postgres \
      -c 'CREATE DATABASE livepipe_test' >>"$(logfile_of postgres)" 2>&1 ||
      fail_log postgres "CREATE DATABASE livepipe_test failed"
  fi
}

stop_postgres() {
  local d
  d=$(dir_of postgres)
  as_postgres "$(pg_bindir)/pg_ctl" -D "$d/data" -m fast -w -t 60 stop \
    </dev/null 9>&- >>"$(logfile_of postgres)" 2>&1 || stop_pid postgres "$1"
  rm -f "$(pidfile_of postgres)"
}

# ------------------------------------------------------------------ kafka

KAFKA_POM=$SCRIPT_DIR/kafka/pom.xml

kafka_version() {
  sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM" | head -n1
}

kafka_lib() { echo "$(dir_of kafka)/lib-$(kafka_version)"; }

install_kafka() {
  local lib
  lib=$(kafka_lib)
  local jv
  jv=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
  [[ ${jv%%.*} -ge 17 ]] 2>/dev/null ||
    die "kafka: Kafka $(kafka_version) needs Java 17 or newer; 'java' is ${jv:-missing} (set PATH or install openjdk-17-jre-headless)"
  [[ -f $lib/.complete ]] && return 0
  log "kafka: resolving Apache Kafka $(kafka_version) from Maven Central into $lib"
  rm -rf "$lib"
  mkdir -p "$(dir_of kafka)"
  mvn -B -q -f "$KAFKA_POM" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$lib" </dev/null >"$(dir_of kafka)/mvn.log" 2>&1 || {
    tail -n 30 "$(dir_of kafka)/mvn.log" >&2
    die "kafka: mvn dependency:copy-dependencies failed; log: $(dir_of kafka)/mvn.log"
  }
  ls "$lib"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka: no kafka_2.13 jar in $lib"
  touch "$lib/.complete"
}

# Run a Kafka main class (server, StorageTool, console tools) with the jars.
kafka_java() {
  local d
  d=$(dir_of kafka)
  java -Xms128m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$d/log4j2-tools.properties" -cp "$(kafka_lib)/*" "$@"
}

start_kafka() {
  local d lib
  d=$(dir_of kafka)
  lib=$(kafka_lib)
  mkdir -p "$d/data"
  cat >"$d/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:9093
listeners=PLAINTEXT://$HOST:9092,CONTROLLER://$HOST:9093
advertised.listeners=PLAINTEXT://$HOST:9092
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$d/data
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=24
EOF
  cat >"$d/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
  sed 's/^rootLogger.level = INFO/rootLogger.level = WARN/' "$d/log4j2.properties" >"$d/log4j2-tools.properties"
  if [[ ! -s $d/data/meta.properties ]]; then
    local id
    id=$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$(logfile_of kafka)" | tail -n1)
    [[ -n $id ]] || fail_log kafka "StorageTool random-uuid failed"
    kafka_java kafka.tools.StorageTool format -t "$id" -c "$d/server.properties" --ignore-formatted \
      </dev/null 9>&- >>"$(logfile_of kafka)" 2>&1 || fail_log kafka "StorageTool format failed"
  fi
  echo "=== starting kafka $(date -Is)" >>"$(logfile_of kafka)"
  KAFKA_START_LINE=$(wc -l <"$(logfile_of kafka)")
  spawn kafka java -Xms256m -Xmx"${LIVEPIPE_KAFKA_HEAP:-1g}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
    -Dlog4j2.configurationFile="$d/log4j2.properties" -cp "$lib/*" kafka.Kafka "$d/server.properties"
}

kafka_started() {
  # (no grep -q: with pipefail, tail's SIGPIPE would turn a match into a failure)
  tail -n +"$((${KAFKA_START_LINE:-0} + 1))" "$(logfile_of kafka)" | grep 'Kafka Server started' >/dev/null
}

ready_kafka() {
  wait_until kafka "port 9092" port_open 9092
  # Logged by KafkaRaftServer once the broker is registered and unfenced.
  wait_until kafka "'Kafka Server started' in its log" kafka_started
}

# ---------------------------------------------------------------- commands

# `up` runs in two phases so that slow starters (RabbitMQ, Kafka) boot in
# parallel: up_start launches every broker that is not running, then
# up_wait waits for each to be ready.
declare -A UP_T0=() UP_ALREADY=()

up_start() {
  local name=$1 pid
  UP_T0[$name]=$SECONDS
  mkdir -p "$(dir_of "$name")"
  pid=$(live_pid "$name")
  if [[ -n $pid ]]; then
    UP_ALREADY[$name]=$pid
    return 0
  fi
  rm -f "$(pidfile_of "$name")"
  check_port_free "$name"
  "start_$name"
}

up_wait() {
  local name=$1
  if [[ -n ${UP_ALREADY[$name]:-} ]]; then
    [[ $name == kafka ]] && KAFKA_START_LINE=0
    "ready_$name"
    log "$name already running (pid ${UP_ALREADY[$name]}) at $(url_of "$name")"
    return 0
  fi
  # Daemons write their pid file after forking: give it a moment to appear.
  local deadline=$((SECONDS + 30)) pf
  pf=$(pidfile_of "$name")
  until [[ -n $(live_pid "$name") ]]; do
    if [[ -s $pf ]] && ! pid_alive "$(head -n1 "$pf" | tr -dc '0-9')"; then
      fail_log "$name" "exited right after starting"
    fi
    ((SECONDS < deadline)) || fail_log "$name" "did not start (no live process behind its pid file after 30s)"
    sleep 0.1
  done
  "ready_$name"
  log "$name up (pid $(live_pid "$name"), $((SECONDS - UP_T0[$name]))s) at $(url_of "$name")"
}

main() {
  (($#)) || usage
  local cmd=$1; shift
  local names=("$@") n
  ((${#names[@]})) || names=("${ALL_BROKERS[@]}")
  for n in "${names[@]}"; do
    [[ " ${ALL_BROKERS[*]} " == *" $n "* ]] || die "unknown broker '$n' (known: ${ALL_BROKERS[*]})"
  done

  case $cmd in
    up | down)
      mkdir -p "$BASE"
      chmod 755 "$BASE" 2>/dev/null || true
      # One up/down at a time (tests may restart brokers concurrently).
      exec 9>"$BASE/.lock"
      flock -w 300 9 || die "another brokers.sh up/down holds $BASE/.lock"
      ;;
  esac

  case $cmd in
    up)
      install_packages "${names[@]}"
      for n in "${names[@]}"; do
        [[ $n == kafka ]] && install_kafka
      done
      for n in "${names[@]}"; do up_start "$n"; done
      for n in "${names[@]}"; do up_wait "$n"; done
      ;;
    down)
      for n in "${names[@]}"; do down_one "$n"; done
      ;;
    status)
      local rc=0
      for n in "${names[@]}"; do status_one "$n" || rc=1; done
      return "$rc"
      ;;
    -h | --help | help) usage ;;
    *) usage ;;
  esac
}

main "$@"
