#!/usr/bin/env bash
# A tenant-wide change on a fleet of N enrolled devices (default 100,000) while the fleet works:
# how long until every device is re-signed, how long until every device has fetched its new
# envelope, and what the change does to reports and to other admin writes meanwhile.
#
#   bench/resign.sh [DEVICES]      e.g. bench/resign.sh 100000
#
# All device load comes from tenon-fleetsim (crates/tenon-fleetsim). The phases: enroll DEVICES
# from one address (the server runs with the enrollment and report rate limits off); one report per
# device (each device's first report sets its primary user and re-signs it, kept out of the
# figures); then one run in the background: check-ins open loop at CHECKIN_RATE (default 3333/s,
# so each device every DEVICES/3333 s), changed reports open loop at REPORT_RATE (default 300/s),
# after a warm-up of one check-in interval. Meanwhile an admin write that re-signs nothing
# (`tenonctl settings set --group BenchIdle Custom.Bench N`, a group with no members) runs every
# ADMIN_PERIOD (0.5 s) and each is timed. Then the change: SIGUSR1 to fleetsim (it notes every
# device's ETag), `tenonctl settings set --tenant Custom.Bench 1` (with --wait when this tenonctl
# has it), SIGUSR2 once every device is re-signed; fleetsim ends when every device got a 200 with
# a new ETag (at most RUN_MAX, default 10m).
# Re-signed: with --wait, when it returns; when the server has `GET /api/v1/admin/resign`, also the
# first poll (every 50 ms) with completed_generation >= the write's resign_generation. A server
# without either re-signs inside the write itself: then the write's own time is the re-sign time.
# Prints: those times, the propagation to the devices (first, p50, p99, all), report and check-in
# latency during the change (SIGUSR1..SIGUSR2) and overall, admin-write p50/p99 before and during
# the change. SERVER_ARGS are added to the server's flags; SERVER_BIN/CTL_BIN/SIM_BIN (with
# SKIP_BUILD=1) measure other builds. Every address is on loopback. Needs python3 and curl. Prints
# the figures; nothing is asserted except that every answer was one the API gives.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-100000}
REPORT_RATE=${REPORT_RATE:-300/s}
CHECKIN_RATE=${CHECKIN_RATE:-3333/s}
ADMIN_PERIOD=${ADMIN_PERIOD:-0.5}
RUN_MAX=${RUN_MAX:-10m}
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_bins
bench_build
work=$(mktemp -d)
cleanup() {
  rc=$?
  touch "$work/stop"
  if [ "$rc" -ne 0 ] && [ -s "$work/server.err" ]; then
    echo "failed (exit $rc); the server's last log lines:"; tail -n 5 "$work/server.err"
  fi
  for p in ${sim_pid:-} ${admin_pid:-} ${poll_pid:-}; do kill "$p" 2>/dev/null || true; done
  [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP_LOG:-}" ] && cp "$work/server.err" "$KEEP_LOG"; rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }

port=$((20000 + RANDOM % 20000))
# shellcheck disable=SC2086 # the limits and SERVER_ARGS are lists of options
start_server server_pid "$work/server" --listen 127.0.0.1:$port --data-dir "$work/data" $BENCH_SERVER_LIMITS ${SERVER_ARGS:-}
export TENON_SERVER=http://127.0.0.1:$port TENON_TOKEN=$(cat "$work/data/admin.token")
token=$("$CTL_BIN" enroll-token create --uses "$DEVICES" --ttl 2h)

echo "== enrolling $DEVICES devices (tenon-fleetsim enroll, 32 connections)"
"$SIM_BIN" enroll --server "$TENON_SERVER" --token "$token" --devices "$DEVICES" --out "$work/creds.txt" --json >"$work/enroll.json"
echo "== one report per device (first reports: primary user detected, envelope re-signed; not measured)"
"$SIM_BIN" run --server "$TENON_SERVER" --creds "$work/creds.txt" --checkin-rate off --report-rate max \
  --report-count "$DEVICES" --duration 30m --json >"$work/first.json"

interval=$(python3 -c "import re,sys; r=float(re.match(r'([0-9.]+)', sys.argv[2]).group(1)); print(f'{int(sys.argv[1]) / r:.3f}')" "$DEVICES" "$CHECKIN_RATE")
echo "== fleet running: check-ins $CHECKIN_RATE (each device every $interval s), reports $REPORT_RATE; warm-up $interval s"
"$SIM_BIN" run --server "$TENON_SERVER" --creds "$work/creds.txt" --duration "$RUN_MAX" --warmup "${interval}s" \
  --checkin-rate "$CHECKIN_RATE" --report-rate "$REPORT_RATE" --watch-change --stop-when-changed --json \
  >"$work/run.json" 2>"$work/run.err" &
sim_pid=$!
for _ in $(seq 100); do grep -q '^fleetsim: running' "$work/run.err" 2>/dev/null && break; sleep 0.1; done

# Admin writes that re-sign nothing, every ADMIN_PERIOD, each timed: "start end ok".
(
  i=0
  while [ ! -e "$work/stop" ]; do
    i=$((i + 1)); s=$(now); ok=0
    out=$("$CTL_BIN" settings set --group BenchIdle Custom.Bench "$i" 2>/dev/null) || true
    case "$out" in "set Custom.Bench;"*) ok=1 ;; esac
    echo "$s $(now) $ok" >>"$work/admin.log"
    sleep "$ADMIN_PERIOD"
  done
) &
admin_pid=$!
# The re-sign progress, when the server has it: "time JSON" every 50 ms.
resign_api=0
if curl -sf -H "Authorization: Bearer $TENON_TOKEN" "$TENON_SERVER/api/v1/admin/resign" >/dev/null; then
  resign_api=1
  (
    while [ ! -e "$work/stop" ]; do
      echo "$(now) $(curl -s -H "Authorization: Bearer $TENON_TOKEN" "$TENON_SERVER/api/v1/admin/resign")" >>"$work/resign.log"
      sleep 0.05
    done
  ) &
  poll_pid=$!
