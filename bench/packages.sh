#!/usr/bin/env bash
# The figures for software packages (issue 15), against one release tenon-server on SQLite:
#   1. upload of a SIZE file (default 1 GiB) with `tenonctl packages upload`: time, and the
#      server's resident memory idle and at its peak during the upload (sampled every 100 ms);
#   2. DEVICES simulated agents (default 200) enrolled, one DL_SIZE package (default 20 MiB)
#      assigned to the tenant, then every agent's `sync --once` started at once: the time until
#      all of them reported it installed, the server's CPU time (user + system) and peak RSS over
#      that time.
# A resumed download (bytes fetched twice) is measured by the tests that interrupt one:
# `cargo test -p tenon-agent --test packages an_interrupted -- --nocapture` (the agent's resume)
# and `cargo test -p tenon-server --test packages_e2e range -- --nocapture` (the server's Range).
#
#   bench/packages.sh [SIZE_MIB] [DEVICES] [DL_SIZE_MIB]     e.g. bench/packages.sh 1024 200 20
#
# Every address is on loopback; the work dir is in /tmp and removed at the end. Prints figures;
# asserts only that every device reported the package installed.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
DEVICES=${2:-200}
DL_MIB=${3:-20}
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_bins
AGENT_BIN=${AGENT_BIN:-$TARGET/release/tenon-agent}
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -q -p tenon-server -p tenonctl -p tenon-agent
fi
work=$(mktemp -d /tmp/tenon-bench-packages.XXXXXX)
server=""
cleanup() { stop_server "$server"; rm -rf "$work"; }
trap cleanup EXIT

# shellcheck disable=SC2086
start_server server "$work/server" --listen 127.0.0.1:0 --data-dir "$work/data" $BENCH_SERVER_LIMITS
url=$(grep -o 'http://[0-9.:]*' "$work/server.out" | head -1)
export TENON_SERVER=$url TENON_TOKEN_FILE=$work/data/admin.token
ctl() { "$CTL_BIN" "$@"; }

# Peak RSS of the server while a command runs (sampled every 100 ms).
peak_during() {
  local out=$1
  shift
  ( peak=0; while kill -0 "$server" 2>/dev/null; do
      r=$(awk '/VmRSS/ {print $2}' "/proc/$server/status"); [ "$r" -gt "$peak" ] && peak=$r; echo "$peak" >"$out"
      sleep 0.1; done ) &
  local sampler=$!
  "$@"
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$server/stat"; }

echo "== 1. upload of ${SIZE_MIB} MiB"
big=$work/big-setup.exe
printf 'MZ' >"$big"
head -c $((SIZE_MIB * 1024 * 1024 - 2)) /dev/urandom >>"$big"
sleep 1
idle=$(rss "$server")
start=$(date +%s.%N)
peak_during "$work/peak1" ctl packages upload "$big" --name Big --version 1 --detect 'file:C:\Big\big.exe' >/dev/null 2>"$work/upload.err"
end=$(date +%s.%N)
upload_s=$(echo "$end - $start" | bc)
peak1=$(cat "$work/peak1")
rm -f "$big"

echo "== 2. ${DEVICES} devices download one ${DL_MIB} MiB package at once"
pkg=$work/app-setup.exe
printf 'MZ' >"$pkg"
head -c $((DL_MIB * 1024 * 1024 - 2)) /dev/urandom >>"$pkg"
ctl packages remove Big >/dev/null
ctl packages upload "$pkg" --name App --version 1 --detect 'file:C:\App\app.exe' >/dev/null 2>&1
token=$(ctl enroll-token create --uses "$DEVICES")
for i in $(seq 1 "$DEVICES"); do
  mkdir -p "$work/d$i"
  echo "{\"hostname\": \"BENCH-$i\", \"signed_in_users\": []}" >"$work/d$i/device.json"
done
enroll_one() {
  "$AGENT_BIN" --state-dir "$work/d$1/state" --platform "simulated:$work/d$1/device.json" enroll --server "$url" --token "$token" >/dev/null
}
export -f enroll_one
export AGENT_BIN work url token
seq 1 "$DEVICES" | xargs -P 8 -I{} bash -c 'enroll_one {}'
ctl packages assign App --tenant --intent required --users both --wait >/dev/null 2>&1
for i in $(seq 1 "$DEVICES"); do
  echo "{\"hostname\": \"BENCH-$i\", \"signed_in_users\": [\"bench$i@contoso.com\"]}" >"$work/d$i/device.json"
done
cpu0=$(cpu_ticks)
start=$(date +%s.%N)
run_all() {
  local pids=()
  for i in $(seq 1 "$DEVICES"); do
    "$AGENT_BIN" --state-dir "$work/d$i/state" --platform "simulated:$work/d$i/device.json" sync --once >/dev/null 2>"$work/d$i/sync.err" &
    pids+=($!)
  done
  local failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
  echo "$failed" >"$work/failed"
}
peak_during "$work/peak2" run_all
end=$(date +%s.%N)
cpu1=$(cpu_ticks)
dl_s=$(echo "$end - $start" | bc)
hz=$(getconf CLK_TCK)
cpu_s=$(echo "scale=2; ($cpu1 - $cpu0) / $hz" | bc)
installed=$(ctl packages status App --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["counts"].get("installed", 0))')
peak2=$(cat "$work/peak2")

echo
echo "packages benchmark ($(nproc) cores, $(date -u +%Y-%m-%d), release build)"
printf '  %-58s %s\n' "upload of ${SIZE_MIB} MiB: time" "${upload_s} s ($(echo "scale=0; $SIZE_MIB / $upload_s" | bc) MiB/s)"
printf '  %-58s %s\n' "server RSS idle / peak during the upload" "$idle / ${peak1} kB"
printf '  %-58s %s\n' "${DEVICES} devices fetch and install a ${DL_MIB} MiB package" "${dl_s} s (wall, all syncs started at once)"
printf '  %-58s %s\n' "server CPU time over that" "${cpu_s} s"
printf '  %-58s %s\n' "server peak RSS over that" "${peak2} kB"
printf '  %-58s %s\n' "devices reporting it installed" "$installed of $DEVICES (failed syncs: $(cat "$work/failed"))"
[ "$installed" = "$DEVICES" ] || { echo "not every device installed it; see $work/d*/sync.err" >&2; exit 1; }
