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
SEED = os.path.join(ROOT, "target", "release", "examples", "seed_cache")
# BENCH_SEED=0 skips seeding (e.g. for a binary whose database layout the
# seeder cannot write).
SEEDED_IMAGES = int(os.environ.get("BENCH_SEED", "10000"))
PULL_LAYERS = 30
PULLS = 3
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
        if not os.path.isdir(p) or os.path.islink(p):
            total += os.lstat(p).st_size if os.path.isfile(p) and not os.path.islink(p) else 0
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


def cpu_seconds(pid):
    """User plus system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


class Server:
    """The release binary on a storage path; start-up timed to the first
    `/v2/` 200."""

    def __init__(self, storage, extra=()):
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
            *extra,
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
    cpu_before = cpu_seconds(server.proc.pid)
    start = time.monotonic()
    server.get(f"/v2/{image}/manifests/latest")
    secs = time.monotonic() - start
    cpu = cpu_seconds(server.proc.pid) - cpu_before
    hwm = status_kb(server.proc.pid, "VmHWM") / 1024
    server.stop()
    say(
        f"packing, {label}, cold manifest time",
        f"{mb / secs:.0f} MB/s ({mb:.0f} MB closure in {secs:.2f} s; server CPU {cpu:.2f} s), "
        f"peak RSS {hwm:.0f} MB",
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
    p99 = stats["latencyPercentiles"].get("p99")
    codes = stats.get("statusCodeDistribution", {})
    errors = stats.get("errorDistribution", {})
    if p99 is None:
        return f"no latencies: status codes {codes}, errors {errors}"
    return f"{rps:,.0f} req/s, p99 {p99 * 1000:.1f} ms, status codes {codes}, errors {errors}"


def pull_times(sock, image):
    """Seconds per `docker pull` of `image`, each into an empty image store."""
    times = []
    for _ in range(PULLS):
        start = time.monotonic()
        subprocess.run(["docker", "-H", sock, "pull", "-q", image], check=True, capture_output=True)
        times.append(time.monotonic() - start)
        subprocess.run(["docker", "-H", sock, "rmi", image], check=True, capture_output=True)
    times.sort()
    return times


def distribution_copy(work, image):
    """Starts docker-registry (distribution 2.8) on a free port and copies
    `image` into it with skopeo; the process and the copy's name."""
    root = os.path.join(work, "distribution")
    os.makedirs(root)
    port = free_port()
    config = os.path.join(work, "distribution.yml")
    with open(config, "w") as f:
        f.write(
            f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
    registry = subprocess.Popen(
        ["docker-registry", "serve", config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    mirrored = f"127.0.0.1:{port}/manydeps"
    subprocess.run(
        [
            "skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
            f"docker://{image}", f"docker://{mirrored}",
        ],
        check=True,
        capture_output=True,
    )
    return registry, mirrored


def docker_pull_figure(work):
    """`docker pull` of a cached image of PULL_LAYERS layers into a private
    dockerd (its own data root, so nothing is cached on the client side)."""
    storage = os.path.join(work, "pull")
    # manydeps has 121 store paths. Every one popular gives each a layer of
    # its own, up to the budget: PULL_LAYERS - 1 layers, plus the symlink layer.
    out = subprocess.run(
        ["nix-store", "-qR", nix_build("manydeps")], check=True, capture_output=True, text=True
    )
    popularity = os.path.join(work, "popularity.json")
    with open(popularity, "w") as f:
        json.dump({os.path.basename(p).split("-", 1)[1]: 1000 for p in out.stdout.split()}, f)
    server = Server(
        storage,
        # The original's strategy gives every popular path a layer of its own.
        ["--layer-budget", str(PULL_LAYERS - 1), "--popularity-url", popularity, "--layering", "nixery"],
    )
    manifest = json.loads(server.get("/v2/manydeps/manifests/latest"))
    layers = len(manifest["layers"])
    d = os.path.join(work, "d")
    os.makedirs(d)
    sock = f"unix://{d}/docker.sock"
    dockerd = subprocess.Popen(
        [
            "dockerd", "--data-root", f"{d}/data", "--exec-root", f"{d}/exec",
            "--pidfile", f"{d}/pid", "--host", sock, "--bridge", "none",
            "--iptables=false", "--ip-masq=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(f"{d}.log", "wb"),
    )
    try:
        for _ in range(600):
            if subprocess.run(["docker", "-H", sock, "info"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        image = f"127.0.0.1:{server.port}/manydeps"
        # The same image in distribution (docker-registry), for comparison.
        registry, mirrored = distribution_copy(work, image)
        try:
            for label, pulled in [("nixery", image), ("distribution 2.8", mirrored)]:
                times = pull_times(sock, pulled)
                say(
                    f"docker pull of a cached {layers}-layer image from {label} (private dockerd)",
                    f"{times[len(times) // 2]:.2f} s median of {PULLS} ({', '.join(f'{t:.2f}' for t in times)})",
                    f"dockerd --data-root {d}/data --host {sock} ...; docker -H {sock} pull {pulled}; docker rmi",
                )
        finally:
            registry.terminate()
            registry.wait(timeout=30)
    finally:
        dockerd.terminate()
        try:
            dockerd.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dockerd.kill()
        server.stop()


def download(url, results):
    got = 0
    with urllib.request.urlopen(url, timeout=900) as r:
        while True:
            piece = r.read(1 << 20)
            if not piece:
                break
            got += len(piece)
    results.append(got)


def parallel_downloads(url, expected):
    """DOWNLOADS clients fetch `url` at once; MB/s in all."""
    results = []
    threads = [threading.Thread(target=download, args=(url, results)) for _ in range(DOWNLOADS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.monotonic() - start
    assert results == [expected] * DOWNLOADS, results
    return DOWNLOADS * expected / 1e6 / secs


def nix_cache_figures(work):
    """The Nix binary cache: making the NAR of the 110 MB `big` path (the
    first narinfo request), DOWNLOADS clients fetching it, and narinfo
    requests with oha."""
    keys = os.path.join(work, "keys")
    subprocess.run([BIN, "nix-cache", "key", "--name", "bench-1", "--dir", keys], check=True, capture_output=True)
    storage = os.path.join(work, "nix-cache")
    server = Server(storage, ["--nix-cache-key", os.path.join(keys, "bench-1.secret")])
    try:
        server.get("/v2/big/manifests/latest")
        big = nix_build("big")
        narinfo = f"/nix-cache/{os.path.basename(big)[:32]}.narinfo"
        start = time.monotonic()
        text = server.get(narinfo).decode()
        made = time.monotonic() - start
        fields = dict(line.split(": ", 1) for line in text.splitlines())
        size = int(fields["FileSize"])
        say(
            "Nix cache: first narinfo of `big` (makes its NAR)",
            f"{made:.2f} s for {int(fields['NarSize']) / 1e6:.0f} MB of NAR ({size / 1e6:.0f} MB zstd)",
            f"{server.command} & curl {server.base}{narinfo}",
        )
        nar = f"{server.base}/nix-cache/{fields['URL']}"
        say(
            f"Nix cache: {DOWNLOADS} connections download the NAR of `big`",
            f"{parallel_downloads(nar, size):.0f} MB/s in all",
            f"{DOWNLOADS} x GET {nar}",
        )
        url = server.base + narinfo
        say(
            f"Nix cache: narinfo GET, {CONNECTIONS} connections",
            oha(url),
            f"oha -z {OHA_SECONDS}s -c {CONNECTIONS} {url}",
        )
    finally:
        server.stop()


def main():
    if not os.access(BIN, os.X_OK):
        sys.exit(f"{BIN} missing: run scripts/bench, which builds it")
    work = tempfile.mkdtemp(prefix="nixery-bench-")
    if os.environ.get("BENCH_ONLY") == "nix-cache":
        try:
            print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
            nix_cache_figures(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        storage = pack_figure("incompressible closure (hello + 110 MB random)", "hello/big", ["hello", "big"], work)
        pack_figure("text closure (hello + 154 MB text)", "hello/text", ["hello", "text"], work)

        # A fresh process on the warm storage, with many more images cached:
        # start-up, idle RSS, downloads, then request rates.
        if SEEDED_IMAGES:
            subprocess.run([SEED, storage, str(SEEDED_IMAGES)], check=True, capture_output=True)
        server = Server(storage)
        say(
            f"start-up to first /v2/ 200, {SEEDED_IMAGES:,} images cached",
            f"{server.startup * 1000:.0f} ms",
            f"{SEED} {storage} {SEEDED_IMAGES}; time from exec of {server.command} to a 200 from /v2/",
        )
        time.sleep(1)
        rss = status_kb(server.proc.pid, "VmRSS") / 1024
        say(
            f"RSS idle, {SEEDED_IMAGES:,} images cached",
            f"{rss:.1f} MB",
            "grep VmRSS /proc/<pid>/status, 1 s after start-up",
        )

        manifest = json.loads(server.get("/v2/hello/big/manifests/latest"))
        largest = max(manifest["layers"], key=lambda l: l["size"])
        blob = f"{server.base}/v2/hello/big/blobs/{largest['digest']}"
        rate = parallel_downloads(blob, largest["size"])
        hwm = status_kb(server.proc.pid, "VmHWM") / 1024
        say(
            f"peak RSS while {DOWNLOADS} connections download a {largest['size'] / 1e6:.0f} MB blob",
            f"{hwm:.0f} MB (VmHWM; {rate:.0f} MB/s in all)",
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
        nix_cache_figures(work)
        docker_pull_figure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
