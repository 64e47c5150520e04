#!/usr/bin/env python3
"""Plain HTTP and HTTPS side by side, same binary, same storage, same run:
8 connections downloading the 110 MB blob (curl; HTTP/1.1, and HTTP/2 over
TLS), warm manifest GETs on keep-alive connections (ab), and the time of a
new TLS connection's handshake (Python's ssl, one after another). Run
through scripts/bench, which builds the release binary first.
"""

import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import shutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared helpers of scripts/bench.py)

DOWNLOADS = 8
AB_REQUESTS = 20000
AB_CONNECTIONS = 16
HANDSHAKES = 1000


def start(storage, pki, tls):
    port = bench.free_port()
    args = [
        bench.BIN, "--port", str(port), "--listen-address", "127.0.0.1",
        "--pkgs-path", bench.FIXTURE, "--storage-path", storage,
        "--nix-option", "substituters=", "--nix-timeout", "600",
    ]
    if tls:
        args += ["--tls-cert", f"{pki}/server.crt", "--tls-key", f"{pki}/server.key"]
    log = open(storage + ".log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    for _ in range(3000):
        if proc.poll() is not None:
            sys.exit(f"server exited; see {storage}.log")
        ok = subprocess.run(
            ["curl", "-sf", "--cacert", f"{pki}/ca.crt", "-o", "/dev/null", f"{base}/v2/"]
        ).returncode == 0
        if ok:
            return proc, base, " ".join(args)
        time.sleep(0.05)
    sys.exit("server did not answer")


def curl(pki, *args):
    return subprocess.run(
        ["curl", "-sSf", "--cacert", f"{pki}/ca.crt", *args],
        check=True, capture_output=True, text=True,
    ).stdout


def downloads(pki, url, version):
    """MB/s of DOWNLOADS curls fetching `url` at once."""
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            ["curl", "-sSf", version, "--cacert", f"{pki}/ca.crt", "-o", "/dev/null",
             "-w", "%{size_download}", url],
            stdout=subprocess.PIPE, text=True,
        )
        for _ in range(DOWNLOADS)
    ]
    sizes = [int(p.communicate()[0]) for p in procs]
    secs = time.monotonic() - start
    assert all(p.returncode == 0 for p in procs)
    return sum(sizes) / 1e6 / secs


def ab(url):
    """Requests per second of warm GETs on keep-alive connections."""
    out = subprocess.run(
        ["ab", "-q", "-k", "-n", str(AB_REQUESTS), "-c", str(AB_CONNECTIONS), url],
        check=True, capture_output=True, text=True,
    ).stdout
    rps = next(l for l in out.splitlines() if l.startswith("Requests per second"))
    failed = next(l for l in out.splitlines() if l.startswith("Failed requests"))
    return float(rps.split()[3]), failed.split()[2]


def handshakes(pki, port, tls):
    """Sorted seconds from connect to a finished handshake (TLS) or to an
    accepted connection's first response byte (plain), new connection each."""
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.crt")
    times = []
    for _ in range(HANDSHAKES):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            if tls:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    times.append(time.perf_counter() - start)
            else:
                raw.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                raw.recv(1)
                times.append(time.perf_counter() - start)
    times.sort()
    return times


def main():
    work = tempfile.mkdtemp(prefix="nixery-bench-tls-")
    try:
        pki = os.path.join(work, "pki")
        subprocess.run(
            [bench.BIN, "tls", "init", "--dir", pki, "--hostname", "localhost", "--ip", "127.0.0.1"],
            check=True, capture_output=True,
        )
        storage = os.path.join(work, "storage")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        for tls in (False, True):
            proc, base, command = start(storage, pki, tls)
            label = "TLS" if tls else "plain"
            try:
                manifest_url = f"{base}/v2/hello/big/manifests/latest"
                manifest = json.loads(curl(pki, manifest_url))
                largest = max(manifest["layers"], key=lambda l: l["size"])
                blob = f"{base}/v2/hello/big/blobs/{largest['digest']}"
                versions = ["--http1.1", "--http2"] if tls else ["--http1.1"]
                for v in versions:
                    rate = downloads(pki, blob, v)
                    bench.say(
                        f"{label} {v[2:]}: {DOWNLOADS} connections download a {largest['size'] / 1e6:.0f} MB blob",
                        f"{rate:.0f} MB/s in all",
                        f"{command} & {DOWNLOADS} x curl {v} --cacert ca.crt -o /dev/null {blob}",
                    )
                rps, failed = ab(manifest_url)
                bench.say(
                    f"{label}: warm manifest GET, keep-alive, {AB_CONNECTIONS} connections",
                    f"{rps:,.0f} req/s ({failed} failed)",
                    f"ab -k -n {AB_REQUESTS} -c {AB_CONNECTIONS} {manifest_url}",
                )
                port = int(base.rsplit(":", 1)[1])
                times = handshakes(pki, port, tls)
                what = "TLS handshake (new connection)" if tls else "new connection to first response byte"
                bench.say(
                    f"{label}: {what}, {HANDSHAKES} one after another",
                    f"p50 {times[len(times) // 2] * 1000:.2f} ms, p99 {times[len(times) * 99 // 100] * 1000:.2f} ms",
                    (f"python3 ssl: connect + wrap_socket (handshake) to {base}, {HANDSHAKES} times" if tls
                     else f"python3: connect, GET /v2/, first byte from {base}, {HANDSHAKES} times"),
                )
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
