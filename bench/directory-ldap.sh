#!/usr/bin/env bash
# The Active Directory reader against a throwaway Samba AD DC (scripts/samba-ad): USERS users
# (default 5,000, added in bulk as LDIF, each with a department and a title) in 50 groups of
# USERS/50, then a full read, ROUNDS times CHANGED users' departments changed (default 100) and a
# delta read after each, both through crates/tenon-server/examples/ldap_read.rs over LDAPS; then the
# same through the real server: `tenonctl directory add ldap` and a timed `directory sync` (the full
# sync), CHANGED users changed and a timed incremental sync. Prints the figures; nothing is
# asserted.
#
#   bench/directory-ldap.sh [USERS] [CHANGED]
#
# Needs root and Samba (as scripts/samba-ad). The reader runs inside the DC's network namespace;
# every address is that namespace's loopback. BENCH_PROFILE=dev measures a debug build (faster to
# build; the DC's own work dominates either way); SKIP_BUILD=1 uses what is built.
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${1:-5000}
CHANGED=${2:-100}
PROFILE=${BENCH_PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-target}
if [ "$PROFILE" = release ]; then
  [ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p tenon-server -p tenonctl --example ldap_read
  BIN_DIR=$TARGET/release
else
  [ -n "${SKIP_BUILD:-}" ] || cargo build -q -p tenon-server -p tenonctl --example ldap_read
  BIN_DIR=$TARGET/debug
fi
READER=$BIN_DIR/examples/ldap_read
BIN_DIR=$(cd "$BIN_DIR" && pwd)
READER=$(cd "$(dirname "$READER")" && pwd)/$(basename "$READER")

work=$(mktemp -d)
dc=$work/dc
server=
cleanup() {
  [ -n "$server" ] && { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
  scripts/samba-ad stop "$dc" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Seconds since a `date +%s%N` reading, to the hundredth.
since() {
  local d=$(($(date +%s%N) - $1))
  printf '%d.%02d' $((d / 1000000000)) $((d / 10000000 % 100))
}

start=$(date +%s%N)
scripts/samba-ad start "$dc" >/dev/null
# shellcheck disable=SC1091
. "$dc/env"
echo "Samba AD DC provisioned and answering in $(since "$start") s ($(samba -V))"

ou="OU=bench,$SAMBA_BASE_DN"
python3 - "$USERS" "$ou" >"$work/users.ldif" <<'PY'
import sys
n, ou = int(sys.argv[1]), sys.argv[2]
print(f"dn: {ou}\nobjectClass: organizationalUnit\n")
for i in range(n):
    print(f"dn: CN=bench{i:06d},{ou}\nobjectClass: user\nsAMAccountName: bench{i:06d}\n"
          f"userPrincipalName: bench{i:06d}@tenon.test\ndisplayName: Bench User {i}\ngivenName: Bench\n"
          f"sn: User{i}\ndepartment: Dept{i % 20}\ntitle: Title{i % 7}\nmail: bench{i:06d}@tenon.test\n"
          f"telephoneNumber: +1 555 {i:07d}\n")
per = max(1, n // 50)
for g in range(50):
    print(f"dn: CN=bench-group-{g:02d},{ou}\nobjectClass: group\nsAMAccountName: bench-group-{g:02d}")
    for i in range(g * per, min(n, (g + 1) * per)):
        print(f"member: CN=bench{i:06d},{ou}")
    print()
PY
start=$(date +%s%N)
ldbadd -H "$SAMBA_SAM_LDB" "$work/users.ldif" >/dev/null
echo "added $USERS users and 50 groups (ldbadd) in $(since "$start") s"

read_dc() {
  ip netns exec "$SAMBA_NETNS" "$READER" --url "$SAMBA_LDAPS_URL" --base-dn "$ou" --bind-dn "$SAMBA_ADMIN_DN" \
    --password-file "$SAMBA_ADMIN_PASSWORD_FILE" --ca-file "$SAMBA_CA_FILE" "$@"
}

for round in 1 2 3; do
  echo "round $round:"
  read_dc --cursor-out "$work/cursor" | sed 's/^/  /'
  python3 - "$USERS" "$CHANGED" "$ou" "$round" >"$work/change.ldif" <<'PY'
import sys
n, k, ou, r = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
step = max(1, n // k)
for i in range(0, min(n, k * step), step):
    print(f"dn: CN=bench{i:06d},{ou}\nchangetype: modify\nreplace: department\ndepartment: Changed-{r}\n")
PY
  ldbmodify -H "$SAMBA_SAM_LDB" "$work/change.ldif" >/dev/null
  printf '  after changing %s users: ' "$CHANGED"
  read_dc --cursor-in "$work/cursor"
done

# The same through the real server, inside the DC's namespace (its loopback is the only network).
echo "through tenon-server (full sync, then an incremental sync after $CHANGED users changed):"
ip netns exec "$SAMBA_NETNS" "$BIN_DIR/tenon-server" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
  >"$work/server.out" 2>"$work/server.err" &
server=$!
for _ in $(seq 300); do grep -q 'listening on' "$work/server.out" 2>/dev/null && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$work/server.out" | head -1)
ctl() { ip netns exec "$SAMBA_NETNS" "$BIN_DIR/tenonctl" --server "$url" --token-file "$work/data/admin.token" "$@"; }
ctl directory add ldap bench --url "$SAMBA_LDAPS_URL" --base-dn "$ou" --bind-dn "$SAMBA_ADMIN_DN" \
  --password-file "$SAMBA_ADMIN_PASSWORD_FILE" --ca-file "$SAMBA_CA_FILE" --interval 24h >/dev/null
start=$(date +%s%N)
# The server starts the first (full) read when the source is added; `directory sync` waits for it
# and then reads the (empty) delta: the time covers the full sync.
ctl --json directory sync bench >"$work/full.json" 2>/dev/null
echo "  full sync: $(since "$start") s ($(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["users"], "users,", r["groups"], "groups")' "$work/full.json"))"
python3 - "$USERS" "$CHANGED" "$ou" server >"$work/change.ldif" <<'PY'
import sys
n, k, ou, r = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
step = max(1, n // k)
for i in range(0, min(n, k * step), step):
    print(f"dn: CN=bench{i:06d},{ou}\nchangetype: modify\nreplace: department\ndepartment: Changed-{r}\n")
PY
ldbmodify -H "$SAMBA_SAM_LDB" "$work/change.ldif" >/dev/null
start=$(date +%s%N)
ctl --json directory sync bench >"$work/delta.json" 2>/dev/null
echo "  incremental sync: $(since "$start") s ($(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["read"], "read,", r["users_changed"], "users changed")' "$work/delta.json"))"
echo "  server peak RSS: $(awk '/VmHWM/ {print $2 " " $3}' "/proc/$server/status")"
