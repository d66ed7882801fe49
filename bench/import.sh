#!/usr/bin/env bash
# Server memory across repeated directory imports: generates USERS Graph-shaped users (default
# 100,000, about 27 MB of JSON, 9 attributes and 2 groups each), imports the same file ROUNDS times
# (default 4) and prints the server's resident size (VmRSS) before and after each import, the
# import's wall time, and the growth of each later import over the first. Also prints the cold
# start: a restart with everything stored, time until /healthz answers 200.
#
#   bench/import.sh [USERS] [ROUNDS]
#
# Needs python3. Every address is loopback. SERVER_BIN/CTL_BIN (with SKIP_BUILD=1) measure other
# builds. Prints the figures; nothing is asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${1:-100000}
ROUNDS=${2:-4}
SERVER_BIN=${SERVER_BIN:-target/release/tenon-server}
CTL_BIN=${CTL_BIN:-target/release/tenonctl}
if [ -z "${SKIP_BUILD:-}" ]; then cargo build --release -q -p tenon-server -p tenonctl; fi
work=$(mktemp -d)
cleanup() {
  [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

python3 - "$USERS" "$work/users.json" <<'PY'
import json, sys
n, out = int(sys.argv[1]), sys.argv[2]
users = [{"userPrincipalName": f"user{i:06d}@contoso.com", "id": f"00000000-0000-4000-8000-{i:012d}",
          "displayName": f"User {i}", "givenName": "User", "surname": f"N{i}", "mail": f"user{i:06d}@contoso.com",
          "jobTitle": "Engineer", "department": f"Dept {i % 50}", "groups": ["Staff", f"Dept{i % 50}"]}
         for i in range(n)]
json.dump(users, open(out, "w"))
PY
echo "users file: $USERS users, $(( $(stat -c %s "$work/users.json") / 1024 / 1024 )) MB"

port=$((20000 + RANDOM % 20000))
start() {
  "$SERVER_BIN" serve --listen 127.0.0.1:$port --data-dir "$work/data" >>"$work/server.out" 2>>"$work/server.err" &
  server_pid=$!
}
rss() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$server_pid/status"; }
wait_healthy() {
  for _ in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/healthz")" = 200 ] && return 0
    sleep 0.01
  done
  echo "the server did not become healthy"; exit 1
}
start
wait_healthy
export TENON_SERVER=http://127.0.0.1:$port TENON_TOKEN_FILE=$work/data/admin.token
echo "idle RSS: $(rss) MB"
first=""
for round in $(seq "$ROUNDS"); do
  t0=$(date +%s.%N)
  "$CTL_BIN" users import "$work/users.json" >/dev/null
  t1=$(date +%s.%N)
  sleep 2
  r=$(rss)
  [ -z "$first" ] && first=$r
  growth=$(python3 -c "print(f'{($r-$first)/$first*100:+.1f}%')")
  printf 'import %d: %.1f s, RSS after %d MB (%s over the first)\n' "$round" "$(echo "$t1 - $t0" | bc)" "$r" "$growth"
done
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
t0=$(date +%s.%N)
start
wait_healthy
t1=$(date +%s.%N)
printf 'cold start with %d users: %.2f s to /healthz 200, RSS %d MB\n' "$USERS" "$(echo "$t1 - $t0" | bc)" "$(rss)"
