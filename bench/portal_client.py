#!/usr/bin/env python3
"""The measuring client of bench/portal.sh (stdlib only).

    portal_client.py HOST PORT TOKEN_FILE METRICS_PORT|- REQUESTS WARMUP JSON_OUT NAME=PATH...

Signs in to the portal over HTTP (POST /signin with the admin token read from TOKEN_FILE, in the
form body only), keeps the session cookie, then for each NAME=PATH: WARMUP requests unmeasured,
then REQUESTS requests on the same keep-alive connection, each timed at the client from sending
the request line to the last byte of the body. Every answer must be 200. With a metrics port, the
server's own `tenon_http_request_duration_seconds` histogram for the route is scraped before and
after the measured requests and the difference is kept (the share of requests under each bucket
bound). Then the page weight of `/devices`: the HTML plus every stylesheet and script it
references, fetched as a first visit would. Writes everything as JSON to JSON_OUT.
"""
import http.client
import json
import math
import re
import sys
import time
import urllib.parse


def fail(msg):
    print(f"portal_client: {msg}", file=sys.stderr)
    sys.exit(2)


def pct(sorted_values, q):
    """Nearest rank."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


class Portal:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.cookie = None

    def request(self, method, path, body=None, headers=None):
        h = dict(headers or {})
        if self.cookie:
            h["Cookie"] = self.cookie
        self.conn.request(method, path, body=body, headers=h)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp, data

    def sign_in(self, token):
        body = urllib.parse.urlencode({"token": token})
        resp, _ = self.request(
            "POST",
            "/signin",
            body=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        if resp.status not in (302, 303, 307):
            fail(f"sign-in answered {resp.status}, expected a redirect")
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie" and "session=" in value:
                self.cookie = value.split(";", 1)[0]
        if not self.cookie:
            fail("sign-in set no session cookie")

    def timed_get(self, path):
        t0 = time.perf_counter()
        resp, data = self.request("GET", path)
        t1 = time.perf_counter()
        if resp.status != 200:
            fail(f"GET {path} answered {resp.status}")
        return t1 - t0, data


def scrape(metrics_port, route):
    """Cumulative bucket counts {le: count} and the count of the route's latency histogram."""
    c = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    buckets, count = {}, 0
    label = f'route="{route}"'
    for line in text.splitlines():
        if not line.startswith("tenon_http_request_duration_seconds") or label not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("tenon_http_request_duration_seconds_bucket"):
            le = re.search(r'le="([^"]+)"', name).group(1)
            buckets[float(le)] = float(value)
        elif name.startswith("tenon_http_request_duration_seconds_count"):
            count = float(value)
    return buckets, count


def server_side(before, after):
    """From two scrapes: requests in between, the bucket bound holding p99, the share <= 100 ms."""
    (b0, c0), (b1, c1) = before, after
    n = c1 - c0
    if n <= 0:
        return None
    delta = sorted((le, b1.get(le, 0) - b0.get(le, 0)) for le in b1)
    p99_le = next((le for le, cum in delta if cum >= 0.99 * n), math.inf)
    under_100 = next((cum for le, cum in delta if abs(le - 0.1) < 1e-9), None)
    return {
        "requests": int(n),
        "p99_at_most_ms": None if math.isinf(p99_le) else p99_le * 1000,
        "share_under_100ms": None if under_100 is None else under_100 / n,
    }


def main():
    host, port, token_file, metrics_port, requests, warmup, out = sys.argv[1:8]
    targets = [a.split("=", 1) for a in sys.argv[8:]]
    port, requests, warmup = int(port), int(requests), int(warmup)
    metrics_port = None if metrics_port == "-" else int(metrics_port)
    with open(token_file) as f:
        token = f.read().strip()
    p = Portal(host, port)
    p.sign_in(token)
    del token
    results = []
    for name, path in targets:
        route = "/" if path.split("?", 1)[0] == "/" else path.split("?", 1)[0]
        size = 0
        for _ in range(warmup):
            _, data = p.timed_get(path)
            size = len(data)
        before = scrape(metrics_port, route) if metrics_port else None
        times = []
        for _ in range(requests):
            t, data = p.timed_get(path)
            times.append(t * 1000)
            size = len(data)
        after = scrape(metrics_port, route) if metrics_port else None
        times.sort()
        m = re.search(rb"(\d[\d,]*) devices?", data)
        results.append({
            "name": name,
            "path": path,
            "requests": len(times),
            "bytes": size,
            "matched": m.group(1).decode() if m else None,
            "p50_ms": pct(times, 0.50),
            "p90_ms": pct(times, 0.90),
            "p99_ms": pct(times, 0.99),
            "max_ms": times[-1],
            "server": server_side(before, after) if metrics_port else None,
        })
        print(f"   {name}: p99 {results[-1]['p99_ms']:.1f} ms", file=sys.stderr)

    # Page weight: a first visit to /devices downloads the HTML and the assets it references.
    _, html = p.timed_get("/devices")
    text = html.decode()
    refs = re.findall(r'<link[^>]+rel="stylesheet"[^>]+href="([^"]+)"', text)
    refs += re.findall(r'<link[^>]+href="([^"]+)"[^>]+rel="stylesheet"', text)
    refs += re.findall(r'<script[^>]+src="([^"]+)"', text)
    assets = []
    for ref in dict.fromkeys(refs):
        if not ref.startswith("/"):
            fail(f"/devices references {ref}, not on this server")
        _, data = p.timed_get(ref)
        assets.append({"path": ref, "bytes": len(data)})
    weight = {"html": len(html), "assets": assets, "total": len(html) + sum(a["bytes"] for a in assets)}
    with open(out, "w") as f:
        json.dump({"pages": results, "weight": weight}, f, indent=1)


if __name__ == "__main__":
    main()