fi
wait_flag=""
case "$("$CTL_BIN" settings set --help)" in *--wait*) wait_flag=--wait ;; esac

# Every device holds its envelope once the warm-up is over; a few admin writes before the change.
sleep "$(python3 -c "print(float('$interval') + 3)")"
echo "== the change: tenonctl settings set --tenant Custom.Bench 1${wait_flag:+ $wait_flag}"
kill -USR1 "$sim_pid"
t0=$(now)
"$CTL_BIN" --json settings set --tenant Custom.Bench 1 $wait_flag >"$work/change.out" 2>"$work/change.err"
t1=$(now)
gen=$(python3 - "$work/change.out" <<'PY'
import json, sys
text, dec, i, gen = open(sys.argv[1]).read(), json.JSONDecoder(), 0, ""
while (i := text.find("{", i)) >= 0:
    try:
        v, end = dec.raw_decode(text, i)
    except ValueError:
        i += 1; continue
    if isinstance(v, dict) and v.get("resign_generation") is not None:
        gen = v["resign_generation"]
    i = end
print(gen)
PY
)
t_done=$t1
if [ -z "$wait_flag" ] && [ "$resign_api" = 1 ] && [ -n "$gen" ]; then
  # No --wait here: wait for the generation by polling, as --wait would.
  while :; do
    c=$(curl -s -H "Authorization: Bearer $TENON_TOKEN" "$TENON_SERVER/api/v1/admin/resign" | python3 -c "import json,sys; print(json.load(sys.stdin).get('completed_generation', -1))")
    [ "$c" -ge "$gen" ] && break
    sleep 0.05
  done
  t_done=$(now)
fi
kill -USR2 "$sim_pid"
echo "   re-signed after $(python3 -c "print(f'{$t_done - $t0:.2f}')") s; waiting for every device to fetch its new envelope"
sim_rc=0
wait "$sim_pid" || sim_rc=$?
sim_pid=""
touch "$work/stop"
wait "$admin_pid" 2>/dev/null || true
admin_pid=""
[ -n "${poll_pid:-}" ] && { wait "$poll_pid" 2>/dev/null || true; poll_pid=""; }
[ "$sim_rc" = 0 ] || { echo "tenon-fleetsim run failed ($sim_rc):"; cat "$work/run.err"; exit 1; }
rss=$(rss "$server_pid")

python3 - "$work" "$t0" "$t1" "$t_done" "$gen" "$wait_flag" "$resign_api" "$DEVICES" "$rss" <<'PY'
import json, math, os, sys
work, t0, t1, t_done, gen, wait_flag, resign_api, devices, rss = sys.argv[1:]
t0, t1, t_done = float(t0), float(t1), float(t_done)
enroll, first, run = (json.load(open(os.path.join(work, f))) for f in ("enroll.json", "first.json", "run.json"))
change_text = open(os.path.join(work, "change.out")).read()
def pct(v, q):  # nearest rank
    v = sorted(v)
    return v[max(0, math.ceil(q * len(v)) - 1)]
def counts(d): return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"
print()
print(f"fleet: {devices} devices, enrolled at {enroll['rate_per_s']:.0f}/s ({enroll['seconds']:.1f} s); first reports {first['kinds']['report']['rate_per_s']:.0f}/s")
# The write's answer among whatever else tenonctl printed (--wait's progress): every JSON object in it.
objects, dec, i = [], json.JSONDecoder(), 0
while (i := change_text.find("{", i)) >= 0:
    try:
        v, i = dec.raw_decode(change_text, i)
        objects.append(v)
    except ValueError:
        i += 1
