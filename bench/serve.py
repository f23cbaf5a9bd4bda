"""Load test of `icm serve` on loopback: dynamic batching against one-at-a-time.

    python bench/serve.py [--clients 32] [--seconds 10] [--backends detector,hf]
    python bench/serve.py --backends detector-full --sweep 1,2,4,8,16,32 --seconds 6

``detector-full`` (issue 23) serves icm-sexy with every permissive offline source
(``ICM_DETECTOR_SOURCES=open_nsfw,rapidocr,efficientnet_lite0``; NudeNet is AGPL and left
out), and every request's image is distinct (600 JPEGs of the photos, a few pixels in a
corner changed) with the server's evidence cache off (``ICM_EVIDENCE_CACHE=0``), so each
request is judged in full as a new upload would be. Before the load it measures the batched sources' limit in this
process: each source alone, batched (``--max-batch-size`` images a call), on the photos;
1000 / (sum of their ms per image) is the most requests/s the server could do if it did
nothing but run them. ``--sweep`` runs the client counts given, batching on, and prints
p99 per count and the largest count whose p99 stays under 1 s.

For each backend (the offline detector; a tiny LLaVA built locally with
tests/tiny_models.py and loaded by path through the hf backend) and for batching on and
off, it starts the real server (``python -m icm.cli.main serve`` on 127.0.0.1, a fresh
SQLite store, images kept), warms it up, then runs N concurrent clients that post the
bundled photos (multipart, field ``image``) back to back for a bounded time. It prints
requests/s, p50/p99 latency, errors (any non-200 answer or transport error; must be 0)
and the mean batch size the server reports in /metrics. Exit status 1 if any request
failed. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "examples" / "images").glob("*.jpg"))


@dataclass
class Result:
    backend: str
    batching: bool
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    mean_batch: float
    first_error: str | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return 1000 * xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PERMISSIVE_SOURCES = "open_nsfw,rapidocr,efficientnet_lite0"
FULL_ENV = {"ICM_DETECTOR_SOURCES": PERMISSIVE_SOURCES, "ICM_EVIDENCE_CACHE": "0"}
DISTINCT = 600  # distinct request bodies for detector-full


def start_server(args: list[str], workdir: Path, log: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env.pop("ICM_API_KEYS", None)
    cmd = [sys.executable, "-m", "icm.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--db", str(workdir / "decisions.sqlite"), "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mean_batch_size(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = re.search(r"^icm_batch_size_sum ([0-9.e+]+)$", text, re.M)
    count = re.search(r"^icm_batch_size_count ([0-9.e+]+)$", text, re.M)
    if not total or not count or float(count.group(1)) == 0:
        return float("nan")
    return float(total.group(1)) / float(count.group(1))


def distinct_bodies(n: int) -> list[tuple[str, bytes]]:
    """``n`` JPEGs of the photos whose pixels all differ (a few pixels in a corner encode the
    index): no two requests of a batch are the same image, as with real uploads."""
    from io import BytesIO

    from PIL import Image

    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    out = []
    for k in range(n):
        im = photos[k % len(photos)].copy()
        for bit in range(16):
            im.putpixel((bit, 0), (255, 255, 255) if (k >> bit) & 1 else (0, 0, 0))
        buf = BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append((f"{PHOTOS[k % len(PHOTOS)].stem}-{k}.jpg", buf.getvalue()))
    return out


async def load(
    url: str, clients: int, seconds: float, warmup: int, unique: bool = False
) -> tuple[int, float, list[float], int, str | None]:
    bodies = distinct_bodies(DISTINCT) if unique else [(p.name, p.read_bytes()) for p in PHOTOS]
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for i in range(warmup):  # model warm-up, first allocations
            name, data = bodies[i % len(bodies)]
            (await client.post("/v1/moderate", files={"image": (name, data, "image/jpeg")})).raise_for_status()
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(k: int) -> None:
            nonlocal errors, first_error
            i = k
            while time.perf_counter() < deadline:
                name, data = bodies[i % len(bodies)]
                i += clients if unique else 1  # distinct bodies: each client its own share of them
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/moderate", files={"image": (name, data, "image/jpeg")})
                    ok = r.status_code == 200
                    why = None if ok else f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, why = False, f"{type(exc).__name__}: {exc}"
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                    first_error = first_error or why

        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    return len(latencies), elapsed, latencies, errors, first_error


def build_tiny_hf(workdir: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tiny_llava

    return build_tiny_llava(workdir / "tiny-llava")


def sources_limit(batch: int) -> tuple[float, dict[str, float]]:
    """Requests/s if the server only ran each permissive source once per image, batched, one
    source after the other: 1000 / (sum of ms per image), measured here on the photos."""
    sys.path.insert(0, str(ROOT / "src"))
    from io import BytesIO

    from PIL import Image

    from icm.moderation.evidence.sources import builtin_source

    batch_images = [Image.open(BytesIO(data)).convert("RGB") for _, data in distinct_bodies(batch)]
    per: dict[str, float] = {}
    for name in PERMISSIVE_SOURCES.split(","):
        # alone: every core for its session (said explicitly: onnxruntime's default can exceed the cores this box lends)
        src = builtin_source(name, batch_size=batch, intra_op_num_threads=os.cpu_count() or 1)
        src.run(batch_images[:1])
        times = []
        for _ in range(5):  # the best of five: the neighbours only ever slow it down
            t0 = time.perf_counter()
            src.run(batch_images)
            times.append((time.perf_counter() - t0) * 1000 / batch)
        per[name] = min(times)
        src.close()
    return 1000 / sum(per.values()), per


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sweep(args: argparse.Namespace, backends: dict[str, list[str]], counts: list[int], work: Path) -> int:
    """One server per backend, batching on; load at each client count in turn."""
    failed = False
    for label, backend_args in backends.items():
        full = label == "detector-full"
        limit, per = sources_limit(args.max_batch_size) if full else (float("nan"), {})
        if full:
            shown = ", ".join(f"{k} {v:.1f}" for k, v in per.items())
            print(f"batched sources' limit: {limit:.1f} req/s ({shown} ms/image, batches of {args.max_batch_size})", flush=True)
        run_dir = work / f"{label}-sweep"
        run_dir.mkdir()
        flags = [*backend_args, "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms), "--batching"]
        proc, url = start_server(flags, run_dir, run_dir / "server.log", FULL_ENV if full else None)
        rows: list[tuple[int, Result, float]] = []
        try:
            for c in counts:
                load_avg = os.getloadavg()[0]
                server0, client0 = cpu_seconds(proc.pid), time.process_time()
                n, elapsed, lat, errors, first_error = asyncio.run(load(url, c, args.seconds, args.warmup, full))
                server_ms = (cpu_seconds(proc.pid) - server0) * 1000 / max(1, n + args.warmup)
                client_ms = (time.process_time() - client0) * 1000 / max(1, n + args.warmup)
                r = Result(label, True, n, elapsed, lat, errors, float("nan"), first_error)
                rows.append((c, r, load_avg))
                failed |= errors > 0
                print(f"  {label}: {c:3d} clients {r.rps:7.1f} req/s p50 {r.pct(0.5):7.1f} ms p99 {r.pct(0.99):7.1f} ms "
                      f"errors {errors}; CPU per request: server {server_ms:.1f} ms, clients {client_ms:.1f} ms "
                      f"(load average before {load_avg:.1f})", flush=True)
            mb = mean_batch_size(url)
        finally:
            stop_server(proc)
        under = [c for c, r, _ in rows if r.pct(0.99) < 1000]
        best = max(r.rps for _, r, _ in rows)
        print(f"{label}: largest client count with p99 < 1 s: {max(under) if under else 'none'}; "
              f"best {best:.1f} req/s; mean batch {mb:.2f}")
        if full:
            print(f"{label}: best throughput / batched sources' limit = {best / limit:.2f} (goal >= 0.80)")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per configuration")
    parser.add_argument("--backends", default="detector,hf", help="comma-separated: detector, hf")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="hf server's --torch-threads (0: torch's default; on a busy 2-core box its OpenMP "
                             "threads spin against the server's own)")
    parser.add_argument("--sweep", default=None,
                        help="comma-separated client counts (batching on): p99 per count, the largest with p99 < 1 s")
    args = parser.parse_args()
    counts = [int(c) for c in args.sweep.split(",")] if args.sweep else [args.clients]
    if args.seconds > 120 or max(counts) > 64:
        parser.error("keep the load bounded: --seconds <= 120 and --clients <= 64")

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="icm-bench-serve-") as tmp:
        work = Path(tmp)
        backends: dict[str, list[str]] = {}
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if name in ("detector", "detector-full"):
                backends[name] = ["--backend", "detector"]
            elif name == "hf":
                backends["hf (tiny llava)"] = ["--backend", "hf", "--model", str(build_tiny_hf(work))]
                if args.torch_threads:
                    backends["hf (tiny llava)"] += ["--torch-threads", str(args.torch_threads)]
            else:
                parser.error(f"unknown backend {name!r}")
        print(
            f"bench/serve.py: {args.clients} clients x {args.seconds:.0f} s per configuration on 127.0.0.1, "
            f"photos {[p.name for p in PHOTOS]}, max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms, "
            f"{os.cpu_count()} CPUs, hf --torch-threads {args.torch_threads or 'default'}",
            flush=True,
        )
        if args.sweep:
            return sweep(args, backends, counts, work)
        for label, backend_args in backends.items():
            for batching in (True, False):
                run_dir = work / f"{label.split()[0]}-{'on' if batching else 'off'}"
                run_dir.mkdir()
                flags = [*backend_args, "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
                         "--batching" if batching else "--no-batching"]
                load_avg = os.getloadavg()[0]
                full = label == "detector-full"
                env = FULL_ENV if full else {"ICM_EVIDENCE_CACHE": "0"}  # the models' cost, not the cache's
                proc, url = start_server(flags, run_dir, run_dir / "server.log", env)
                try:
                    n, elapsed, lat, errors, first_error = asyncio.run(load(url, args.clients, args.seconds, args.warmup, full))
                    mb = mean_batch_size(url)
                finally:
                    stop_server(proc)
                r = Result(label, batching, n, elapsed, lat, errors, mb, first_error)
                results.append(r)
                print(f"  done: {label}, batching {'on' if batching else 'off'}: {r.rps:.1f} req/s "
                      f"(load average before: {load_avg:.2f})", flush=True)

    print()
    header = f"{'backend':<18} {'batching':<9} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'mean batch':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.backend:<18} {'on' if r.batching else 'off':<9} {r.requests:>8} {r.rps:>8.1f} "
            f"{r.pct(0.5):>8.1f} {r.pct(0.99):>8.1f} {r.errors:>6} {r.mean_batch:>10.2f}"
        )
    print()
    by = {(r.backend, r.batching): r for r in results}
    for label in dict.fromkeys(r.backend for r in results):
        on, off = by.get((label, True)), by.get((label, False))
        if on and off and off.rps:
            print(f"{label}: dynamic batching gives {on.rps / off.rps:.2f}x the throughput of one-at-a-time")
    failed = [r for r in results if r.errors]
    for r in failed:
        print(f"ERRORS: {r.backend} batching {'on' if r.batching else 'off'}: {r.errors}, first: {r.first_error}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
