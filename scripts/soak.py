#!/usr/bin/env python3
"""A long run of the server (a bench, not a test): a steady mix of cold and
warm pulls over ~200 image names of the fixture package set, under a quota
that forces evictions, with slow clients, abandoned downloads and a kill -9
and restart every few minutes. Every 10 s it samples the server's RSS, open
fds, threads, the sled directory's size, the blob bytes and the p99
latencies of that window; at the end it prints the first and last samples,
the slope of each (per hour, over the samples after the first restart so
that start-up does not count as growth), a verdict on growth, and the
integrity check (`nixery verify`: every stored blob hashes to its name,
every recorded manifest complete) plus the digests of every blob served.

Run through scripts/soak, which builds the binary first.
  --minutes N         length of the run (default 30)
  --kill-every N      minutes between kill -9s (default 4)
  --max-storage SIZE  the quota (default 150M: below the ~175 MB the
                      images share, so evictions and rebuilds go on)
  SOAK_BIN=PATH       another nixery binary (e.g. target/debug/nixery)
"""

import argparse
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("SOAK_BIN") or os.path.join(ROOT, "target", "release", "nixery")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pkgs")
PACKAGES = ["hello", "bash", "busybox", "text", "coreutils", "moreutils", "nano",
            "cacert", "iana-etc", "shell", "bigview"]
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SAMPLE_EVERY = 10


def image_names(limit=200):
    """Distinct images: every package alone, then pairs, then triples."""
    names = []
    for k in (1, 2, 3):
        for combo in itertools.combinations(PACKAGES, k):
            names.append("/".join(combo))
    return names[:limit]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))]