resigned = next((o.get("devices_to_resign", o.get("devices_updated")) for o in objects
                 if isinstance(o, dict) and ("devices_to_resign" in o or "devices_updated" in o)), None)
print(f"tenant-wide write: tenonctl settings set --tenant Custom.Bench 1{' ' + wait_flag if wait_flag else ''} returned after {t1 - t0:.2f} s"
      + (f" (devices to re-sign / re-signed: {resigned})" if resigned is not None else ""))
if wait_flag:
    print(f"every device re-signed (from --wait): {t_done - t0:.2f} s")
elif not (resign_api == "1" and gen):
    print(f"every device re-signed: {t1 - t0:.2f} s (this server has neither --wait nor GET /api/v1/admin/resign: it re-signs inside the write, which returned after that time)")
if resign_api == "1" and gen and os.path.exists(os.path.join(work, "resign.log")):
    for line in open(os.path.join(work, "resign.log")):
        t, _, body = line.partition(" ")
        try:
            s = json.loads(body)
        except ValueError:
            continue
        if float(t) >= t0 and s.get("completed_generation", -1) >= int(gen):
            print(f"every device re-signed (GET /api/v1/admin/resign polled every 50 ms, first completed_generation >= {gen}): {float(t) - t0:.2f} s")
            break
ch = run["change"]
print(f"every device fetched its new envelope: {ch['all_s'] if ch['all_s'] is not None else 'not all'} s after the mark"
      f" ({ch['changed']} of {ch['devices_with_envelope_at_mark']} devices; first {ch['first_s']} s, p50 {ch['p50_s']} s, p99 {ch['p99_s']} s; check-in interval {run['checkin_interval_s']} s)")
w = run["change_window"]
for name in ("report", "checkin"):
    k, a = w["kinds"].get(name), run["kinds"][name]
    if k:
        print(f"{name} during the change ({w['seconds']:.2f} s): {k['count']} at {k['rate_per_s']:.0f}/s, p50 {k['latency_ms']['p50']:.2f} ms, p99 {k['latency_ms']['p99']:.2f} ms, max {k['latency_ms']['max']:.1f} ms; statuses: {counts(k['statuses'])}")
    print(f"{name} over the whole run ({run['seconds']:.1f} s): {a['count']} at {a['rate_per_s']:.0f}/s, p50 {a['latency_ms']['p50']:.2f} ms, p99 {a['latency_ms']['p99']:.2f} ms, max {a['latency_ms']['max']:.1f} ms; errors: {counts(a['errors'])}; unsent {a['unsent']}")
writes = [tuple(map(float, l.split())) for l in open(os.path.join(work, "admin.log")) if l.strip()]
before = [(e - s) * 1000 for s, e, ok in writes if e < t0]
during = [(e - s) * 1000 for s, e, ok in writes if s < t_done and e > t0]
failed = sum(1 for *_, ok in writes if not ok)
def show(label, v):
    if v:
        print(f"admin writes (settings set --group BenchIdle) {label}: {len(v)}, p50 {pct(v, .5):.0f} ms, p99 {pct(v, .99):.0f} ms, max {max(v):.0f} ms")
    else:
        print(f"admin writes {label}: none")
show("before the change", before)
show("during the change", during)
print(f"tenon-server resident memory with {devices} devices: {rss}")
bad = [(name, k["errors"]) for doc in (enroll, first, run) for name, k in doc["kinds"].items() if k["errors_total"]]
if enroll["enrolled"] != enroll["devices_requested"] or bad or failed or not writes:
    print(f"FAILED: answers other than the API's ({bad}), {failed} failed admin writes, or devices not enrolled; the figures above do not count")
    sys.exit(1)
PY

# Cold start: the same data dir restarted; the time until a device's check-in is served (not 503
# "starting") and until the server's "listening" line (the fleet loaded).
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
cred=$(head -n 1 "$work/creds.txt" | cut -d' ' -f2)
t_start=$(now)
# shellcheck disable=SC2086 # SERVER_ARGS is a list of options
"$SERVER_BIN" serve --listen 127.0.0.1:$port --data-dir "$work/data" ${SERVER_ARGS:-} >"$work/server2.out" 2>>"$work/server.err" &
server_pid=$!
first_answer="" served=""
for _ in $(seq 3000); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $cred" "http://127.0.0.1:$port/api/v1/device/config" || true)
  [ -z "$first_answer" ] && [ "$code" != 000 ] && first_answer=$(now)
  if [ "$code" = 200 ]; then served=$(now); break; fi
  sleep 0.01
done
python3 -c "import sys; s,a,b=map(float,sys.argv[1:]); print(f'cold start with $DEVICES devices: port answering after {a-s:.2f} s, check-ins served after {b-s:.2f} s')" \
  "$t_start" "${first_answer:-0}" "${served:-0}"
