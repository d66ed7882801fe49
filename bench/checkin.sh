#!/usr/bin/env bash
# Unchanged check-ins per second against a tenon-server with N enrolled devices (default 10,000),
# and the same load against nginx, for the ratio. Fair by construction: the same wrk settings and Lua
# script on both sides, the same path, request size (nginx's If-None-Match is padded to Tenon's
# length) and a 304 from both (nginx's answer is padded to at least Tenon's header bytes; both sizes
# are printed). Every answer is counted by status; the script fails if any check-in was not a 304.
# Prints check-ins/s, the ratio and the CPU time per request of each server.
#
#   bench/checkin.sh [DEVICES] [DURATION]      e.g. bench/checkin.sh 10000 15s
#
# Needs wrk and nginx (Debian packages `wrk` and `nginx-light`; installed when missing) and python3.
# Every address is on loopback. Prints the figures; nothing is asserted.
# The enrollment phase enrolls every device from one address at once, so the server runs with the
# enrollment rate limits off (SERVER_ARGS). SERVER_BIN/CTL_BIN (with SKIP_BUILD=1) measure other builds.
# BACKUP=1 also times an online `tenon-server backup` of the enrolled fleet and prints its size.
# SERVER_ARGS="--enroll-rate-per-address off --enroll-rate-per-token off --metrics-listen 127.0.0.1:0"
# measures the check-in with metrics on.
# TLS=1 serves HTTPS (--tls-self-signed) and nginx over TLS with the same certificate and key
# (ECDSA P-256), and also measures new connections per second (a TLS handshake per request,
# `Connection: close`) on both. Both keep a server-side session cache and issue no tickets (rustls'
# defaults), so whatever resumption the client attempts is offered alike.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-10000}
DURATION=${2:-15s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

SERVER_BIN=${SERVER_BIN:-target/release/tenon-server}
CTL_BIN=${CTL_BIN:-target/release/tenonctl}
SERVER_ARGS=${SERVER_ARGS---enroll-rate-per-address off --enroll-rate-per-token off}
if [ -z "${SKIP_BUILD:-}" ]; then cargo build --release -q -p tenon-server -p tenonctl; fi
work=$(mktemp -d)
cleanup() {
  rc=$?
  if [ "$rc" -ne 0 ] && [ -s "$work/server.err" ]; then
    echo "failed (exit $rc); the server's last log lines:"; tail -n 5 "$work/server.err"
  fi
  [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null || true
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$((20000 + RANDOM % 20000))
scheme=http
tls_args=""
if [ -n "${TLS:-}" ]; then scheme=https; tls_args="--tls-self-signed --tls-names localhost,127.0.0.1"; fi
# shellcheck disable=SC2086 # SERVER_ARGS is a list of options
"$SERVER_BIN" serve --listen 127.0.0.1:$port --data-dir "$work/data" $SERVER_ARGS $tls_args >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
CURL=(curl -s)
[ -n "${TLS:-}" ] && CURL+=(--cacert "$work/data/tls/ca.pem")
for _ in $(seq 100); do "${CURL[@]}" -f "$scheme://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
export TENON_SERVER=$scheme://127.0.0.1:$port TENON_TOKEN=$(cat "$work/data/admin.token")
[ -n "${TLS:-}" ] && export TENON_CA_FILE="$work/data/tls/ca.pem" SSL_CERT_FILE="$work/data/tls/ca.pem" 
token=$("$CTL_BIN" enroll-token create --uses "$DEVICES" --ttl 2h)

echo "enrolling $DEVICES devices..."
python3 - "$TENON_SERVER" "$token" "$DEVICES" "$work/creds.txt" <<'PY'
import json, os, ssl, sys, urllib.request, concurrent.futures, time
base, token, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if os.environ.get("SSL_CERT_FILE"):
    urllib.request.install_opener(urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]))))
def one(i):
    req = urllib.request.Request(base + "/api/v1/enroll", method="POST",
        data=json.dumps({"token": token, "hostname": f"BENCH-{i:05d}", "agent_version": "bench"}).encode(),
        headers={"Content-Type": "application/json"})
    cred = json.load(urllib.request.urlopen(req))["credential"]
    r = urllib.request.urlopen(urllib.request.Request(base + "/api/v1/device/config",
        headers={"Authorization": "Bearer " + cred}))
    return cred, r.headers["ETag"]
