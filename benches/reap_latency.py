#!/usr/bin/env python3
"""Latency from an end request to a cooperative avatar server being reaped.

Starts `sessiond` (SQLite in a temporary directory, no GPU) with the `avatar-fixture`
program in its `behave` mode (it exits at once on SIGTERM) as the avatar server, creates
one session at a time and ends it, and measures from just before the end request is sent
to the moment the server's process is gone from /proc (exited and reaped by `sessiond`).
A watcher thread waits on a pidfd of the server (readable once it exits), then looks for
/proc/<pid> to disappear, while the request is still in flight.

    python3 benches/reap_latency.py [--sessiond target/release/sessiond]
        [--fixture target/release/avatar-fixture] [--sessions 100] [--label NAME]

Prints p50, p90, p99 and max in milliseconds. Needs Linux and Python 3.9+ (os.pidfd_open).
"""

import argparse
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_gone(pid, pidfd, out):
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.poll(10_000)
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0)
    out.append(time.perf_counter_ns())


def percentile(sorted_values, p):
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessiond", default="target/release/sessiond")
    parser.add_argument("--fixture", default="target/release/avatar-fixture")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--label", default="sessiond")
    parser.add_argument("--extra", default="", help="extra sessiond flags, space separated")
    args = parser.parse_args()

    port = free_port()
    key = "bench-key"
    tmp = tempfile.mkdtemp(prefix="reap-latency-")
    cmd = [
        args.sessiond,
        "--listen", f"127.0.0.1:{port}",
        "--database", os.path.join(tmp, "reap.db"),
        "--api-key", key,
        "--gpu", "off",
        "--avatar-command", f"{os.path.abspath(args.fixture)} behave",
        "--max-concurrent-sessions", "1000000",
    ] + args.extra.split()
    log = open(os.path.join(tmp, "sessiond.log"), "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        for _ in range(200):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"x-api-key": key, "content-type": "application/json"}

        def call(method, path, body=None):
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            if r.status >= 300:
                raise SystemExit(f"{method} {path}: {r.status} {data[:200]!r}")
            return json.loads(data)

        latencies = []
        for _ in range(args.sessions):
            session = call("POST", "/v1/sessions", b"{}")["session"]
            pid = next(
                r["handle"] for r in session["resources"] if r["kind"] == "avatar_process"
            )
            pidfd = os.pidfd_open(pid)
            # Let the server install its SIGTERM handler, as a real one would have.
            time.sleep(0.02)
            done = []
            watcher = threading.Thread(target=wait_gone, args=(pid, pidfd, done))
            watcher.start()
            t0 = time.perf_counter_ns()
            call("POST", f"/v1/sessions/{session['session_id']}/end")
            watcher.join()
            os.close(pidfd)
            latencies.append((done[0] - t0) / 1e6)
        latencies.sort()
        print(
            f"{args.label}: {len(latencies)} sessions, end request -> avatar reaped: "
            f"p50 {percentile(latencies, 50):.2f} ms, p90 {percentile(latencies, 90):.2f} ms, "
            f"p99 {percentile(latencies, 99):.2f} ms, max {latencies[-1]:.2f} ms"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
