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

build_loadgen() {
  (cd "$ROOT/bench/loadgen" && GOTOOLCHAIN=local go build -o "$OUT/loadgen" .)
}
