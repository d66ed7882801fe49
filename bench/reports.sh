#!/usr/bin/env bash
# Changed reports per second against a tenon-server with N enrolled devices (default 10,000), found
# closed loop (REPORT_CONNECTIONS connections, each sending the next report as soon as it has the
# answer; every report differs from that device's last one, so each one is a history row and a
# write transaction), while check-ins run at the same time open loop at a fixed rate (CHECKIN_RATE,
# default 3333/s: 100,000 devices every 30 s) on their own connections, their latency measured
# from the time each was due. Prints changed reports/s, report p50/p99, the 5xx count, check-in
# p50/p99 and their statuses during the same run, and the enrollment rate of the enroll phase.
#
#   bench/reports.sh [DEVICES] [DURATION]      e.g. bench/reports.sh 10000 20s
#
# All load comes from tenon-fleetsim (crates/tenon-fleetsim). The phases: enroll DEVICES from one
# address (the server runs with the enrollment and report rate limits off); one report per device
# (each device's first report sets its primary user and re-signs its envelope, a one-time cost kept
# out of the figures); then the measured run after a warm-up of one check-in interval (every device
# fetches its envelope once, so the check-ins measured are the steady state's 304s).
# CONNECTIONS (check-ins, default 64), REPORT_CONNECTIONS (default 16), CHECKIN_RATE and
# SERVER_ARGS (added to the server's flags) change the setup; SERVER_BIN/CTL_BIN/SIM_BIN (with
# SKIP_BUILD=1) measure other builds. Every address is on loopback. Needs python3. Prints the
# figures; nothing is asserted except that every answer was one the API gives (the script fails on
# any other status or a transport error).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-10000}
DURATION=${2:-20s}
CONNECTIONS=${CONNECTIONS:-64}
REPORT_CONNECTIONS=${REPORT_CONNECTIONS:-16}
CHECKIN_RATE=${CHECKIN_RATE:-3333/s}
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_bins
bench_build
work=$(mktemp -d)
cleanup() {
  rc=$?
  if [ "$rc" -ne 0 ] && [ -s "$work/server.err" ]; then
    echo "failed (exit $rc); the server's last log lines:"; tail -n 5 "$work/server.err"
  fi
  [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$((20000 + RANDOM % 20000))
# shellcheck disable=SC2086 # the limits and SERVER_ARGS are lists of options
start_server server_pid "$work/server" --listen 127.0.0.1:$port --data-dir "$work/data" $BENCH_SERVER_LIMITS ${SERVER_ARGS:-}
export TENON_SERVER=http://127.0.0.1:$port TENON_TOKEN=$(cat "$work/data/admin.token")
token=$("$CTL_BIN" enroll-token create --uses "$DEVICES" --ttl 2h)

echo "== enrolling $DEVICES devices (tenon-fleetsim enroll, 32 connections)"
"$SIM_BIN" enroll --server "$TENON_SERVER" --token "$token" --devices "$DEVICES" --out "$work/creds.txt" --json >"$work/enroll.json"
echo "== one report per device (first reports: primary user detected, envelope re-signed; not measured)"
"$SIM_BIN" run --server "$TENON_SERVER" --creds "$work/creds.txt" --checkin-rate off --report-rate max \
  --report-connections "$REPORT_CONNECTIONS" --report-count "$DEVICES" --duration 30m --json >"$work/first.json"
interval=$(python3 -c "import re,sys; r=float(re.match(r'([0-9.]+)', sys.argv[2]).group(1)); print(f'{int(sys.argv[1]) / r:.3f}s')" "$DEVICES" "$CHECKIN_RATE")
echo "== measured: changed reports closed loop over $REPORT_CONNECTIONS connections, check-ins $CHECKIN_RATE open loop over $CONNECTIONS connections, $DURATION after a warm-up of $interval"
# CPU seconds (user + system) of a process so far; the load generator shares the machine's cores.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
c0=$(cpu_ticks "$server_pid")
"$SIM_BIN" run --server "$TENON_SERVER" --creds "$work/creds.txt" --duration "$DURATION" --warmup "$interval" \
  --checkin-rate "$CHECKIN_RATE" --connections "$CONNECTIONS" \
  --report-rate max --report-connections "$REPORT_CONNECTIONS" --json >"$work/run.json"
c1=$(cpu_ticks "$server_pid")
rss=$(rss "$server_pid")

python3 - "$work/enroll.json" "$work/first.json" "$work/run.json" "$DEVICES" "$rss" "$CHECKIN_RATE" "$((c1 - c0))" "$(getconf CLK_TCK)" "$(nproc)" <<'PY'
import json, sys
enroll, first, run = (json.load(open(p)) for p in sys.argv[1:4])
devices, rss, checkin_rate = sys.argv[4], sys.argv[5], sys.argv[6]
server_cpu, cores = int(sys.argv[7]) / int(sys.argv[8]), sys.argv[9]
def fivexx(k): return sum(n for s, n in k["statuses"].items() if s.startswith("5"))
def counts(d): return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"
e = enroll["kinds"]["enroll"]
print()
print(f"enrollment: {enroll['enrolled']} of {enroll['devices_requested']} devices in {enroll['seconds']:.2f} s = {enroll['rate_per_s']:.0f}/s"
      f" (p50 {e['latency_ms']['p50']:.1f} ms, p99 {e['latency_ms']['p99']:.1f} ms; errors: {counts(e['errors'])})")
f = first["kinds"]["report"]
print(f"first report of every device (primary user, re-sign): {f['count']} in {first['seconds']:.2f} s = {f['rate_per_s']:.0f}/s, p99 {f['latency_ms']['p99']:.1f} ms")
r, c = run["kinds"]["report"], run["kinds"]["checkin"]
print(f"changed reports/s: {r['rate_per_s']:.0f}   ({r['count']} in {run['seconds']:.2f} s; p50 {r['latency_ms']['p50']:.2f} ms, p99 {r['latency_ms']['p99']:.2f} ms, max {r['latency_ms']['max']:.1f} ms; 5xx: {fivexx(r)}; statuses: {counts(r['statuses'])})")
print(f"check-ins at the same time: {c['rate_per_s']:.0f}/s of {checkin_rate} scheduled; p50 {c['latency_ms']['p50']:.2f} ms, p99 {c['latency_ms']['p99']:.2f} ms, max {c['latency_ms']['max']:.1f} ms; 5xx: {fivexx(c)}; statuses: {counts(c['statuses'])}; unsent {c['unsent']}")
print(f"tenon-server CPU during the measured run (warm-up included): {server_cpu:.1f} s in {run['seconds'] + run['warmup_s']:.1f} s on {cores} cores shared with the load generator")
print(f"tenon-server resident memory with {devices} devices: {rss}")
bad = [(name, k["errors"]) for doc in (enroll, first, run) for name, k in doc["kinds"].items() if k["errors_total"]]
if enroll["enrolled"] != enroll["devices_requested"] or bad:
    print(f"FAILED: answers other than the API's ({bad}) or devices not enrolled; the figures above do not count")
    sys.exit(1)
PY
