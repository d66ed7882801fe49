#!/usr/bin/env bash
# The figures for scaling out: the same fleet of N devices (default 100,000) against
#   (a) one tenon-server on SQLite,
#   (b) two tenon-servers on one PostgreSQL (each its own data dir holding the same keys and admin
#       token, copied from the first), fleetsim round robin over both URLs,
#   (c) the same two behind haproxy (roundrobin, http mode, keep-alive) when haproxy is installed,
# printed side by side: enrollment time and rate; check-ins at one per device every INTERVAL
# (default 30 s, so N/30 per second) with the contract's default reports and user changes beside
# them: achieved rate, p50/p99/max, errors by kind, against the goal (rate held, p99 < 20 ms); a
# tenant-wide setting change (`tenonctl settings set --tenant Custom.Bench N --wait`, a Custom key
# compiled into every device's payload): time until re-signed and until every device fetched its
# new envelope; each server's resident memory with N devices.
#
#   bench/scale.sh [DEVICES] [DURATION]      e.g. bench/scale.sh 100000 60s; bench/scale.sh 2000 20s
#
# All device load comes from tenon-fleetsim's top-level form. Per column: (1) `tenon-fleetsim
# --token T --devices N --interval INTERVAL --warmup INTERVAL --duration DURATION` enrolls the
# fleet, runs one interval unmeasured (every device fetches its envelope) and measures DURATION of
# the steady state; the servers' RSS is read right after. (2) `tenon-fleetsim --creds` with reports
# and user changes off (so that only the tenant change moves a device's ETag) and --watch-change:
# after its warm-up of one interval, SIGUSR1, the tenant write with --wait, SIGUSR2; it ends when
# every device got a 200 with a new ETag (at most RUN_MAX, default 5m). Columns run one after the
# other, each server stopped before the next column starts.
# PostgreSQL: `scripts/pg-cluster start DIR` (prints postgres://postgres@127.0.0.1:PORT; `stop DIR`
# removes it) and database tenon_bench made with psql. A column that cannot run (no
# scripts/pg-cluster, a tenon-server without PostgreSQL, no haproxy) is skipped with its reason.
# INTERVAL, RUN_MAX, SERVER_ARGS (added to every server's flags) and SERVER_BIN/CTL_BIN/SIM_BIN
# (with SKIP_BUILD=1) change the setup. Every address is on loopback. Needs python3 and psql.
# Prints the figures; nothing is asserted except that every answer was one the API gives.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-100000}
DURATION=${2:-60s}
INTERVAL=${INTERVAL:-30s}
RUN_MAX=${RUN_MAX:-5m}
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_bins
bench_build
work=$(mktemp -d)
pids=()
pg_dir=""
cleanup() {
  rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "$pg_dir" ] && scripts/pg-cluster stop "$pg_dir" >/dev/null 2>&1 || true
  [ "$rc" -ne 0 ] && echo "failed (exit $rc); logs were in $work"
  rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
skip() { echo "$2" >"$work/$1.skipped"; echo "   ($1) skipped: $2"; }

