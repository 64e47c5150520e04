#!/usr/bin/env python3
"""Measures the figures of the README's "Performance" section against a
release build of the server and the fixture package set, printing each with
the command that produced it. Run through scripts/bench, which installs the
tools and builds the binary first.

Each server runs as its own process on a fresh port, so that its peak RSS
(VmHWM) belongs to one measurement.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BENCH_BIN") or os.path.join(ROOT, "target", "release", "nixery")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pkgs")
OHA_SECONDS = int(os.environ.get("BENCH_OHA_SECONDS", "10"))
CONNECTIONS = 64
DOWNLOADS = 8


def say(figure, value, command):
    print(f"{figure}: {value}")
    print(f"    command: {command}")
    sys.stdout.flush()


def nix_build(attr):
    out = subprocess.run(
        ["nix-build", "--no-out-link", "--option", "substituters", "", FIXTURE, "-A", attr],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def closure_bytes(attrs):
    paths = set()
    for attr in attrs:
        out = subprocess.run(
            ["nix-store", "-qR", nix_build(attr)], check=True, capture_output=True, text=True
        )
        paths.update(out.stdout.split())
    total = 0
    for p in paths:
        if os.path.islink(p) or os.path.isfile(p):
            total += os.lstat(p).st_size if os.path.isfile(p) else 0
            continue
        for d, _, files in os.walk(p):
            for f in files:
                fp = os.path.join(d, f)
                if not os.path.islink(fp):
                    total += os.lstat(fp).st_size
    return total


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


class Server:
    """The release binary on a storage path; start-up timed to the first
    `/v2/` 200."""

    def __init__(self, storage):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [
            BIN,
            "--port", str(self.port),
            "--listen-address", "127.0.0.1",
            "--pkgs-path", FIXTURE,
            "--storage-path", storage,
            "--nix-option", "substituters=",
            "--nix-timeout", "600",
        ]
        self.command = " ".join(args)
        self.log = open(os.path.join(storage + ".log"), "ab")
        start = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {storage}.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                time.sleep(0.001)
        self.startup = time.monotonic() - start

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=900) as r:
            return r.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def pack_figure(label, image, attrs, work):
    storage = os.path.join(work, image.replace("/", "-"))
    mb = closure_bytes(attrs) / 1e6
    server = Server(storage)
    start = time.monotonic()
    server.get(f"/v2/{image}/manifests/latest")
    secs = time.monotonic() - start
    hwm = status_kb(server.proc.pid, "VmHWM") / 1024
    server.stop()
    say(
        f"packing, {label}, cold manifest time",
        f"{mb / secs:.0f} MB/s ({mb:.0f} MB closure in {secs:.2f} s), peak RSS {hwm:.0f} MB",
        f"{server.command} & curl {server.base}/v2/{image}/manifests/latest",
    )
    return storage


def oha(url):
    out = subprocess.run(
        ["oha", "--no-tui", "--output-format", "json", "-z", f"{OHA_SECONDS}s", "-c", str(CONNECTIONS), url],
        check=True,
        capture_output=True,
        text=True,
    )
    stats = json.loads(out.stdout)
    rps = stats["summary"]["requestsPerSec"]
    p99 = stats["latencyPercentiles"]["p99"] * 1000
    codes = stats.get("statusCodeDistribution", {})
    return f"{rps:,.0f} req/s, p99 {p99:.1f} ms, status codes {codes}"


def download(url, results):
    got = 0
    with urllib.request.urlopen(url, timeout=900) as r:
        while True:
            piece = r.read(1 << 20)
            if not piece:
                break
            got += len(piece)
    results.append(got)


def main():
    if not os.access(BIN, os.X_OK):
        sys.exit(f"{BIN} missing: run scripts/bench, which builds it")
    work = tempfile.mkdtemp(prefix="nixery-bench-")
    try:
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        storage = pack_figure("incompressible closure (hello + 110 MB random)", "hello/big", ["hello", "big"], work)
        pack_figure("text closure (hello + 154 MB text)", "hello/text", ["hello", "text"], work)

        # A fresh process on the warm storage: start-up, idle RSS, downloads.
        server = Server(storage)
        say("start-up to first /v2/ 200", f"{server.startup * 1000:.0f} ms", server.command)
        time.sleep(1)
        rss = status_kb(server.proc.pid, "VmRSS") / 1024
        say("RSS idle", f"{rss:.1f} MB", f"grep VmRSS /proc/<pid>/status, 1 s after start-up")

        manifest = json.loads(server.get("/v2/hello/big/manifests/latest"))
        largest = max(manifest["layers"], key=lambda l: l["size"])
        blob = f"{server.base}/v2/hello/big/blobs/{largest['digest']}"
        results = []
        threads = [threading.Thread(target=download, args=(blob, results)) for _ in range(DOWNLOADS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        secs = time.monotonic() - start
        assert results == [largest["size"]] * DOWNLOADS, results
        hwm = status_kb(server.proc.pid, "VmHWM") / 1024
        say(
            f"peak RSS while {DOWNLOADS} connections download a {largest['size'] / 1e6:.0f} MB blob",
            f"{hwm:.0f} MB (VmHWM; {DOWNLOADS * largest['size'] / 1e6 / secs:.0f} MB/s in all)",
            f"{DOWNLOADS} x GET {blob}",
        )

        url = f"{server.base}/v2/hello/big/manifests/latest"
        say(
            f"warm manifest GET, {CONNECTIONS} connections",
            oha(url),
            f"oha -z {OHA_SECONDS}s -c {CONNECTIONS} {url}",
        )
        url = f"{server.base}/v2/"
        say(
            f"/v2/ base route, {CONNECTIONS} connections",
            oha(url),
            f"oha -z {OHA_SECONDS}s -c {CONNECTIONS} {url}",
        )
        server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
