"""`icm moderate` locally and on Ray Data (1 and 2 actors): records/s, start-up cost, memory, agreement.

On N generated images (default 2,000; small PNG/JPEG pictures, a few broken files) with
the offline detector, each configuration runs as its own `icm moderate` process, as a user
runs it:

* local: the in-process job (``--engine local``);
* ray, 1 image: the fixed cost of ``--engine ray`` (starting a local cluster, the actor
  and its model, and shutting down);
* ray with 1 and 2 actors on all N images.

For each: wall seconds, records/s over the wall time, records/s once the fixed cost is
taken off (ray only), and peak memory: the largest total RSS of the process and all its
descendants (Ray's raylet, GCS and workers included), sampled every 0.1 s. Then the
agreement of every Ray record with the local one (verdict, P(violation), sha256, product,
rule, error: must be exact).

    .venv/bin/python bench/ray_scale.py               # 2,000 images
    .venv/bin/python bench/ray_scale.py --images 500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from PIL import Image, ImageDraw

FIELDS = ("verdict", "p_violation", "sha256", "product", "rule", "error", "frames_seen")


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = 64 + (i * 7) % 96, 64 + (i * 11) % 80
        im = Image.new("RGB", (w, h), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        d = ImageDraw.Draw(im)
        d.ellipse((i % 9, i % 7, w - 3, h - 2), fill=(220, 170 - i % 60, 140 - i % 50))
        d.rectangle((w // 3, h // 4, w // 2, h // 2), fill=((i * 13) % 256, 60, 90))
        im.save(folder / (f"img{i:05d}.jpg" if i % 3 == 0 else f"img{i:05d}.png"))
    for j in range(max(1, n // 500)):
        (folder / f"broken{j}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"torn" * 8)


def run(cmd: list[str]) -> tuple[float, int, int]:
    """Seconds, exit code and peak RSS (bytes) of the process tree of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    if proc.returncode not in (0, 1):  # 1: the broken files are error records
        sys.stderr.write(err.decode(errors="replace")[-3000:])
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    return seconds, proc.returncode, peak


def records(path: Path) -> dict[str, dict]:
    from icm.moderation.parquet import read_any_records

    recs, bad = read_any_records(path)
    assert bad == 0, f"{bad} unreadable records in {path}"
    return {r.path: json.loads(r.model_dump_json()) for r in recs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    icm = [sys.executable, "-m", "icm.cli.main", "moderate"]
    with tempfile.TemporaryDirectory(prefix="icm-bench-ray-") as tmp:
        root = Path(tmp)
        folder = root / "imgs"
        make_images(folder, args.images)
        one = root / "one"
        make_images(one, 1)
        n = len(list(folder.iterdir()))
        common = ["--batch-size", str(args.batch_size)]
        runs: dict[str, tuple[float, int]] = {}
        outs: dict[str, Path] = {}
        plan = [
            ("local", [str(folder), "--out", str(root / "local.jsonl")], root / "local.jsonl"),
            ("ray start-up (1 image)", ["--engine", "ray", str(one / "img00000.jpg"), "--out", str(root / "one.parquet")], None),
            ("ray, 1 actor", ["--engine", "ray", "--num-actors", "1", str(folder), "--out", str(root / "ray1.parquet")], root / "ray1.parquet"),
            ("ray, 2 actors", ["--engine", "ray", "--num-actors", "2", str(folder), "--out", str(root / "ray2.parquet")], root / "ray2.parquet"),
        ]
        for name, extra, out in plan:
            secs, _, peak = run([*icm, *extra, *common])
            runs[name] = (secs, peak)
            if out is not None:
                outs[name] = out
            print(f"  done: {name} in {secs:.1f} s", file=sys.stderr, flush=True)
        fixed = runs["ray start-up (1 image)"][0]
        print(f"{n} images ({n - args.images} broken), detector backend, batch size {args.batch_size}, "
              f"{os.cpu_count()} CPUs")
        print(f"{'':24} {'seconds':>8} {'records/s':>10} {'records/s w/o start-up':>23} {'peak RSS':>10}")
        for name, (secs, peak) in runs.items():
            if name.startswith("ray start-up"):
                print(f"{name:24} {secs:8.1f} {'':>10} {'':>23} {peak / 2**20:8.0f} MB")
                continue
            steady = f"{n / (secs - fixed):23.1f}" if name != "local" and secs > fixed else f"{'':>23}"
            print(f"{name:24} {secs:8.1f} {n / secs:10.1f} {steady} {peak / 2**20:8.0f} MB")
        local = records(outs["local"])
        for name in ("ray, 1 actor", "ray, 2 actors"):
            got = records(outs[name])
            same = sum(1 for p, r in got.items() if p in local and all(r.get(f) == local[p].get(f) for f in FIELDS))
            print(f"agreement with local, {name}: {same}/{len(local)} records identical in {', '.join(FIELDS)}"
                  + ("" if same == len(local) == len(got) else "  <-- NOT EXACT"))
        r1, r2 = runs["ray, 1 actor"][0] - fixed, runs["ray, 2 actors"][0] - fixed
        print(f"1 -> 2 actors (start-up taken off): {r1 / r2:.2f}x")


if __name__ == "__main__":
    main()
