# Shared by the benchmark scripts (sourced): messages, the checks every run needs, the loadgen.
# The caller sets NAME (its messages' prefix), ROOT, NODE and OUT.

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "$NAME" "$*" >&2; exit 1; }

# bench_checks CMD...: Node 24 from npm install, each CMD, two cores (server and loadgen are
# pinned apart), and as many open files as the hard limit allows (a process may hold ~20,000 sockets).
bench_checks() {
  [[ -x $NODE ]] || die "no $NODE: run npm install first"
  local cmd
  for cmd in "$@"; do command -v "$cmd" >/dev/null || die "$cmd is not installed"; done
  (($(nproc) >= 2)) || die "needs 2 cores to pin the server and the loadgen apart (nproc: $(nproc))"
  ulimit -n "$(ulimit -Hn)"
}

# A port free on 127.0.0.1 now (the kernel's pick), for a server about to be started there.
free_port() { "$NODE" -e "const s=require('node:net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"; }

# steps_for N: the W1 ladder for N subscribers, in msg/s: 12,500 deliveries/s doubled six times.
steps_for() { "$NODE" -e "console.log(Array.from({length: 7}, (_, k) => +(12500 * 2 ** k / $1).toPrecision(3)).join(','))"; }

build_loadgen() {
  (cd "$ROOT/bench/loadgen" && GOTOOLCHAIN=local go build -o "$OUT/loadgen" .)
}