t = time.time()
with concurrent.futures.ThreadPoolExecutor(8) as ex, open(out, "w") as f:
    for k, (cred, etag) in enumerate(ex.map(one, range(n)), 1):
        f.write(f"{cred} {etag}\n")
        if k % 2000 == 0:
            print(f"  {k}/{n} enrolled ({time.time() - t:.0f}s)", flush=True)
PY

cat > "$work/checkin.lua" <<'LUA'
-- The same requests to both servers: every device's credential in turn, with the ETag that makes the
-- answer a 304 (for nginx, NGINX_INM: its file's ETag padded to the length of a Tenon ETag, so both
-- requests have the same size). Every answer is counted by status; done() prints the counts.
creds = {}
for line in io.lines(os.getenv("CREDS")) do
  local c, e = line:match("^(%S+) (.+)$")
  creds[#creds + 1] = { c, e }
end
local inm = os.getenv("NGINX_INM")
local i = 0
request = function()
  i = i % #creds + 1
  return wrk.format("GET", "/api/v1/device/config",
    { ["Authorization"] = "Bearer " .. creds[i][1], ["If-None-Match"] = inm or creds[i][2] })
end
statuses = {}
response = function(status)
  statuses[status] = (statuses[status] or 0) + 1
end
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end
done = function()
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("answers with status %d: %d\n", k, v)) end
end
LUA

# Sanity: one check-in of the first device is a 304.
read -r cred etag < "$work/creds.txt"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $cred" -H "If-None-Match: $etag" "$TENON_SERVER/api/v1/device/config")
[ "$code" = 304 ] || { echo "expected 304 from an unchanged check-in, got $code"; exit 1; }