# One column: NAME "URL[,URL...]" ADMIN_URL ADMIN_TOKEN_FILE CREDS PID... (the servers, for their
# RSS). CREDS empty: enroll the fleet (into NAME/creds.txt); else the devices enrolled before.
measure() {
  local name=$1 urls=$2 admin=$3 token_file=$4 creds=$5 d="$work/$1" token sim_pid interval_s i p fleet
  shift 5
  mkdir -p "$d"
  export TENON_SERVER=$admin TENON_TOKEN_FILE=$token_file
  if [ -z "$creds" ]; then
    token=$("$CTL_BIN" enroll-token create --uses "$DEVICES" --ttl 2h)
    fleet=(--token "$token" --out "$d/creds.txt")
    creds="$d/creds.txt"
    echo "   ($name) enrolling $DEVICES devices, then check-ins every $INTERVAL: one interval's warm-up, $DURATION measured"
  else
    fleet=(--creds "$creds")
    echo "   ($name) the devices enrolled before, check-ins every $INTERVAL: one interval's warm-up, $DURATION measured"
  fi
  "$SIM_BIN" --server "$urls" --devices "$DEVICES" --interval "$INTERVAL" --warmup "$INTERVAL" --duration "$DURATION" \
    "${fleet[@]}" --json >"$d/steady.json" 2>"$d/steady.err" || {
    echo "   ($name) tenon-fleetsim failed:"; tail -n 3 "$d/steady.err"; return 1
  }
  i=0
  for p in "$@"; do i=$((i + 1)); echo "$(rss "$p")" >"$d/rss.$i"; done
  echo "   ($name) the tenant change (Custom.Bench) with the fleet checking in every $INTERVAL, reports and user changes off"
  "$SIM_BIN" --server "$urls" --devices "$DEVICES" --interval "$INTERVAL" --warmup "$INTERVAL" --duration "$RUN_MAX" \
    --creds "$creds" --report-rate off --user-change-rate off --watch-change --stop-when-changed --json \
    >"$d/change.json" 2>"$d/change.err" &
  sim_pid=$!
  pids+=("$sim_pid")
  for _ in $(seq 600); do grep -q '^fleetsim: running' "$d/change.err" 2>/dev/null && break; sleep 0.1; done
  interval_s=$(python3 -c "import re,sys; m=re.fullmatch(r'([0-9.]+)(ms|s|m|h)?', sys.argv[1]); print(float(m.group(1)) * {'ms': .001, None: 1, 's': 1, 'm': 60, 'h': 3600}[m.group(2)])" "$INTERVAL")
  # Every device holds its envelope once the warm-up is over.
  sleep "$(python3 -c "print($interval_s + 2)")"
  kill -USR1 "$sim_pid"
  local t0 t1
  t0=$(now)
  "$CTL_BIN" --json settings set --tenant Custom.Bench "$RANDOM" --wait >"$d/write.out" 2>"$d/write.err" || {
    echo "   ($name) the tenant write failed:"; tail -n 3 "$d/write.err"
  }
  t1=$(now)
  kill -USR2 "$sim_pid" 2>/dev/null || true  # gone already: every device had it before --wait returned
  python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1" >"$d/resigned_s"
  wait "$sim_pid" || { echo "   ($name) tenon-fleetsim (change) failed:"; tail -n 3 "$d/change.err"; }
}

echo "== $DEVICES devices, check-ins every $INTERVAL, $DURATION measured per column"
echo "== (a) one tenon-server on SQLite"
port=$(free_port)
# shellcheck disable=SC2086 # the limits and SERVER_ARGS are lists of options
start_server a_pid "$work/a-server" --listen "127.0.0.1:$port" --data-dir "$work/a-data" $BENCH_SERVER_LIMITS ${SERVER_ARGS:-}
pids+=("$a_pid")
measure a "http://127.0.0.1:$port" "http://127.0.0.1:$port" "$work/a-data/admin.token" "" "$a_pid" || echo "(a) failed" >"$work/a.skipped"
stop_server "$a_pid"

echo "== (b) two tenon-servers on one PostgreSQL"
pg_ok=""
if [ ! -x scripts/pg-cluster ]; then
  skip b "scripts/pg-cluster is not in this tree"
else
  # Its own directory, not under $work (mode 0700): the cluster may run as another user.
  pg_dir=$(mktemp -d)
  if pg_base=$(scripts/pg-cluster start "$pg_dir" 2>"$work/pg.err" | tail -n 1) && [ -n "$pg_base" ]; then
    if psql -q "$pg_base/postgres" -c "CREATE DATABASE tenon_bench" >/dev/null 2>>"$work/pg.err"; then
      pg_ok=1
    else
      skip b "psql could not create the database tenon_bench: $(tail -n 1 "$work/pg.err")"
    fi
  else
    skip b "scripts/pg-cluster start failed: $(tail -n 1 "$work/pg.err")"
  fi
