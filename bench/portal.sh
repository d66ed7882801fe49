#!/usr/bin/env bash
# The web portal at N enrolled devices (default 100,000): server time of the overview and of the
# device list (first page, filtered, searched by host name and by user, a deep page) and the page
# weight of the device list, against issue 17's budget (p99 < 100 ms, < 100 KB).
#
#   bench/portal.sh [DEVICES]      e.g. bench/portal.sh 100000; bench/portal.sh 2000
#
# The setup: a release tenon-server on SQLite with the bench limits (BENCH_SERVER_LIMITS) and
# --metrics-listen; USERS users (default 5000) imported from a JSON file (`tenonctl users import`,
# userN@contoso.com with a display name); DEVICES devices enrolled with `tenon-fleetsim enroll`;
# one report per device for REPORTED percent of them (default 90; `tenon-fleetsim run
# --report-count`, signed-in users spread with `--users USERS`, so each user is the primary user
# of about DEVICES/USERS devices and the rest have none), so the devices have host names, users
# and policy states.
# Then bench/portal_client.py (Python stdlib) signs in over HTTP (POST /signin with the admin
# token from DATA_DIR/admin.token in the form body, never on a command line) and, for each page,
# sends WARMUP (default 20) unmeasured then REQUESTS (default 300) measured GETs on one keep-alive
# connection. Latency is measured at the client on loopback: it includes the client and the
# loopback, so it bounds the server's time from above. Beside it, the server's own per-route
# histogram (tenon_http_request_duration_seconds, buckets ... 50, 100, 250 ms ...) over the same
# requests: the bucket that holds p99 and the share of requests under 100 ms. Page weight: the
# HTML of /devices plus the stylesheet and scripts it references (a first visit; no compression
# is offered by the server, so bytes on the wire are these).
# SERVER_ARGS are added to the server's flags; SERVER_BIN/CTL_BIN/SIM_BIN (with SKIP_BUILD=1)
# measure other builds. Every address is on loopback. Needs python3. Prints the figures with
# PASS/OVER against the budget; exits 0 either way, unless the server or the setup failed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-100000}
USERS=${USERS:-5000}
REPORTED=${REPORTED:-90}
REQUESTS=${REQUESTS:-300}
WARMUP=${WARMUP:-20}
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
  stop_server "${server_pid:-}"
  rm -rf "$work"
}
trap cleanup EXIT

port=$(free_port)
mport=$(free_port)
# shellcheck disable=SC2086 # the limits and SERVER_ARGS are lists of options
start_server server_pid "$work/server" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" \
  --data-dir "$work/data" $BENCH_SERVER_LIMITS ${SERVER_ARGS:-}
export TENON_SERVER=http://127.0.0.1:$port TENON_TOKEN_FILE=$work/data/admin.token

echo "== importing $USERS users (user1..user$USERS@contoso.com)"
python3 - "$USERS" >"$work/users.json" <<'PY'
import json, sys
n = int(sys.argv[1])
json.dump([{"userPrincipalName": f"user{i}@contoso.com", "displayName": f"Bench User {i}",
            "groups": [f"Bench-{i % 10}"]} for i in range(1, n + 1)], sys.stdout)
PY
"$CTL_BIN" users import "$work/users.json" >/dev/null
token=$("$CTL_BIN" enroll-token create --uses "$DEVICES" --ttl 2h)

echo "== enrolling $DEVICES devices (tenon-fleetsim enroll)"
"$SIM_BIN" enroll --server "$TENON_SERVER" --token "$token" --devices "$DEVICES" --out "$work/creds.txt" --json >"$work/enroll.json"
reports=$((DEVICES * REPORTED / 100))
echo "== one report for $reports devices ($REPORTED%), users spread over $USERS (their first report sets the primary user)"
"$SIM_BIN" run --server "$TENON_SERVER" --creds "$work/creds.txt" --checkin-rate off --report-rate max \
  --report-count "$reports" --users "$USERS" --duration 30m --json >"$work/first.json"

