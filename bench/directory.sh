#!/usr/bin/env bash
# Figures for directory sync from Microsoft Graph (issue 16), release builds on loopback:
#   1. a full sync of USERS users in GROUPS groups from the Graph-shaped fake
#      (crates/tenon-server/examples/graph_fake_server.rs: Graph's paging, 100 objects a page):
#      time, and the server's resident memory before, at its peak (VmHWM) and after;
#   2. DEVICES devices (tenon-fleetsim) whose primary users are users 0..DEVICES-1, then CHANGED
#      users' department changed in the fake and an incremental sync: time, users changed and
#      devices re-signed.
#
#   bench/directory.sh [USERS] [GROUPS] [CHANGED] [DEVICES]     e.g. bench/directory.sh 100000 1000 100 1000
#
# The Active Directory figures come from bench/directory-ldap.sh (Samba AD in a network namespace).
# Every address is on loopback; the work dir is in /tmp and removed at the end. Prints figures and
# asserts only that the syncs succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${1:-100000}
NGROUPS=${2:-1000}
CHANGED=${3:-100}
DEVICES=${4:-1000}
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_bins
FAKE_BIN=$TARGET/release/examples/graph_fake_server
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -q -p tenon-server -p tenonctl --example graph_fake_server
  cargo build --release -q -p tenon-fleetsim
fi
work=$(mktemp -d /tmp/tenon-bench-directory.XXXXXX)
server=""
fake=""
cleanup() {
  stop_server "$server"
  exec 3>&- 2>/dev/null || true
  [ -n "$fake" ] && { kill "$fake" 2>/dev/null || true; wait "$fake" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT

echo "== the Graph fake: $USERS users in $NGROUPS groups"
mkfifo "$work/fake.in"
"$FAKE_BIN" --users "$USERS" --groups "$NGROUPS" --listen 127.0.0.1:0 --secret-file "$work/entra.secret" \
  <"$work/fake.in" >"$work/fake.out" 2>"$work/fake.err" &
fake=$!
exec 3>"$work/fake.in"
for _ in $(seq 600); do [ -s "$work/fake.out" ] && break; sleep 0.1; done
field() { python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())[sys.argv[2]])' "$work/fake.out" "$1"; }
graph_url=$(field url)
chmod 600 "$work/entra.secret"

# shellcheck disable=SC2086 # the limits are a list of options
start_server server "$work/server" --listen 127.0.0.1:0 --data-dir "$work/data" $BENCH_SERVER_LIMITS
url=$(grep -o 'http://[0-9.:]*' "$work/server.out" | head -1)
export TENON_SERVER=$url TENON_TOKEN_FILE=$work/data/admin.token
ctl() { "$CTL_BIN" "$@"; }
idle=$(rss "$server")

echo "== 1. full sync"
# A long interval: the server's own first read is the one measured.
ctl directory add graph entra --tenant-id "$(field tenant_id)" --client-id "$(field client_id)" \
  --client-secret-file "$work/entra.secret" --authority "$graph_url" --graph-url "$graph_url" --interval 24h >/dev/null
start=$(date +%s.%N)
# The server starts its first read when the source is added; `directory sync` waits for it to end
# and then reads the (empty) delta, so the time below covers the whole full read.
ctl --json directory sync entra >"$work/sync1.json" 2>"$work/sync1.err" || { cat "$work/sync1.err" >&2; tail -5 "$work/server.err" >&2; exit 1; }
end=$(date +%s.%N)
full_s=$(echo "$end - $start" | bc)
peak=$(awk '/VmHWM/ {print $2 " " $3}' "/proc/$server/status")
after=$(rss "$server")
users=$(ctl --json directory status | python3 -c 'import json,sys; print([s for s in json.load(sys.stdin) if s["name"]=="entra"][0]["users"])')

echo "== 2. $DEVICES devices, primary users user0..user$((DEVICES - 1))"
token=$(ctl enroll-token create --uses "$DEVICES" --ttl 2h)
"$SIM_BIN" enroll --server "$url" --token "$token" --devices "$DEVICES" --out "$work/creds.txt" --json >/dev/null
i=0
while read -r id _; do
  ctl devices set-primary "$id" "user$i@contoso.example" >/dev/null
  i=$((i + 1))
done <"$work/creds.txt"

echo "== 3. $CHANGED users change department; incremental sync"
echo "change $CHANGED" >&3
for _ in $(seq 300); do grep -q '^changed' "$work/fake.out" && break; sleep 0.1; done
start=$(date +%s.%N)
ctl --json directory sync entra >"$work/sync2.json" 2>"$work/sync2.err" || { cat "$work/sync2.err" >&2; exit 1; }
end=$(date +%s.%N)
delta_s=$(echo "$end - $start" | bc)
read -r changed resigned kind < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["users_changed"], r["devices_resigned"], r["read"])' "$work/sync2.json")

echo
echo "directory sync from Graph (fake on loopback, release build, $(nproc) cores)"
printf '  full sync of %s users in %s groups: %.1f s\n' "$users" "$NGROUPS" "$full_s"
echo "  server RSS: idle $idle, peak $peak (VmHWM), after the sync $after"
printf '  incremental sync (%s read) after %s users changed: %.2f s, %s users changed, %s devices re-signed (of %s)\n' \
  "$kind" "$CHANGED" "$delta_s" "$changed" "$resigned" "$DEVICES"
