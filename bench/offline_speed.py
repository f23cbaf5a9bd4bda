"""The offline stack's speed, side by side in one run (issue 23): OCR's cost on text-free photos,
the full stack against the sum of its sources, and the icm-standard bundle against icm-sexy.

    .venv/bin/python bench/offline_speed.py [--variants 8] [--rounds 3] [--batch-size 8]

Images: the safe sample photos (examples/images: scikit-learn's china and flower,
matplotlib's grace_hopper; scikit-image's photos too where it is installed), each as
``--variants`` distinct crops and mirror images, so no image repeats (the backend caches
source outputs by content hash, and a repeated image would cost nothing). Models are
loaded before anything is timed; every configuration runs ``--rounds`` times, interleaved
with the others, and the median is kept (the machine is shared: neighbours come and go).

Printed, per image:

* **each source alone**, batched (``--batch-size`` images a session call), all threads;
* **the stack** (icm-sexy on the detector backend: open_nsfw, RapidOCR, EfficientNet-Lite0,
  and NudeNet where installed) in the records' ``timings.model_ms``, against the sum of its
  sources alone (the limit of running them one after the other);
* **OCR's cost on text-free photos**: the stack against the same stack without RapidOCR
  (``sources=``, as ``ICM_DETECTOR_SOURCES`` does), ``timings.model_ms`` (goal <= 1.3x);
* **the bundle**: every member of ``icm-standard`` against icm-sexy alone, wall time per
  image (goal <= 1.2x);
* that the rendered gambling posters are still blocked, with the OCR lines as boxes.

The thread count is ``--threads`` (default: ``$ICM_THREADS``, else every core). Load
average before and after is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from icm.moderation.backends.detector import DetectorBackend
from icm.moderation.bundle import BundleModerator
from icm.moderation.engine import Moderator
from icm.moderation.evidence.catalog import BUILTIN_SOURCES
from icm.moderation.evidence.runtime import resolve_threads
from icm.moderation.evidence.sources import SourceOutput, builtin_source
from icm.moderation.images import LoadedImage, load_image

sys.path.insert(0, str(REPO / "bench"))
from offline_evidence import posters


def photos() -> list[Path]:
    found = sorted((REPO / "examples" / "images").glob("*.jpg"))
    try:  # scikit-image's safe sample photos, when it is installed
        from skimage import data_dir  # type: ignore[import-not-found]

        found += sorted(p for p in Path(data_dir).glob("*.png") if p.stem in ("astronaut", "coffee", "chelsea", "rocket"))
    except ImportError:
        pass
    return found


def variants(path: Path, n: int) -> list[Image.Image]:
    """``n`` distinct images from one photo: crops at different offsets, every other one mirrored."""
    im = load_image(path).image.convert("RGB")
    w, h = im.size
    out = []
    for k in range(n):
        f = 0.8 + 0.2 * (k % 4) / 3
        cw, ch = int(w * f), int(h * f)
        x, y = (w - cw) * (k % 3) // 2, (h - ch) * ((k // 3) % 3) // 2
        v = im.crop((x, y, x + cw, y + ch))
        out.append(ImageOps.mirror(v) if k % 2 else v)
    return out


def loaded(images: list[Image.Image]) -> list[LoadedImage]:
    return [LoadedImage(image=im, source=f"variant-{i}.png", sha256="", n_bytes=0, width=im.width, height=im.height,
                        mode="RGB", format=None) for i, im in enumerate(images)]


def batches(items: list[LoadedImage], size: int) -> list[list[LoadedImage]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=8, help="distinct images made from each photo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="default: $ICM_THREADS, else every core")
    args = ap.parse_args()
    threads = resolve_threads(args.threads)

    images = [v for p in photos() for v in variants(p, args.variants)]
    items = loaded(images)
    n = len(images)
    load_before = os.getloadavg()[0]
    print(f"{n} text-free images ({len(photos())} photos x {args.variants} variants), batch {args.batch_size}, "
          f"{threads} threads on {os.cpu_count()} CPUs; load average {load_before:.1f} "
          "(a machine shared with other jobs: figures move with the neighbours)", flush=True)

    probe = DetectorBackend(threads=threads)
    names = [s for s in BUILTIN_SOURCES if BUILTIN_SOURCES[s].unavailable_reason() is None
             and (s != "nudenet" or probe.nudenet_available)]
    alone_srcs = {s: builtin_source(s, intra_op_num_threads=threads, batch_size=args.batch_size) for s in names}
    warm = [Image.new("RGB", (64, 48), (90, 120, 150))]
    for src in alone_srcs.values():
        src.run(warm)
    ocr_seen = alone_srcs["rapidocr"].run(images) if "rapidocr" in alone_srcs else [SourceOutput()] * n

    def mods(sources: list[str] | None) -> Moderator:
        m = Moderator(DetectorBackend(threads=threads, sources=sources, cache_images=0), policy="icm-sexy")
        m.moderate_loaded(loaded(warm))
        return m

    full = mods(None)
    no_ocr = mods([s for s in names if s != "rapidocr"])
    bundle = BundleModerator(DetectorBackend(threads=threads), bundle="icm-standard")
    bundle.moderate_loaded(loaded(warm))

    Timing = tuple[float, float]  # (ms per image: wall or the records' model_ms, CPU ms per image, every thread)

    def alone(name: str) -> Callable[[], Timing]:
        def run() -> Timing:
            t0, c0 = time.perf_counter(), time.process_time()
            for start in range(0, n, args.batch_size):
                alone_srcs[name].run(images[start : start + args.batch_size])
            return (time.perf_counter() - t0) * 1000 / n, (time.process_time() - c0) * 1000 / n
        return run

    per_photo: dict[str, list[list[float]]] = {}  # config -> per round, model_ms per image

    def model_ms(mod: Moderator, label: str) -> Callable[[], Timing]:
        def run() -> Timing:
            c0 = time.process_time()
            recs = [r for b in batches(items, args.batch_size) for r in mod.moderate_loaded(b)]
            per_photo.setdefault(label, []).append([r.timings.model_ms for r in recs])
            return statistics.fmean(r.timings.model_ms for r in recs), (time.process_time() - c0) * 1000 / n
        return run

    def wall(run_batch: Callable[[list[LoadedImage]], object], fresh: Callable[[], None]) -> Callable[[], Timing]:
        def run() -> Timing:
            fresh()  # a fresh cache: every image judged, as in a job that sees it first
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches(items, args.batch_size):
                run_batch(b)
            return (time.perf_counter() - t0) * 1000 / n, (time.process_time() - c0) * 1000 / n
        return run

    sexy_backend = DetectorBackend(threads=threads)
    sexy = Moderator(sexy_backend, policy="icm-sexy")
    sexy.moderate_loaded(loaded(warm))
    configs: dict[str, Callable[[], Timing]] = {f"{s} alone": alone(s) for s in names}
    configs["stack (icm-sexy)"] = model_ms(full, "with")
    configs["stack without rapidocr"] = model_ms(no_ocr, "without")
    configs["icm-sexy, wall"] = wall(sexy.moderate_loaded, sexy_backend.cache.clear)
    configs["icm-standard bundle, wall"] = wall(bundle.moderate_loaded, bundle.backend.cache.clear)  # type: ignore[attr-defined]
    got: dict[str, list[Timing]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for k, run in configs.items():
            got[k].append(run())
    med = {k: statistics.median(t[0] for t in v) for k, v in got.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in got.items()}

    print("\nper image (median of rounds)          ms (wall)  images/s  CPU ms (all threads)")
    for k, v in med.items():
        print(f"  {k:<36}{v:8.1f}{1000 / v:10.1f}{cpu[k]:12.1f}")
    limit = sum(med[f"{s} alone"] for s in names)
    print(f"\nsum of the sources alone, batched: {limit:.1f} ms/image ({1000 / limit:.1f} images/s: the stack's limit "
          "when its sources run one after the other)")

    def ratio(a: str, b: str) -> str:
        return f"{med[a] / med[b]:.2f}x (CPU time {cpu[a] / cpu[b]:.2f}x)"

    print(f"  stack / sum of its sources:             {med['stack (icm-sexy)'] / limit:.2f}x "
          f"(CPU time {cpu['stack (icm-sexy)'] / sum(cpu[f'{s} alone'] for s in names):.2f}x)")
    ok_ocr = med["stack (icm-sexy)"] / med["stack without rapidocr"] <= 1.3
    print(f"  OCR on text-free photos (with/without): {ratio('stack (icm-sexy)', 'stack without rapidocr')}"
          f"   goal <= 1.3x: {'met' if ok_ocr else 'NOT met'}")
    for k, p in enumerate(photos()):  # the same ratio per photo (grace_hopper shows a little text: insignia)
        part = slice(k * args.variants, (k + 1) * args.variants)
        w, wo = (statistics.median(statistics.fmean(r[part]) for r in per_photo[c]) for c in ("with", "without"))
        lines = sum(len(o.boxes) for o in ocr_seen[part])
        print(f"      {p.name:<34}{w / wo:.2f}x ({w:.1f} against {wo:.1f} ms; {lines} text lines read)")
    ok_bundle = med["icm-standard bundle, wall"] / med["icm-sexy, wall"] <= 1.2
    print(f"  icm-standard bundle / icm-sexy alone:   {ratio('icm-standard bundle, wall', 'icm-sexy, wall')}"
          f"   goal <= 1.2x: {'met' if ok_bundle else 'NOT met'} ({len(bundle.members)} policies)")

    with tempfile.TemporaryDirectory() as tmp:
        rendered = posters(Path(tmp))
        recs = Moderator(DetectorBackend(threads=threads), policy="gambling").moderate_paths([str(p) for p in rendered])
    for p, r in zip(rendered, recs, strict=True):
        lines = [b.label for b in r.boxes if b.label.startswith("rapidocr:")]
        print(f"  poster {p.name}: {r.verdict}, {len(lines)} OCR boxes, model {r.model}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
