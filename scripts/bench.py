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
PULLS = int(os.environ.get("BENCH_PULLS", "5"))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pkgs")
OHA_SECONDS = int(os.environ.get("BENCH_OHA_SECONDS", "10"))
CONNECTIONS = 64
DOWNLOADS = 8
# BENCH_ONLY=sbom,nix-cache,eval,serve,docker runs only those parts: `sbom` (a cold
# pull with and without bills of materials; any binary), `nix-cache` (the
# Nix binary cache: making and serving the NAR of `big`, narinfo req/s),
# `eval` (the
# evaluation cache on the costly package set), `serve` (packing, start-up,
# idle RSS, downloads beside nginx, request rates, and `parallel`),
# `parallel` (4 identical cold pulls at once against one), `docker`
# (docker pull beside distribution). All by default. `bench.py admin` runs only the
# admin page's figures.
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))


def wanted(part):
    return not ONLY or part in ONLY


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

    def __init__(self, storage, extra=(), source=("--pkgs-path", FIXTURE)):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [
            BIN,
            "--port", str(self.port),
            "--listen-address", "127.0.0.1",
            *source,
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


def sbom_figure(work):
    """Cold pull of hello/big with the bills of materials made after the
    build and with --no-sbom, alternating, on fresh storage each; then the
    documents' sizes for fixture images."""
    times = {"with": [], "without (--no-sbom)": []}
    for round_ in range(2):
        for label, extra in (("without (--no-sbom)", ("--no-sbom",)), ("with", ())):
            storage = os.path.join(work, f"sbom-{round_}-{label.split()[0]}")
            server = Server(storage, extra)
            start = time.monotonic()
            server.get("/v2/hello/big/manifests/latest")
            times[label].append(time.monotonic() - start)
            server.stop()
    for label, secs in times.items():
        say(
            f"cold manifest GET of hello/big, bills of materials {label}",
            ", ".join(f"{s:.2f} s" for s in secs),
            f"{BIN} ... {'--no-sbom ' if 'no-sbom' in label else ''}& curl .../v2/hello/big/manifests/latest (fresh storage each)",
        )
    server = Server(os.path.join(work, "sbom-sizes"))
    for image in ("hello", "shell/hello", "hello/big", "manydeps"):
        req = urllib.request.Request(
            f"{server.base}/v2/{image}/manifests/latest",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        with urllib.request.urlopen(req, timeout=900) as r:
            digest = r.headers["Docker-Content-Digest"]
        listed = json.loads(server.get(f"/v2/{image}/referrers/{digest}"))
        sizes = []
        for m in listed["manifests"]:
            artifact = json.loads(server.get(f"/v2/{image}/manifests/{m['digest']}"))
            sizes.append(f"{m['artifactType'].split('/')[-1]} {artifact['layers'][0]['size']:,} B")
        say(f"bill of materials sizes, {image}", ", ".join(sizes), f"GET /v2/{image}/referrers/{digest}, then each artifact manifest")
    server.stop()


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


def pull_time(sock, image):
    """Seconds for one `docker pull` of `image` into an empty image store
    (the image is removed again after)."""
    start = time.monotonic()
    subprocess.run(["docker", "-H", sock, "pull", "-q", image], check=True, capture_output=True)
    secs = time.monotonic() - start
    subprocess.run(["docker", "-H", sock, "rmi", image], check=True, capture_output=True)
    return secs


def interleaved_pulls(sock, images):
    """Pull times of each of `images` (label -> image), PULLS each after
    one unmeasured pull of each, in rounds whose order turns, so that the
    shared machine's load and dockerd's own warming fall on all alike."""
    for image in images.values():
        pull_time(sock, image)
    times = {label: [] for label in images}
    labels = list(images)
    for r in range(PULLS):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            times[label].append(pull_time(sock, images[label]))
    return {label: sorted(t) for label, t in times.items()}


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
            pulled = {"nixery": image, "distribution 2.8": mirrored}
            times = interleaved_pulls(sock, pulled)
            median = {label: t[len(t) // 2] for label, t in times.items()}
            for label, t in times.items():
                say(
                    f"docker pull of a cached {layers}-layer image from {label} (private dockerd)",
                    f"{median[label]:.2f} s median of {PULLS} ({', '.join(f'{x:.2f}' for x in t)}); "
                    f"{median[label] / median['distribution 2.8']:.2f}x distribution",
                    f"dockerd --data-root {d}/data --host {sock} ...; docker -H {sock} pull {pulled[label]}; docker rmi; "
                    f"one unmeasured pull each, then {PULLS} rounds alternating the two",
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


def costly_set(work):
    """A git repository holding benches/costly-pkgs and the nixpkgs library
    it is built from; its one commit."""
    lib = os.environ.get("BENCH_NIXPKGS_LIB") or os.path.join(ROOT, "..", "shared", "vendor", "nixpkgs-lib")
    if not os.path.isdir(os.path.join(lib, "lib")):
        sys.exit(f"{lib}/lib missing: set BENCH_NIXPKGS_LIB to an unpacked nixpkgs library")
    repo = os.path.join(work, "costly-repo")
    os.makedirs(repo)
    shutil.copy(os.path.join(ROOT, "benches", "costly-pkgs", "default.nix"), repo)
    shutil.copytree(os.path.join(lib, "lib"), os.path.join(repo, "lib"))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-C", repo]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "costly set"], check=True)
    rev = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    return repo, rev.stdout.strip()


def eval_cache_figure(work):
    """A cold pull of a new combination of packages already evaluated, on a
    package set as costly to evaluate as nixpkgs: from a git commit (the
    evaluation cache applies) and from the same files as a local path (it
    does not)."""
    repo, rev = costly_set(work)
    before = ["pkg-5-1/pkg-6-2", "pkg-7-3/pkg-9-4"]
    # Each new: no manifest cached, every package known.
    combinations = ["pkg-5-1/pkg-7-3", "pkg-6-2/pkg-9-4", "pkg-5-1/pkg-9-4"]
    for label, source, tag in [
        ("with the evaluation cache (git source, by commit)", ("--pkgs-repo", f"file://{repo}"), rev),
        ("without it (the same files as a local path)", ("--pkgs-path", repo), "latest"),
    ]:
        storage = os.path.join(work, f"costly-{source[0].strip('-')}")
        server = Server(storage, source=source)
        for image in before:
            server.get(f"/v2/{image}/manifests/{tag}")
        pulls = []
        for combination in combinations:
            cpu_before = cpu_seconds(server.proc.pid)
            start = time.monotonic()
            server.get(f"/v2/{combination}/manifests/{tag}")
            secs = time.monotonic() - start
            cpu = cpu_seconds(server.proc.pid) - cpu_before
            build = json.loads(server.get("/api/status"))["builds"][0]
            pulls.append((secs, cpu, build["evaluated"], build["nix_processes"]))
        server.stop()
        secs, cpu, evaluated, processes = sorted(pulls)[len(pulls) // 2]
        say(
            f"cold pull of a new combination of known packages, costly set, {label}",
            f"{secs * 1000:.0f} ms median of {len(pulls)} "
            f"({', '.join(f'{p[0] * 1000:.0f}' for p in pulls)} ms), {evaluated} names evaluated, "
            f"{processes} Nix processes (server CPU {cpu:.2f} s)",
            f"{server.command}; GET /v2/{{{','.join(before)}}}/manifests/{tag}; "
            f"then each of curl {server.base}/v2/{{{','.join(combinations)}}}/manifests/{tag}",
        )


class RssSampler:
    """The largest RssAnon of a process, sampled every 10 ms until stopped."""

    def __init__(self, pid):
        self.pid, self.peak, self.running = pid, 0, True
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self):
        while self.running:
            self.peak = max(self.peak, status_kb(self.pid, "RssAnon"))
            time.sleep(0.01)

    def stop(self):
        self.running = False
        self.thread.join()
        return self.peak / 1024


def run_threads(threads):
    """Starts the threads at once and waits for all; seconds taken."""
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - start


def downloads(url, size, n):
    """Downloads `url` with n curl processes at once; MB/s in all. curl
    (not Python threads, which share one interpreter lock) so that the
    client is not what limits the figure."""
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            ["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    got = [int(p.communicate()[0] or 0) for p in procs]
    secs = time.monotonic() - start
    assert got == [size] * n, got
    return n * size / 1e6 / secs


ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def interleaved_rates(urls, size):
    """MB/s of DOWNLOADS downloads from each of `urls` (label -> URL),
    median of ROUNDS rounds; each round visits every URL, in an order that
    turns each round, so that load changes on the shared machine fall on
    all alike."""
    rates = {label: [] for label in urls}
    labels = list(urls)
    for r in range(ROUNDS):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            rates[label].append(downloads(urls[label], size, DOWNLOADS))
    return {label: sorted(v)[len(v) // 2] for label, v in rates.items()}


class Nginx:
    """Debian's nginx (`sendfile on`) serving a hard link of the same blob
    file, for comparison."""

    def __init__(self, work, storage, layer):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(nginx, os.X_OK):
            sys.exit("nginx missing: run scripts/install-deps --bench")
        hex_digest = layer["digest"].split(":", 1)[1]
        path = None
        for d, _, files in os.walk(os.path.join(storage, "blobs")):
            if hex_digest in files:
                path = os.path.join(d, hex_digest)
        if path is None:
            sys.exit(f"blob {hex_digest} not found under {storage}/blobs")
        root = os.path.join(work, "nginx")
        os.makedirs(os.path.join(root, "www"))
        os.makedirs(os.path.join(root, "tmp"))
        os.link(path, os.path.join(root, "www", "blob"))
        port = free_port()
        self.conf = os.path.join(root, "nginx.conf")
        with open(self.conf, "w") as f:
            # As root, nginx's workers would run as nobody, who cannot read
            # the bench's private temporary directory.
            user = "user root;\n" if os.geteuid() == 0 else ""
            f.write(f"""daemon off;
{user}worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path {root}/tmp;
  proxy_temp_path {root}/tmp;
  fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp;
  scgi_temp_path {root}/tmp;
  server {{
    listen 127.0.0.1:{port};
    root {root}/www;
  }}
}}
""")
        self.proc = subprocess.Popen([nginx, "-c", self.conf, "-p", root], stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}/blob"
        for _ in range(500):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.01)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def linked_copy(storage, to):
    """A copy of a stopped server's storage for a second server: blobs
    hard-linked (they never change in place), everything else copied."""
    def copy(src, dst):
        if os.sep + "blobs" + os.sep in src:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
    shutil.copytree(storage, to, symlinks=True, copy_function=copy)
    return to


def read_all(server, path, buf):
    """GETs `path` into `buf` (grown as needed), reusing it: the client
    allocates nothing per blob, and the GIL is free while it waits on the
    socket. Returns the number of bytes."""
    with urllib.request.urlopen(server.base + path, timeout=900) as r:
        got = 0
        while True:
            if got == len(buf):
                buf.extend(bytes(len(buf)))
            with memoryview(buf) as view:
                n = r.readinto(view[got:])
            if not n:
                return got
            got += n


def cold_pull(server, image, times):
    """A client's cold pull: the manifest, then every blob it names; adds
    (seconds to the manifest, seconds to the last blob) to `times`."""
    start = time.monotonic()
    manifest = json.loads(server.get(f"/v2/{image}/manifests/latest"))
    got_manifest = time.monotonic() - start
    buf = bytearray(1 << 20)
    for blob in [manifest["config"], *manifest["layers"]]:
        read_all(server, f"/v2/{image}/blobs/{blob['digest']}", buf)
    times.append((got_manifest, time.monotonic() - start))


PARALLEL_ROUNDS = int(os.environ.get("BENCH_PARALLEL_ROUNDS", "9"))


def parallel_cold_round(work, image, n, round_no):
    """n identical cold pulls at once on fresh storage: (seconds in all,
    seconds until the last client had its manifest, server CPU seconds)."""
    storage = os.path.join(work, f"parallel-{n}-{round_no}")
    server = Server(storage)
    times = []
    cpu_before = cpu_seconds(server.proc.pid)
    wall = run_threads([threading.Thread(target=cold_pull, args=(server, image, times)) for _ in range(n)])
    cpu = cpu_seconds(server.proc.pid) - cpu_before
    server.stop()
    shutil.rmtree(storage, ignore_errors=True)
    assert len(times) == n, f"{n - len(times)} pulls failed; see {storage}.log"
    return wall, max(m for m, _ in times), cpu, server.command


def parallel_cold_figure(work, image="hello/coreutils/bash"):
    """One cold pull against 4 identical ones at once, each on fresh
    storage (they share one build, then each client downloads every blob).
    The shared build's time swings with the machine's load far more than
    the downloads add, so PARALLEL_ROUNDS rounds run the two side by side
    (alternating which goes first) and the figure is the median of the
    rounds' ratios; each round is also split into the time to the last
    client's manifest and the rest (the blobs)."""
    rounds = {1: [], 4: []}
    for r in range(PARALLEL_ROUNDS):
        for n in ((1, 4) if r % 2 == 0 else (4, 1)):
            rounds[n].append(parallel_cold_round(work, image, n, r))
    ratios = [a[0] / b[0] for a, b in zip(rounds[4], rounds[1])]
    mid = lambda xs: sorted(xs)[len(xs) // 2]
    split = lambda n: ", ".join(f"{x[1]:.2f}+{x[0] - x[1]:.2f}" for x in rounds[n])
    say(
        f"4 identical cold pulls of {image} at once against one",
        f"{mid(ratios):.2f}x, median of {PARALLEL_ROUNDS} rounds "
        f"({', '.join(f'{x:.2f}' for x in ratios)}); "
        f"{mid([x[0] for x in rounds[4]]):.2f} s against {mid([x[0] for x in rounds[1]]):.2f} s median; "
        f"manifest+blobs, 4 at once: {split(4)} s; one: {split(1)} s; "
        f"server CPU {mid([x[2] for x in rounds[4]]):.2f} s against {mid([x[2] for x in rounds[1]]):.2f} s",
        f"{rounds[1][0][3]}; n x (GET manifest, then every blob into a reused buffer), "
        f"n = 1 and 4, each on fresh storage, {PARALLEL_ROUNDS} rounds alternating the order",
    )


def timed_get(server, path, runs):
    """Median and slowest time of `runs` GETs of `path`, and its size."""
    times = []
    for _ in range(runs):
        start = time.monotonic()
        body = server.get(path)
        times.append(time.monotonic() - start)
    times.sort()
    return times[len(times) // 2], times[-1], len(body)


ADMIN_RUNS = 20


def admin_page_figures(server):
    """The admin page with the seeded images: the first page, a search,
    a page deep in the list and one image's page; render time as the
    client sees it."""
    for label, path in [
        # While the start-up check of stored manifests still reads them.
        ("/ right after start-up", "/"),
        ("search", "/?q=seeded/99"),
        ("page 150 of the image list", "/?page=150"),
        # Reads every manifest served, for layer sharing (and the image
        # records for the eviction rank only under a storage limit).
        ("of one image", "/images/seeded/5000"),
        ("/", "/"),
    ]:
        median, slowest, size = timed_get(server, path, ADMIN_RUNS)
        say(
            f"admin page {label}, {SEEDED_IMAGES:,} images cached",
            f"{median * 1000:.1f} ms median, {slowest * 1000:.1f} ms slowest of {ADMIN_RUNS}; {size / 1000:.0f} KB",
            f"{ADMIN_RUNS} x GET {server.base}{path}",
        )


def admin_only():
    """`bench.py admin`: only the admin page figures, on a storage path
    seeded with images (and nothing built)."""
    work = tempfile.mkdtemp(prefix="nixery-bench-admin-")
    try:
        storage = os.path.join(work, "storage")
        subprocess.run([SEED, storage, str(SEEDED_IMAGES)], check=True, capture_output=True)
        server = Server(storage)
        try:
            admin_page_figures(server)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
            f"{downloads(nar, size, DOWNLOADS):.0f} MB/s in all",
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
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    if sys.argv[1:] == ["admin"]:
        admin_only()
        return
    work = tempfile.mkdtemp(prefix="nixery-bench-")
    try:
        if wanted("sbom"):
            sbom_figure(work)
        if wanted("eval"):
            eval_cache_figure(work)
        if wanted("serve") or wanted("parallel"):
            parallel_cold_figure(work)
        if wanted("serve"):
            serve_figures(work)
        if wanted("nix-cache"):
            nix_cache_figures(work)
        if wanted("docker"):
            docker_pull_figure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def serve_figures(work):
    storage = pack_figure("incompressible closure (hello + 110 MB random)", "hello/big", ["hello", "big"], work)
    sendfile_storage = linked_copy(storage, storage + "-sendfile")
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
    admin_page_figures(server)

    manifest = json.loads(server.get("/v2/hello/big/manifests/latest"))
    largest = max(manifest["layers"], key=lambda l: l["size"])
    path = f"/v2/hello/big/blobs/{largest['digest']}"
    size = largest["size"]
    # The same blob from a second server handing the file to the kernel
    # (--sendfile), and from nginx; rounds interleaved among the three.
    kernel = Server(sendfile_storage, ["--sendfile"])
    nginx = Nginx(work, storage, largest)
    urls = {"mapped": server.base + path, "sendfile": kernel.base + path, "nginx": nginx.url}
    servers = {"mapped": server, "sendfile": kernel}
    try:
        # Warm the page cache, so all send from memory.
        downloads(urls["nginx"], size, 1)
        # The downloads' own peak: VmHWM restarts from the RSS now (what the
        # admin pages above left is reported beside it).
        before = {}
        for label, s in servers.items():
            with open(f"/proc/{s.proc.pid}/clear_refs", "w") as f:
                f.write("5")
            before[label] = status_kb(s.proc.pid, "RssAnon") / 1024
        samplers = {label: RssSampler(s.proc.pid) for label, s in servers.items()}
        cpu = {label: cpu_seconds(s.proc.pid) for label, s in servers.items()}
        rates = interleaved_rates(urls, size)
        for label, how in [
            ("mapped", "mapped 1 MiB windows written by us (the default)"),
            ("sendfile", "sendfile (--sendfile)"),
        ]:
            proc = servers[label]
            anon = samplers[label].stop()
            hwm = status_kb(proc.proc.pid, "VmHWM") / 1024
            used = (cpu_seconds(proc.proc.pid) - cpu[label]) / ROUNDS
            say(
                f"{DOWNLOADS} connections download a {size / 1e6:.0f} MB blob, {how}",
                f"{rates[label]:.0f} MB/s in all (median of {ROUNDS} rounds); {rates[label] / rates['nginx']:.2f}x nginx; "
                f"server CPU {used:.2f} s a round; "
                f"peak RSS {hwm:.0f} MB (VmHWM, reset before), peak RssAnon {anon:.1f} MB "
                f"(sampled every 10 ms; {before[label]:.1f} MB before)",
                f"{proc.command}; {DOWNLOADS} x curl -o /dev/null {proc.base}{path} at once",
            )
        say(
            f"the same {DOWNLOADS} downloads from Debian's nginx (sendfile on), rounds interleaved with the two above",
            f"{rates['nginx']:.0f} MB/s in all (median of {ROUNDS} rounds); mapped/sendfile {rates['mapped'] / rates['sendfile']:.2f}x",
            f"nginx -c {nginx.conf}; {DOWNLOADS} x curl -o /dev/null {nginx.url} at once",
        )
    finally:
        nginx.stop()
        kernel.stop()
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
    time.sleep(5)
    say(
        "RSS idle after the load above",
        f"{status_kb(server.proc.pid, 'VmRSS') / 1024:.1f} MB (RssAnon {status_kb(server.proc.pid, 'RssAnon') / 1024:.1f} MB)",
        "grep -E 'VmRSS|RssAnon' /proc/<pid>/status, 5 s after the last request",
    )
    server.stop()


if __name__ == "__main__":
    main()