class Server:
    def __init__(self, storage, extra):
        self.storage = storage
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = [BIN, "--port", str(self.port), "--listen-address", "127.0.0.1",
                     "--pkgs-path", FIXTURE, "--storage-path", storage,
                     "--nix-option", "substituters=", "--nix-timeout", "600", *extra]
        self.log = open(storage + ".log", "ab")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {self.storage}.log")
            try:
                with urllib.request.urlopen(self.base + "/v2/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def proc_field(self, field):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def fds(self):
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return None


def dir_bytes(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return total


class Run:
    def __init__(self, server, names, hot):
        self.server = server
        self.names = names
        self.hot = hot
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.window = {"warm": [], "cold": [], "blob": []}
        self.counts = {"pulls": 0, "errors": 0, "bad_digests": 0, "abandoned": 0, "slow": 0,
                       "restarts": 0, "unavailable": 0, "cut": 0}
        self.error_kinds = {}

    def note(self, kind, seconds):
        with self.lock:
            self.window[kind].append(seconds)

    def count(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def error(self, what):
        with self.lock:
            self.counts["errors"] += 1
            self.error_kinds[what] = self.error_kinds.get(what, 0) + 1

    def get(self, path, accept=None, timeout=900):
        req = urllib.request.Request(self.server.base + path)
        if accept:
            req.add_header("Accept", accept)
        return urllib.request.urlopen(req, timeout=timeout)

    def manifest(self, name):
        start = time.monotonic()
        with self.get(f"/v2/{name}/manifests/latest", MANIFEST) as r:
            body = json.loads(r.read())
        return body, time.monotonic() - start

    def pull(self, name, warm):
        try:
            m, took = self.manifest(name)
        except urllib.error.HTTPError as e:
            # 429 (queue full) and a storage-full 500 are answers, not faults.
            self.count("unavailable") if e.code in (429, 500, 503) else self.error(f"manifest {e.code}")
            return
        except OSError:
            self.count("unavailable")  # the server is being restarted
            return
        self.note("warm" if warm else "cold", took)
        for blob in [m["config"]] + m["layers"]:
            digest = blob["digest"]
            start = time.monotonic()
            try:
                with self.get(f"/v2/{name}/blobs/{digest}") as r:
                    h = hashlib.sha256()
                    got, length = 0, int(r.headers.get("Content-Length", "-1"))
                    while chunk := r.read(1 << 20):
                        h.update(chunk)
                        got += len(chunk)
                if got != length:
                    # Cut off by a kill -9: the client sees a short read.
                    self.count("cut")
                    return
            except urllib.error.HTTPError as e:
                # An image evicted between its manifest and this blob after
                # its lease: counted, as a client would see it.
                self.error(f"blob {e.code}")
                return
            except OSError:
                self.count("unavailable")
                return
            self.note("blob", time.monotonic() - start)
            if "sha256:" + h.hexdigest() != digest:
                self.count("bad_digests")
        self.count("pulls")

    def puller(self, seed):
        rnd = random.Random(seed)
        while not self.stop.is_set():
            warm = rnd.random() < 0.7
            name = rnd.choice(self.hot if warm else self.names)
            self.pull(name, warm and name in self.hot)
            # A client's pace, not a flood: leases end and evictions go on.
            time.sleep(rnd.uniform(0, 0.4))

    def slow_client(self):
        rnd = random.Random(7)
        while not self.stop.is_set():
            name = rnd.choice(self.hot)
            try:
                m, _ = self.manifest(name)
                largest = max(m["layers"], key=lambda l: l["size"])
                with self.get(f"/v2/{name}/blobs/{largest['digest']}") as r:
                    h = hashlib.sha256()
                    got, length = 0, int(r.headers.get("Content-Length", "-1"))
                    while chunk := r.read(64 << 10):
                        h.update(chunk)
                        got += len(chunk)
                        time.sleep(0.05)  # about 1.3 MB/s
                        if self.stop.is_set():
                            break
                    else:
                        if got != length:
                            self.count("cut")
                        elif "sha256:" + h.hexdigest() != largest["digest"]:
                            self.count("bad_digests")
                self.count("slow")
            except (OSError, ValueError, KeyError):
                time.sleep(1)

    def abandoner(self):
        rnd = random.Random(11)
        while not self.stop.is_set():
            name = rnd.choice(self.names)
            try:
                m, _ = self.manifest(name)
                layer = rnd.choice(m["layers"])
                r = self.get(f"/v2/{name}/blobs/{layer['digest']}")
                r.read(64 << 10)
                r.close()
                self.count("abandoned")
            except (OSError, ValueError, KeyError):
                time.sleep(1)
            time.sleep(0.5)


def slope_per_hour(points):
    """Least-squares slope of (seconds, value) points, per hour."""
    pts = [(t, v) for t, v in points if v is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mv = sum(v for _, v in pts) / n
    den = sum((t - mt) ** 2 for t, _ in pts)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in pts) / den * 3600


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--kill-every", type=float, default=4)
    ap.add_argument("--max-storage", default="150M")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="nixery-soak-")
    storage = os.path.join(work, "storage")
    extra = ["--max-storage", args.max_storage, "--gc-lease", "5", "--max-concurrent-builds", "1"]
    server = Server(storage, extra)
    command = " ".join(server.args)
    print(f"soak: {args.minutes} min, kill -9 every {args.kill_every} min; server: {command}")
    sys.stdout.flush()
    names = image_names()
    hot = names[:20]
    run = Run(server, names, hot)
    workers = [threading.Thread(target=run.puller, args=(i,), daemon=True) for i in range(3)]
    workers += [threading.Thread(target=run.slow_client, daemon=True),
                threading.Thread(target=run.abandoner, daemon=True)]
    for w in workers:
        w.start()

    began = time.monotonic()
    end = began + args.minutes * 60
    next_kill = began + args.kill_every * 60
    samples = []
    lives = []
    first_restart = None
    header = f"{'t_s':>6} {'rss_MiB':>8} {'fds':>5} {'thr':>4} {'sled_MiB':>9} {'blobs_MiB':>9} " \
             f"{'p99_warm_ms':>11} {'p99_cold_s':>10} {'p99_blob_ms':>11} {'pulls':>6} {'errors':>6}"
    print(header)
    while time.monotonic() < end:
        time.sleep(SAMPLE_EVERY)
        now = time.monotonic()
        if now >= next_kill and now < end - SAMPLE_EVERY:
            # What the life that ends had reached, to compare lives.
            lives.append((server.proc_field("VmRSS"), server.fds(), server.proc_field("Threads")))
            server.kill9()
            server.start()
            run.count("restarts")
            first_restart = first_restart or now - began
            next_kill = now + args.kill_every * 60
        with run.lock:
            window, run.window = run.window, {"warm": [], "cold": [], "blob": []}
            pulls, errors = run.counts["pulls"], run.counts["errors"]
        rss = server.proc_field("VmRSS")
        s = {
            "t": now - began,
            "rss": rss / 1024 if rss else None,
            "fds": server.fds(),
            "threads": server.proc_field("Threads"),
            "sled": dir_bytes(os.path.join(storage, "db")) / 2**20,
            "blobs": dir_bytes(os.path.join(storage, "blobs")) / 2**20,
            "p99_warm": percentile(window["warm"], 0.99),
            "p99_cold": percentile(window["cold"], 0.99),
            "p99_blob": percentile(window["blob"], 0.99),
        }
        samples.append(s)
        fmt = lambda v, scale=1, d=1: "-" if v is None else f"{v * scale:.{d}f}"
        print(f"{s['t']:6.0f} {fmt(s['rss']):>8} {fmt(s['fds'], d=0):>5} {fmt(s['threads'], d=0):>4} "
              f"{fmt(s['sled']):>9} {fmt(s['blobs']):>9} {fmt(s['p99_warm'], 1000):>11} "
              f"{fmt(s['p99_cold']):>10} {fmt(s['p99_blob'], 1000):>11} {pulls:>6} {errors:>6}")
        sys.stdout.flush()
    run.stop.set()
    for w in workers:
        w.join(timeout=120)
    server.stop()

    print("\nsummary")
    settled = [s for s in samples if first_restart is None or s["t"] >= first_restart]
    verdicts = []
    for key, unit in [("rss", "MiB"), ("fds", ""), ("threads", ""), ("sled", "MiB"), ("blobs", "MiB")]:
        values = [s[key] for s in samples if s[key] is not None]
        slope = slope_per_hour([(s["t"], s[key]) for s in settled])
        first, last = (values[0], values[-1]) if values else (None, None)
        # Growth: the last third of the run (after the first restart) is
        # over 10 % above the first third, and the slope agrees.
        kept = [s[key] for s in settled if s[key] is not None]
        third = max(1, len(kept) // 3)
        early, late = kept[:third], kept[-third:]
        mean = lambda xs: sum(xs) / len(xs) if xs else 0
        grows = slope is not None and slope > 0 and mean(late) > 1.1 * mean(early)
        verdicts.append((key, grows))
        print(f"  {key:8} first {first:.1f} last {last:.1f} max {max(values):.1f} {unit}; "
              f"slope {slope if slope is None else round(slope, 2)} {unit}/h: "
              f"{'GROWS' if grows else 'bounded'}")
    if lives:
        print("  before each kill -9 (RSS KiB, fds, threads): "
              + "; ".join(f"{r}, {f}, {t}" for r, f, t in lives))
    for key in ["p99_warm", "p99_cold", "p99_blob"]:
        values = [s[key] for s in samples if s[key] is not None]
        if values:
            print(f"  {key:8} median of windows {percentile(values, 0.5):.3f} s, worst window {max(values):.3f} s")
    print(f"  counts: {json.dumps(run.counts)}; errors by kind: {json.dumps(run.error_kinds)}")

    verify = subprocess.run([BIN, "verify", "--storage-path", storage, "--pkgs-path", FIXTURE],
                            capture_output=True, text=True)
    print(f"  integrity: nixery verify exit {verify.returncode}: "
          f"{(verify.stdout + verify.stderr).strip().splitlines()[-1] if (verify.stdout + verify.stderr).strip() else ''}")
    ok = verify.returncode == 0 and run.counts["bad_digests"] == 0
    growth = [k for k, g in verdicts if g]
    print(f"  verdict: {'no growth' if not growth else 'growth in ' + ', '.join(growth)}; "
          f"integrity {'ok' if ok else 'FAILED'}")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok and not growth else 1)


if __name__ == "__main__":
    main()