fi
b_started=""
if [ -n "$pg_ok" ]; then
  db="$pg_base/tenon_bench"
  port1=$(free_port)
  # shellcheck disable=SC2086
  if start_server b1_pid "$work/b1-server" --listen "127.0.0.1:$port1" --data-dir "$work/b1-data" --database "$db" \
    $BENCH_SERVER_LIMITS ${SERVER_ARGS:-} 2>"$work/b1-start.err"; then
    pids+=("$b1_pid")
    # The second server: the first one's keys (root, signing, key lists, escrow) and admin token.
    mkdir -p "$work/b2-data"
    chmod 700 "$work/b2-data"
    cp -a "$work/b1-data/keys" "$work/b2-data/keys"
    cp -a "$work/b1-data/admin.token" "$work/b2-data/admin.token"
    port2=$(free_port)
    # shellcheck disable=SC2086
    if start_server b2_pid "$work/b2-server" --listen "127.0.0.1:$port2" --data-dir "$work/b2-data" --database "$db" \
      $BENCH_SERVER_LIMITS ${SERVER_ARGS:-} 2>"$work/b2-start.err"; then
      pids+=("$b2_pid")
      b_started=1
    else
      pids+=("$b2_pid")
      skip b "the second tenon-server did not start: $(grep -v '^tenon-server exited' "$work/b2-start.err" | tail -n 1)"
    fi
  else
    pids+=("$b1_pid")
    skip b "tenon-server did not start on PostgreSQL: $(grep -v '^tenon-server exited' "$work/b1-start.err" | tail -n 1)"
  fi
fi
if [ -n "$b_started" ]; then
  measure b "http://127.0.0.1:$port1,http://127.0.0.1:$port2" "http://127.0.0.1:$port1" "$work/b1-data/admin.token" "" \
    "$b1_pid" "$b2_pid" || echo "(b) failed" >"$work/b.skipped"
fi

echo "== (c) the two PostgreSQL servers behind haproxy"
if ! command -v haproxy >/dev/null; then
  skip c "haproxy is not installed"
elif [ -z "$b_started" ]; then
  skip c "needs the two servers of (b)"
else
  # (b)'s fleet again (enrolling another would double the database's devices): no enrollment row.
  hport=$(free_port)
  cat >"$work/haproxy.cfg" <<EOF
global
  maxconn 20000
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
frontend tenon
  bind 127.0.0.1:$hport
  default_backend servers
backend servers
  balance roundrobin
  server s1 127.0.0.1:$port1
  server s2 127.0.0.1:$port2
EOF
  haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
  h_pid=$!
  pids+=("$h_pid")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$hport/healthz" >/dev/null && break; sleep 0.1; done
  measure c "http://127.0.0.1:$hport" "http://127.0.0.1:$port1" "$work/b1-data/admin.token" "$work/b/creds.txt" \
    "$b1_pid" "$b2_pid" ||
    echo "(c) failed" >"$work/c.skipped"
  kill "$h_pid" 2>/dev/null || true
fi
[ -n "$b_started" ] && { stop_server "$b1_pid"; stop_server "$b2_pid"; }

python3 - "$work" "$DEVICES" "$INTERVAL" "$DURATION" <<'PY'
import json, os, re, sys
work, devices, interval, duration = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
m = re.fullmatch(r"([0-9.]+)(ms|s|m|h)?", interval)
goal = devices / (float(m.group(1)) * {"ms": .001, None: 1, "s": 1, "m": 60, "h": 3600}[m.group(2)])
cols = [("a", "(a) 1 server, SQLite"), ("b", "(b) 2 servers, 1 PostgreSQL"), ("c", "(c) (b) behind haproxy")]
def load(c, f):
    try:
        return json.load(open(os.path.join(work, c, f)))
    except (OSError, ValueError):
        return None
