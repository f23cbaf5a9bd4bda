"""Per-image latency of the offline detector backend on the bundled sample photos.

    python bench/bench_detector.py [--threads N] [--repeats R]

Prints the median wall time per image of: loading (icm.moderation.images.load_image),
open_nsfw alone, NudeNet alone, and a full ``ask`` with the term and exposure queries of
icm-sexy (its ``evidence``: open_nsfw, RapidOCR and EfficientNet-Lite0 when installed;
``--sources open_nsfw,nudenet`` for the earlier open_nsfw+NudeNet stack), for one image
per call and for a batch of 8. Per policy and per source: bench/offline_evidence.py. ONNX threads are set explicitly
(``--threads``, default: the number of CPUs) because timings on a shared machine
depend on it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from icm.moderation.backends.base import Query
from icm.moderation.backends.detector import EXPOSURE_OPTIONS, DetectorBackend
from icm.moderation.images import load_image

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.jpg"))


def per_image_ms(fn: Callable[[], object], n_images: int, repeats: int) -> float:
    fn()  # warm-up (session initialisation, first-call allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times) / n_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sources", default=None, help="comma-separated sources to use (default: every one installed)")
    args = parser.parse_args()

    images = [load_image(p).image for p in PHOTOS]
    batch = (images * 3)[:8]
    sources = args.sources.split(",") if args.sources else None
    backend = DetectorBackend(batch_size=8, intra_op_num_threads=args.threads, sources=sources)
    queries = [
        Query(key="term:sexy", kind="yes_no", question="Is the image sexy?", term="sexy"),
        Query(key="attr:exposure", kind="choice", question="?", options=EXPOSURE_OPTIONS,
              option_ids=EXPOSURE_OPTIONS, attribute="exposure"),
    ]
    print(f"model_id={backend.model_id} threads={args.threads} cpus={os.cpu_count()} "
          f"images={[p.name for p in PHOTOS]} repeats={args.repeats}")
    rows: list[tuple[str, Callable[[list], object]]] = [
        ("load_image (decode + RGB)", lambda ims: [load_image(PHOTOS[i % len(PHOTOS)]) for i in range(len(ims))]),
        ("open_nsfw", backend.nsfw_scores),
    ]
    if backend.nudenet_available:
        rows.append(("nudenet", backend.detect))
    rows.append(("ask(term + exposure)", lambda ims: backend.ask(ims, queries)))
    print(f"{'stage':28s} {'1 image/call':>14s} {'batch of 8':>12s}   (ms per image, median)")
    for label, fn in rows:
        single = statistics.median(
            per_image_ms(lambda im=im, fn=fn: fn([im]), 1, args.repeats) for im in images
        )
        batched = per_image_ms(lambda fn=fn: fn(batch), len(batch), args.repeats)
        print(f"{label:28s} {single:14.1f} {batched:12.1f}")


if __name__ == "__main__":
    main()
