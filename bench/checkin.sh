#!/usr/bin/env bash
# Unchanged check-ins per second against a tenon-server with N enrolled devices (default 10,000),
# and the same load generator against nginx serving a static file, for the ratio.
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
-- Rotates through every device's credential and ETag: each request is an unchanged check-in.
local creds = {}
for line in io.lines(os.getenv("CREDS")) do
  local c, e = line:match("^(%S+) (.+)$")
  creds[#creds + 1] = { c, e }
end
local i = 0
request = function()
  i = i % #creds + 1
  return wrk.format("GET", "/api/v1/device/config",
    { ["Authorization"] = "Bearer " .. creds[i][1], ["If-None-Match"] = creds[i][2] })
end
local not304 = 0
response = function(status)
  if status ~= 304 then not304 = not304 + 1 end
end
LUA

# Sanity: one check-in of the first device is a 304.
read -r cred etag < "$work/creds.txt"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $cred" -H "If-None-Match: $etag" "$TENON_SERVER/api/v1/device/config")
[ "$code" = 304 ] || { echo "expected 304 from an unchanged check-in, got $code"; exit 1; }

# nginx workers run unprivileged: the document root must be world-readable.
mkdir -p "$work/www" && : > "$work/www/checkin"
chmod 755 "$work" "$work/www" && chmod 644 "$work/www/checkin"
nport=$((port + 1))
cat > "$work/nginx.conf" <<NGX
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$nport $( [ -n "${TLS:-}" ] && echo ssl );
    $( [ -n "${TLS:-}" ] && echo "ssl_certificate $work/data/tls/server.pem; ssl_certificate_key $work/data/tls/server.key; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:TLS:10m; ssl_session_tickets off;" )
    root $work/www; location / { etag on; }
  }
}
NGX
"$NGINX" -c "$work/nginx.conf"
sleep 0.5
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' "$scheme://127.0.0.1:$nport/checkin")
[ "$code" = 200 ] || { echo "nginx answered $code for the static file; see $work/nginx.err"; exit 1; }

echo "== tenon-server: unchanged check-ins ($DEVICES devices, wrk -t$THREADS -c$CONNECTIONS -d$DURATION)"
CREDS="$work/creds.txt" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$work/checkin.lua" "$TENON_SERVER" | tee "$work/tenon.txt"
echo "== nginx: static empty file (same wrk settings)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" "$scheme://127.0.0.1:$nport/checkin" | tee "$work/nginx.txt"
if [ -n "${TLS:-}" ]; then
  # A new connection, and so a full handshake, for every request (no session resumption on either).
  echo "== new TLS connections: tenon-server /healthz and nginx, Connection: close"
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -H "Connection: close" "$TENON_SERVER/healthz" | tee "$work/tenon-hs.txt"
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -H "Connection: close" "$scheme://127.0.0.1:$nport/checkin" | tee "$work/nginx-hs.txt"
fi

t=$(awk '/Requests\/sec/ {print $2}' "$work/tenon.txt")
n=$(awk '/Requests\/sec/ {print $2}' "$work/nginx.txt")
errs=$(awk '/Non-2xx or 3xx/ {print $5}' "$work/tenon.txt")
nerrs=$(awk '/Non-2xx or 3xx/ {print $5}' "$work/nginx.txt")
rss=$(awk '/VmRSS/ {print $2 " " $3}' "/proc/$server_pid/status")
echo
echo "tenon-server unchanged check-ins/s: $t   (non-2xx/3xx answers: ${errs:-0})"
echo "nginx static file requests/s:       $n   (non-2xx/3xx answers: ${nerrs:-0})"
python3 -c "print(f'ratio tenon/nginx: {float(\"$t\")/float(\"$n\"):.2f}')"
echo "tenon-server resident memory with $DEVICES devices: $rss"
if [ -n "${TLS:-}" ]; then
  th=$(awk '/Requests\/sec/ {print $2}' "$work/tenon-hs.txt")
  nh=$(awk '/Requests\/sec/ {print $2}' "$work/nginx-hs.txt")
  echo "new TLS connections/s (handshake + one request): tenon-server $th, nginx $nh"
fi
if [ -n "${BACKUP:-}" ]; then
  # An online backup of this fleet while the server serves (issue figures: time and size).
  b0=$(date +%s.%N)
  "$SERVER_BIN" backup --data-dir "$work/data" --to "$work/fleet.backup" >/dev/null
  b1=$(date +%s.%N)
  python3 -c "print(f'online backup of $DEVICES devices: {$b1 - $b0:.2f} s, {$(stat -c %s "$work/fleet.backup")} bytes')"
fi