# nginx serves an empty file at the same path. Its workers run unprivileged: the document root must
# be world-readable.
mkdir -p "$work/www/api/v1/device" && : > "$work/www/api/v1/device/config"
chmod -R a+rX "$work/www" && chmod 755 "$work"
nport=$((port + 1))
PAD=""
write_nginx_conf() {
cat > "$work/nginx.conf" <<NGX
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  server_tokens off;
  server {
    listen 127.0.0.1:$nport $( [ -n "${TLS:-}" ] && echo ssl );
    $( [ -n "${TLS:-}" ] && echo "ssl_certificate $work/data/tls/server.pem; ssl_certificate_key $work/data/tls/server.key; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:TLS:10m; ssl_session_tickets off;" )
    root $work/www; location / { etag on; $( [ -n "$PAD" ] && echo "add_header X-Pad $PAD always;" ) }
  }
}
NGX
}
write_nginx_conf
"$NGINX" -c "$work/nginx.conf"
sleep 0.5
NURL="$scheme://127.0.0.1:$nport"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' "$NURL/api/v1/device/config")
[ "$code" = 200 ] || { echo "nginx answered $code for the static file; see $work/nginx.err"; exit 1; }
# Same request size: nginx's ETag, padded with a second (never matching) one to Tenon's length.
netag=$("${CURL[@]}" -D - -o /dev/null "$NURL/api/v1/device/config" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag" {print $2}')
fill=$(( ${#etag} - ${#netag} - 4 ))
NGINX_INM="$netag"
[ "$fill" -gt 0 ] && NGINX_INM="$netag, \"$(printf 'x%.0s' $(seq "$fill"))\""
# Same response size: nginx's 304 padded with a header to the bytes of Tenon's.
tbytes=$("${CURL[@]}" -D - -o /dev/null -H "Authorization: Bearer $cred" -H "If-None-Match: $etag" "$TENON_SERVER/api/v1/device/config" | wc -c)
nbytes=$("${CURL[@]}" -D - -o /dev/null -H "If-None-Match: $NGINX_INM" "$NURL/api/v1/device/config" | wc -c)
if [ "$nbytes" -lt $((tbytes - 9)) ]; then
  PAD=$(printf 'p%.0s' $(seq $((tbytes - nbytes - 9))))
  write_nginx_conf
  "$NGINX" -c "$work/nginx.conf" -s reload
  sleep 0.5
  nbytes=$("${CURL[@]}" -D - -o /dev/null -H "If-None-Match: $NGINX_INM" "$NURL/api/v1/device/config" | wc -c)
fi
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' -H "If-None-Match: $NGINX_INM" "$NURL/api/v1/device/config")
[ "$code" = 304 ] || { echo "nginx answered $code, not 304, to its own ETag"; exit 1; }
echo "304 answer headers: tenon-server $tbytes bytes, nginx $nbytes bytes; If-None-Match ${#etag} and ${#NGINX_INM} bytes"

# CPU seconds (user + system) of a process and its children so far.
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
nginx_pids() { local m; m=$(cat "$work/nginx.pid"); echo "$m" $(pgrep -P "$m"); }
hz=$(getconf CLK_TCK)

echo "== tenon-server: unchanged check-ins ($DEVICES devices, wrk -t$THREADS -c$CONNECTIONS -d$DURATION)"
c0=$(cpu_ticks "$server_pid")
CREDS="$work/creds.txt" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$work/checkin.lua" "$TENON_SERVER" | tee "$work/tenon.txt"
c1=$(cpu_ticks "$server_pid")
echo "== nginx: an empty file at the same path, the same requests, 304 (same wrk settings and script)"
n0=$(cpu_ticks $(nginx_pids))
CREDS="$work/creds.txt" NGINX_INM="$NGINX_INM" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$work/checkin.lua" "$NURL" | tee "$work/nginx.txt"
n1=$(cpu_ticks $(nginx_pids))
if [ -n "${TLS:-}" ]; then
  # A new connection, and so a handshake, for every request (session cache alike on both, no tickets).
  echo "== new TLS connections: tenon-server /healthz and nginx, Connection: close"
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -H "Connection: close" "$TENON_SERVER/healthz" | tee "$work/tenon-hs.txt"
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -H "Connection: close" "$NURL/api/v1/device/config" | tee "$work/nginx-hs.txt"
fi

t=$(awk '/Requests\/sec/ {print $2}' "$work/tenon.txt")
n=$(awk '/Requests\/sec/ {print $2}' "$work/nginx.txt")
rss=$(awk '/VmRSS/ {print $2 " " $3}' "/proc/$server_pid/status")
count() { awk '/^answers with status/ {n += $5} END {print n + 0}' "$1"; }
not304() { awk '/^answers with status/ && $4 != "304:" {n += $5} END {print n + 0}' "$1"; }
tn=$(count "$work/tenon.txt"); nn=$(count "$work/nginx.txt")
echo
echo "tenon-server unchanged check-ins/s: $t   ($tn answers, $(not304 "$work/tenon.txt") not 304)"
echo "nginx 304 answers/s:                $n   ($nn answers, $(not304 "$work/nginx.txt") not 304)"
python3 -c "print(f'ratio tenon/nginx: {float(\"$t\")/float(\"$n\"):.2f}')"
python3 -c "print(f'CPU per request: tenon-server {($c1-$c0)/$hz/max($tn,1)*1e6:.1f} us, nginx {($n1-$n0)/$hz/max($nn,1)*1e6:.1f} us')"
echo "tenon-server resident memory with $DEVICES devices: $rss"
if [ -n "${TLS:-}" ]; then
  th=$(awk '/Requests\/sec/ {print $2}' "$work/tenon-hs.txt")
  nh=$(awk '/Requests\/sec/ {print $2}' "$work/nginx-hs.txt")
  echo "new TLS connections/s (handshake + one request): tenon-server $th, nginx $nh"
fi
if [ "$(not304 "$work/tenon.txt")" != 0 ] || [ "$(not304 "$work/nginx.txt")" != 0 ] || [ "$tn" = 0 ] || [ "$nn" = 0 ]; then
  echo "FAILED: a check-in got an answer other than 304 (or none was counted); the figures above do not count"
  exit 1
fi
if [ -n "${BACKUP:-}" ]; then
  # An online backup of this fleet while the server serves (issue figures: time and size).
  b0=$(date +%s.%N)
  "$SERVER_BIN" backup --data-dir "$work/data" --to "$work/fleet.backup" >/dev/null
  b1=$(date +%s.%N)
  python3 -c "print(f'online backup of $DEVICES devices: {$b1 - $b0:.2f} s, {$(stat -c %s "$work/fleet.backup")} bytes')"
fi
