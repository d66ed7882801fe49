#!/usr/bin/env bash
# /healthz and check-in latency while many slow clients hold connections open, and the server's
# resident memory, against a fresh tenon-server on loopback.
#
#   bench/slow-clients.sh [CONNECTIONS] [SERVER_NOFILE]     e.g. bench/slow-clients.sh 2000
#
# CONNECTIONS (default 2000) half-sent requests (a request head that never ends) are opened, then
# /healthz and an unchanged check-in are timed on fresh connections; then the script waits past
# the header-read timeout and counts how many of the slow connections the server closed.
# SERVER_NOFILE, when given, is the server's hard file-descriptor limit (e.g. 1024, the setting of
# the original report): the connection cap then sits below it and new connections evict the oldest
# half-sent ones. Needs python3. Prints the figures; nothing is asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS=${1:-2000}
NOFILE=${2:-}
SERVER_BIN=${SERVER_BIN:-target/release/tenon-server}
CTL_BIN=${CTL_BIN:-target/release/tenonctl}
# The server's header-read timeout (its default; pass --header-read-timeout in SERVER_ARGS to change it).
HEADER_TIMEOUT=${HEADER_TIMEOUT:-10s}

if [ -z "${SKIP_BUILD:-}" ]; then cargo build --release -q -p tenon-server -p tenonctl; fi
work=$(mktemp -d)
cleanup() {
  [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$((20000 + RANDOM % 20000))
(
  if [ -n "$NOFILE" ]; then ulimit -n "$NOFILE"; fi
  # shellcheck disable=SC2086 # SERVER_ARGS is a list of options
  exec "$SERVER_BIN" serve --listen 127.0.0.1:$port --data-dir "$work/data" ${SERVER_ARGS:-}
) >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
export TENON_SERVER=http://127.0.0.1:$port TENON_TOKEN=$(cat "$work/data/admin.token")
token=$("$CTL_BIN" enroll-token create --uses 1 --ttl 1h)
sed 's/\x1b\[[0-9;]*m//g' "$work/server.err" | grep -o 'max_connections=[0-9]*' | head -1 | sed 's/^/server: /' || true

python3 - "$port" "$token" "$CONNECTIONS" "$server_pid" "$HEADER_TIMEOUT" <<'PY'
import json, socket, sys, time, urllib.request, statistics, re
port, token, n, pid, header_timeout = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
base = f"http://127.0.0.1:{port}"

def rss():
    with open(f"/proc/{pid}/status") as f:
        return next(l.split()[1] for l in f if l.startswith("VmRSS")) + " kB"

req = urllib.request.Request(base + "/api/v1/enroll", method="POST",
    data=json.dumps({"token": token, "hostname": "BENCH-SLOW", "agent_version": "bench"}).encode(),
    headers={"Content-Type": "application/json"})
cred = json.load(urllib.request.urlopen(req))["credential"]
etag = urllib.request.urlopen(urllib.request.Request(base + "/api/v1/device/config",
    headers={"Authorization": "Bearer " + cred})).headers["ETag"]

def timed(path, headers, samples=20):
    out, errors = [], 0
    for _ in range(samples):
        t = time.perf_counter()
        try:
            urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=5).read()
        except urllib.error.HTTPError as e:
            if e.code != 304:
                errors += 1
        except Exception:
            errors += 1
            continue
        out.append((time.perf_counter() - t) * 1000)
    return out, errors

def show(label, samples):
    ms, errors = samples
    if ms:
        ms.sort()
        print(f"  {label:<28} p50 {statistics.median(ms):7.1f} ms   max {ms[-1]:7.1f} ms   errors {errors}/{len(ms) + errors}")
    else:
        print(f"  {label:<28} no answer   errors {errors}")

checkin = {"Authorization": "Bearer " + cred, "If-None-Match": etag}
print(f"server RSS before: {rss()}")
show("/healthz, no slow clients", timed("/healthz", {}))
show("check-in, no slow clients", timed("/api/v1/device/config", checkin))

slow, failed = [], 0
t = time.time()
for i in range(n):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Slow: ")
        slow.append(s)
    except OSError:
        failed += 1
print(f"opened {len(slow)} half-sent connections in {time.time() - t:.1f}s ({failed} failed to connect)")
show(f"/healthz, {n} slow open", timed("/healthz", {}))
show(f"check-in, {n} slow open", timed("/api/v1/device/config", checkin))
print(f"server RSS with {n} slow connections: {rss()}")

def closed(s):
    s.setblocking(False)
    try:
        while True:
            b = s.recv(4096)
            if not b:
                return True
    except (socket.timeout, BlockingIOError):
        return False
    except OSError:
        return True

early = sum(closed(s) for s in slow)
print(f"closed by the server before the header timeout (evicted at the cap): {early}")
wait = float(re.match(r"(\d+)", header_timeout).group(1)) + 2
time.sleep(wait)
gone = sum(closed(s) for s in slow)
print(f"closed by the server {wait:.0f}s later (header timeout {header_timeout}): {gone} of {len(slow)}")
print(f"server RSS after: {rss()}")
for s in slow:
    s.close()
PY
