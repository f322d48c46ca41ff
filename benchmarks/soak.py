"""Soak `edgeqwen serve`: many requests on loopback, bounded in count and time; does memory stay flat?

    python benchmarks/soak.py BUNDLE [--requests 1000] [--concurrency 4] [--max-tokens 8] [--time-limit 900]

Starts the server as its own process (so its RSS is its own), warms it up, then sends a mix of chat
requests (streamed and not, a few conversations that grow by one turn and so hit the prefix cache, a few
bad ones that must get 4xx) from ``--concurrency`` client threads. Reports requests/s, p50/p95 latency,
errors, and the server's RSS after warm-up and at the end (goal: no growth beyond noise). Prints a table
and JSON; writes benchmarks/results/soak-*.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ["prime numbers", "binary search", "a linked list", "JSON parsing", "file hashing", "a stack",
          "string reversal", "bubble sort"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, body: dict) -> tuple[int, float]:
    """(status, seconds) for one request; streamed bodies are read to the end."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, time.perf_counter() - t0


def body_for(i: int, max_tokens: int) -> tuple[dict, bool]:
    """The i-th request of the mix and whether it is meant to fail (1 in 25 is a bad request)."""
    if i % 25 == 24:
        return {"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, True
    turns = 1 + (i // len(TOPICS)) % 3  # conversations grow by a turn: prefix reuse
    messages = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Turn {t}: one line of Python about {TOPICS[i % len(TOPICS)]}."})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": "def f(x):\n    return x"})
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": i % 2 == 0}, False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--time-limit", type=float, default=900, help="stop sending after this many seconds")
    ap.add_argument("--threads", type=int, default=None, help="server's intra-op threads")
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "edgeqwen.cli", "serve", args.bundle, "--port", str(port),
           "--max-queue", str(max(16, args.concurrency * 2))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            print("server did not start:", server.stderr.read() if server.poll() is not None else "", file=sys.stderr)
            return 1
        for i in range(args.warmup):
            request(port, body_for(i, args.max_tokens)[0])
        rss_start = rss_mb(server.pid)

        latencies: list[float] = []
        unexpected: list[str] = []
        lock = threading.Lock()
        counter = iter(range(args.requests))
        deadline = time.monotonic() + args.time_limit

        def worker() -> None:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body, should_fail = body_for(i, args.max_tokens)
                try:
                    status, seconds = request(port, body)
                except OSError as e:
                    with lock:
                        unexpected.append(f"request {i}: {type(e).__name__}: {e}")
                    continue
                with lock:
                    if (status >= 400) != should_fail:
                        unexpected.append(f"request {i}: status {status}")
                    elif not should_fail:
                        latencies.append(seconds)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_end = rss_mb(server.pid)
        lat = sorted(latencies)
        report = {
            "bundle": args.bundle, "requests_ok": len(lat), "unexpected": unexpected[:20],
            "unexpected_count": len(unexpected), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "wall_s": round(wall, 2), "requests_per_s": round(len(lat) / wall, 2) if wall else 0.0,
            "p50_s": round(statistics.median(lat), 4) if lat else None,
            "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 4) if lat else None,
            "rss_after_warmup_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
            "rss_growth_mb": round(rss_end - rss_start, 1), "time_limited": time.monotonic() >= deadline,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    finally:
        server.terminate()
        try:
            report_exit = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            report_exit = None
    report["server_exit_code_on_sigterm"] = report_exit
    print(f"{'requests ok':22} {report['requests_ok']}\n{'unexpected':22} {report['unexpected_count']}\n"
          f"{'requests/s':22} {report['requests_per_s']}\n{'p50 / p95 latency s':22} {report['p50_s']} / "
          f"{report['p95_s']}\n{'RSS after warm-up MB':22} {report['rss_after_warmup_mb']}\n"
          f"{'RSS at end MB':22} {report['rss_end_mb']} ({report['rss_growth_mb']:+.1f})\n"
          f"{'exit on SIGTERM':22} {report_exit}")
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written: {out}", file=sys.stderr)
    return 0 if not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