def counts(d): return ",".join(f"{k}:{v}" for k, v in d.items()) or "none"
rows, notes, failed = {}, [], []
for c, title in cols:
    r = rows[c] = {}
    skipped = os.path.join(work, f"{c}.skipped")
    if os.path.exists(skipped):
        r["enroll"] = "skipped"
        notes.append(f"{title}: skipped: {open(skipped).read().strip()}")
        continue
    s, ch = load(c, "steady.json"), load(c, "change.json")
    e = s and s.get("enrollment")
    if e:
        r["enroll"] = f"{e['seconds']:.1f} s = {e['rate_per_s']:.0f}/s"
        if e["enrolled"] != e["devices_requested"]:
            r["enroll"] = f"{e['enrolled']} only; " + r["enroll"]
        if e["kinds"]["enroll"]["errors_total"]:
            failed.append((c, "enroll", e["kinds"]["enroll"]["errors"]))
    elif s:
        r["enroll"] = "(b)'s devices"
    k = s and (s.get("kinds") or {}).get("checkin")
    if k:
        l = k["latency_ms"]
        # Held: every check-in due was sent and answered as the API answers (open loop: a slow
        # server shows as unsent or as latency); the rate of a window shorter than an interval
        # varies with the jitter by a few per cent.
        held = k["unsent"] == 0 and k["errors_total"] == 0 and k["rate_per_s"] >= 0.95 * goal
        r["rate"] = f"{k['rate_per_s']:.0f}/s {'held' if held else 'NOT held'}"
        r["p50"] = f"{l['p50']:.2f} ms"
        r["p99"] = f"{l['p99']:.2f} ms {'ok' if l['p99'] < 20 else 'OVER'}"
        r["max"] = f"{l['max']:.1f} ms"
        r["err"] = counts(k["errors"]) + (f" unsent:{k['unsent']}" if k["unsent"] else "")
        r["statuses"] = counts(k["statuses"])
        for name, key in (("report", "reports"), ("user_change", "users")):
            o = s["kinds"].get(name)
            if o:
                r[key] = f"{o['rate_per_s']:.1f}/s p99 {o['latency_ms']['p99']:.1f} ms"
                if o["errors_total"]:
                    r[key] += f" err {counts(o['errors'])}"
        failed += [(c, n, v["errors"]) for n, v in s["kinds"].items() if v["errors_total"]]
    else:
        r["rate"] = "no figures"
        notes.append(f"{title}: the steady-state run gave no figures (tenon-fleetsim failed)")
    p = os.path.join(work, c, "resigned_s")
    if os.path.exists(p):
        r["resign"] = f"{float(open(p).read()):.2f} s"
    x = ch and ch.get("change")
    if x:
        if x["all_s"] is not None:
            r["prop"] = f"{x['all_s']:.2f} s"
        else:
            r["prop"] = f"not all: {x['changed']}/{x['devices_with_envelope_at_mark']}"
        r["prop50"] = f"{x['p50_s']} s / {x['p99_s']} s"
        failed += [(c, "change " + n, v["errors"]) for n, v in ch["kinds"].items() if v["errors_total"]]
    elif os.path.exists(os.path.join(work, c)):
        notes.append(f"{title}: the change run gave no figures")
    rss, i = [], 1
    while os.path.exists(os.path.join(work, c, f"rss.{i}")):
        rss.append(open(os.path.join(work, c, f"rss.{i}")).read().strip())
        i += 1
    if rss:
        r["rss"] = " + ".join(rss)
labels = [
    ("enroll", f"enrollment of {devices}: time = rate"),
    ("rate", f"check-ins (goal {goal:.0f}/s held)"),
    ("p50", "  p50"),
    ("p99", "  p99 (goal < 20 ms)"),
    ("max", "  max"),
    ("err", "  errors by kind"),
    ("statuses", "  statuses"),
    ("reports", "  changed reports beside"),
    ("users", "  user changes beside"),
    ("resign", "tenant change: re-signed (--wait)"),
    ("prop", "  every device has it"),
    ("prop50", "  p50 / p99 of the devices"),
    ("rss", f"server RSS with {devices} devices"),
]
w0 = max(len(l) for _, l in labels)
w = [max([len(t)] + [len(rows[c].get(k, "-")) for k, _ in labels]) for c, t in cols]
print()
print(f"scale-out: {devices} devices, check-ins every {interval} ({goal:.0f}/s), {duration} measured")
print(f"{'':<{w0}}  " + "  ".join(f"{t:<{w[i]}}" for i, (_, t) in enumerate(cols)))
for key, label in labels:
    print(f"{label:<{w0}}  " + "  ".join(f"{rows[c].get(key, '-'):<{w[i]}}" for i, (c, _) in enumerate(cols)))
for n in notes:
    print(n)
if failed:
    print(f"FAILED: answers other than the API's: {failed}; the figures above do not count")
    sys.exit(1)
PY
