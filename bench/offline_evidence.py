"""Throughput of the offline evidence stack per built-in policy, beside each source alone.

    .venv/bin/python bench/offline_evidence.py [--repeat 2] [--threads 2] [--batch-size 8]

Images: the sample photos (examples/images) and rendered gambling posters (DejaVuSans,
matplotlib's font), repeated ``--repeat`` times. They are decoded once (timed apart);
every source then runs on the same decoded images, batched where the model takes batches
(open_nsfw, EfficientNet-Lite0; RapidOCR is one image per call). For each policy the full
stack is ``Moderator.moderate_loaded`` on the detector backend: every source the policy
names, the mapping and the decision. It must stay within 1.5x of the sum of its sources
run alone; the table says where the time goes (the backend's per-source timers, the rest
is mapping, decision and record building).

Load average is printed: on a shared machine the numbers move with the neighbours.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from icm.moderation.backends.detector import DetectorBackend
from icm.moderation.engine import Moderator
from icm.moderation.evidence.catalog import BUILTIN_SOURCES
from icm.moderation.evidence.sources import builtin_source
from icm.moderation.images import load_image
from icm.policy import load_policy

POLICIES = ("icm-sexy", "gambling", "horrifying")
LIMIT = 1.5


def posters(root: Path) -> list[Path]:
    try:
        import matplotlib

        font_path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/fonts/ttf/DejaVuSans-Bold.ttf")
        big, small = ImageFont.truetype(font_path, 54), ImageFont.truetype(font_path, 40)
    except (ImportError, OSError):
        big = small = ImageFont.load_default(48)
    out = []
    for name, lines in {"casino": ["CASINO ROYAL", "Bet now! Jackpot"], "apuestas": ["APUESTAS DEPORTIVAS", "Bono 100%"]}.items():
        im = Image.new("RGB", (720, 300), (20, 90, 30))
        d = ImageDraw.Draw(im)
        d.text((40, 50), lines[0], font=big, fill=(255, 215, 0))
        d.text((40, 160), lines[1], font=small, fill=(255, 255, 255))
        path = root / f"{name}.png"
        im.save(path)
        out.append(path)
    return out


def policy_sources(policy_name: str, backend: DetectorBackend) -> list[str]:
    policy = load_policy(policy_name)
    names = DetectorBackend._named_sources(policy)
    return [n for n in names if backend.source_unavailable(policy, n) is None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="how many times the image set is repeated")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads per session")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="icm-bench-"))
    files = sorted(p for p in (REPO / "examples" / "images").glob("*.jpg")) + posters(tmp)
    files = files * args.repeat
    t0 = time.perf_counter()
    loaded = [load_image(p) for p in files]
    decode_s = time.perf_counter() - t0
    images = [im.image.convert("RGB") for im in loaded]
    n = len(images)
    print(f"{n} images ({len(set(files))} distinct), decoded once in {decode_s * 1000 / n:.1f} ms/image; "
          f"onnxruntime threads {args.threads}, batch {args.batch_size}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs (a shared machine: numbers move with the neighbours)")

    # each source alone, on the same decoded images (after a warm-up call that loads the model)
    alone: dict[str, float] = {}
    probe = DetectorBackend(intra_op_num_threads=args.threads, batch_size=args.batch_size)
    for name in BUILTIN_SOURCES:
        if name == "nudenet" and not probe.nudenet_available:
            continue
        if BUILTIN_SOURCES[name].unavailable_reason() is not None:
            print(f"  {name}: not installed ({BUILTIN_SOURCES[name].install_hint()})")
            continue
        src = builtin_source(name, intra_op_num_threads=args.threads, batch_size=args.batch_size)
        src.run(images[:1])
        t0 = time.perf_counter()
        src.run(images)
        alone[name] = (time.perf_counter() - t0) / n
        src.close()
    print("\nsource alone          ms/image   images/s")
    for name, s in alone.items():
        print(f"  {name:<20}{s * 1000:9.1f}{1 / s:11.2f}")

    print("\npolicy        sources                                   stack ms/img  images/s  sum alone  ratio  where the time goes")
    failed = False
    for policy in POLICIES:
        backend = DetectorBackend(intra_op_num_threads=args.threads, batch_size=args.batch_size, cache_images=0)  # the set repeats
        mod = Moderator(backend, policy=policy)
        mod.moderate_loaded(loaded[:1])  # loads the models
        backend.timings.clear()
        t0 = time.perf_counter()
        for start in range(0, n, args.batch_size):
            mod.moderate_loaded(loaded[start : start + args.batch_size])
        stack = (time.perf_counter() - t0) / n
        used = policy_sources(policy, backend)
        if backend.nudenet_available and "nudenet" not in used and policy == "icm-sexy":
            used.append("nudenet")  # the built-in exposure mapping
        total = sum(alone.get(u, 0.0) for u in used)
        ratio = stack / total if total else float("nan")
        failed |= ratio > LIMIT
        parts = {k: v / n for k, v in backend.timings.items()}
        rest = stack - sum(parts.values())
        where = ", ".join(f"{k} {v * 1000:.0f}" for k, v in parts.items()) + f", mapping+decision {rest * 1000:.1f} ms"
        print(f"  {policy:<12}{'+'.join(used):<42}{stack * 1000:10.1f}{1 / stack:10.2f}{total * 1000:11.1f}{ratio:7.2f}  {where}")
        backend.close()
    print(f"\nstack within {LIMIT}x of the sum of its sources: {'no' if failed else 'yes'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
