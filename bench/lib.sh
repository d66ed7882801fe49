# Shell shared by the bench scripts (sourced, not run): the binaries, starting a tenon-server and
# waiting until it serves, its resident memory, stopping it.
#
#   . bench/lib.sh                         (from the repository's root)
#   bench_bins; bench_build                SERVER_BIN, CTL_BIN, SIM_BIN; release builds unless SKIP_BUILD=1
#   start_server VAR LOG ARGS...           tenon-server serve ARGS... in the background, its pid in
#                                          $VAR, stdout in LOG.out and stderr in LOG.err; returns once
#                                          it printed "listening on" (the fleet loaded), fails if it
#                                          exited or took longer than SERVER_START_TIMEOUT (120 s)
#   rss PID                                VmRSS of a process, e.g. "123456 kB"
#   free_port                              a TCP port free on 127.0.0.1 now
#   stop_server PID                        SIGTERM and wait for it to exit
# BENCH_SERVER_LIMITS: the flags that turn the per-address, per-token and per-device rate limits off,
# which a fleet simulated from one address needs.

BENCH_SERVER_LIMITS="--enroll-rate-per-address off --enroll-rate-per-token off --report-rate-per-device off --report-rate-per-address off"

bench_bins() {
  TARGET=${CARGO_TARGET_DIR:-target}
  SERVER_BIN=${SERVER_BIN:-$TARGET/release/tenon-server}
  CTL_BIN=${CTL_BIN:-$TARGET/release/tenonctl}
  SIM_BIN=${SIM_BIN:-$TARGET/release/tenon-fleetsim}
}

bench_build() {
  if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release -q -p tenon-server -p tenonctl
    # On its own: built together, fleetsim's hyper client features would be unified into the server's build.
    cargo build --release -q -p tenon-fleetsim
  fi
}

start_server() {
  local var=$1 log=$2 pid
  shift 2
  "$SERVER_BIN" serve "$@" >"$log.out" 2>"$log.err" &
  pid=$!
  printf -v "$var" %s "$pid"
  local deadline=$((SECONDS + ${SERVER_START_TIMEOUT:-120}))
  until grep -q 'listening on' "$log.out" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "tenon-server exited before it listened; its last log lines:" >&2
      tail -n 5 "$log.err" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "tenon-server did not print \"listening on\" within ${SERVER_START_TIMEOUT:-120} s" >&2
      return 1
    fi
    sleep 0.05
  done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

rss() { awk '/VmRSS/ {print $2 " " $3}' "/proc/$1/status"; }

stop_server() {
  [ -n "${1:-}" ] || return 0
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