# Device N (from 1) is SIM-0000N and signs in as user{((N-1) mod USERS) + 1}: pick one in the middle.
mid=$((DEVICES / 2 < reports ? DEVICES / 2 : reports / 2))
host=$(printf 'SIM-%05d' "$mid")
user="user$(((mid - 1) % USERS + 1))@contoso.com"
deep=$((DEVICES / 50 / 4 > 1 ? DEVICES / 50 / 4 : 1))
[ "$deep" -gt 500 ] && deep=500
q() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }

echo "== measuring: $WARMUP warm-up then $REQUESTS requests per page, one keep-alive connection"
python3 bench/portal_client.py 127.0.0.1 "$port" "$TENON_TOKEN_FILE" "$mport" "$REQUESTS" "$WARMUP" "$work/portal.json" \
  "overview=/" \
  "devices, first page=/devices" \
  "filter without-primary=/devices?filter=without-primary" \
  "filter seen-24h=/devices?filter=seen-24h&sort=last_seen&dir=desc" \
  "search host name $host=/devices?q=$(q "$host")" \
  "search user $user=/devices?q=$(q "$user")" \
  "search no match=/devices?q=nobody-here" \
  "page $deep=/devices?page=$deep"
kill -0 "$server_pid" || { echo "tenon-server died during the measurement"; exit 1; }
rss=$(rss "$server_pid")

python3 - "$work" "$DEVICES" "$rss" "$(nproc)" <<'PY'
import json, os, sys
work, devices, rss, cpus = sys.argv[1:]
enroll, first, res = (json.load(open(os.path.join(work, f))) for f in ("enroll.json", "first.json", "portal.json"))
budget_ms, budget_kb = 100.0, 100.0
print()
print(f"fleet: {devices} devices, enrolled at {enroll['rate_per_s']:.0f}/s; "
      f"{first['kinds']['report']['count']} first reports at {first['kinds']['report']['rate_per_s']:.0f}/s; "
      f"{cpus} CPUs; tenon-server resident memory {rss}")
print("latency at the client on loopback (an upper bound of the server's time), ms; "
      "server: its own histogram over the same requests")
print(f"{'page':<44} {'matched':>8} {'KB':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  {'server p99':>11} {'<100ms':>7}  budget")
for p in res["pages"]:
    s = p["server"] or {}
    sp99 = s.get("p99_at_most_ms")
    share = s.get("share_under_100ms")
    verdict = "PASS" if p["p99_ms"] < budget_ms else (
        "PASS (server)" if share is not None and share >= 0.99 else "OVER")
    print(f"{p['name']:<44} {(p['matched'] or '-') if p['path'] != '/' else '-':>8} {p['bytes'] / 1024:>6.1f} "
          f"{p['p50_ms']:>7.1f} {p['p90_ms']:>7.1f} {p['p99_ms']:>7.1f} {p['max_ms']:>7.1f}  "
          f"{('<= ' + format(sp99, 'g')) if sp99 is not None else '-':>11} "
          f"{(format(share * 100, '.1f') + '%') if share is not None else '-':>7}  {verdict}")
w = res["weight"]
kb = w["total"] / 1024
parts = ", ".join(f"{a['path']} {a['bytes'] / 1024:.1f} KB" for a in w["assets"])
print(f"page weight of /devices (first visit, uncompressed): {kb:.1f} KB = HTML {w['html'] / 1024:.1f} KB + {parts}; "
      f"budget {budget_kb:.0f} KB: {'PASS' if kb < budget_kb else 'OVER'}")
bad = [(doc, name, k["errors"]) for doc, d in (("enroll", enroll), ("first", first))
       for name, k in d["kinds"].items() if k["errors_total"]]
if enroll["enrolled"] != enroll["devices_requested"] or bad:
    print(f"FAILED: devices not enrolled or answers other than the API's ({bad}); the figures above do not count")
    sys.exit(1)
PY
