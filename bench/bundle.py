"""Benchmark: a bundle (every member policy in one pass) against running its policies one by one.

The same images, the same backend object, side by side in one run (interleaved batch by
batch, so a neighbour process slowing the machine slows both alike):

* ``bundle``: :class:`icm.moderation.bundle.BundleModerator.moderate_loaded`; on a backend
  that merges policies (hf) one ``ask`` carries every member's questions, so each image's
  prefix (vision tower + the tokens up to the image) runs once for all policies;
* ``one by one``: each member's :class:`~icm.moderation.engine.Moderator` in turn, as a
  user running ``icm moderate --policy P`` per policy would (each encodes every image again).

Backends: ``hf`` on a ~35M-parameter LLaVA (224 px CLIP, 8-layer Llama) built locally by
:mod:`icm.training.tiny` (untrained: its scores are raw, both paths must agree on them),
and ``detector`` (the offline sources; it asks member by member, so it gains nothing).

    .venv/bin/python bench/bundle.py [--bundle icm-standard] [--rules R] [--images 8] [--threads 2]
                                     [--backends hf,detector] [--batch-size 8] [--image-size 224]

On a shared, loaded 2-core CPU (2 threads, icm-standard: 12 policies, 47 questions per
image, 8 images, batch 8) it printed: hf one by one 159.1 s, bundle 41.0 s, ratio 3.88x,
same verdicts 96/96, max |dP(violation)| 1.8e-07; detector 7.20 s vs 7.38 s, ratio 0.97x
(no merged ask: the same work either way).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from PIL import Image, ImageDraw

from icm.moderation.backends.base import Backend
from icm.moderation.bundle import BundleModerator, parse_bundle_ref
from icm.moderation.images import LoadedImage, load_image
from icm.moderation.record import ModerationRecord
from icm.policy.bundle import Bundle
from icm.policy.prompts_format import moderation_choice_prompt, yes_no_prompt


def as_loaded(im: Image.Image) -> LoadedImage:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return load_image(buf.getvalue())


def drawings(n: int, size: int) -> list[LoadedImage]:
    """Synthetic drawings (discs and bars on plain backgrounds)."""
    out = []
    for i in range(n):
        im = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, 160))
        d = ImageDraw.Draw(im)
        d.ellipse((size // 8 + i % 9, size // 8, size // 2 + i % 9, size // 2), fill=(220, (50 * i) % 256, 60))
        d.rectangle((size // 2, size // 3, size - 8, size // 3 + 12), fill=(20, 20, 200))
        out.append(as_loaded(im))
    return out


def interleaved(
    mod: BundleModerator, images: Sequence[LoadedImage], batch: int
) -> tuple[float, float, list[list[ModerationRecord]], list[list[ModerationRecord]]]:
    """(bundle seconds, one-by-one seconds, bundle records, one-by-one records) per image."""
    t_bundle = t_alone = 0.0
    fast: list[list[ModerationRecord]] = []
    slow: list[list[ModerationRecord]] = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        t0 = time.perf_counter()
        fast += mod.moderate_loaded(chunk)
        t1 = time.perf_counter()
        per_member = [m.moderate_loaded(chunk) for m in mod.members]
        t2 = time.perf_counter()
        slow += [[records[j] for records in per_member] for j in range(len(chunk))]
        t_bundle += t1 - t0
        t_alone += t2 - t1
    return t_bundle, t_alone, fast, slow


def report(name: str, mod: BundleModerator, images: Sequence[LoadedImage], batch: int, warm: Callable[[], object]) -> None:
    warm()
    t_bundle, t_alone, fast, slow = interleaved(mod, images, batch)
    diffs = [
        abs((a.p_violation or 0.0) - (b.p_violation or 0.0)) for fa, sa in zip(fast, slow, strict=True)
        for a, b in zip(fa, sa, strict=True)
    ]
    same = sum(a.verdict == b.verdict for fa, sa in zip(fast, slow, strict=True) for a, b in zip(fa, sa, strict=True))
    errors = sum(not r.ok for per in fast + slow for r in per)
    n = len(images)
    k = len(mod.members)
    print(f"[{name}] {n} images x {k} policies ({sum(len(m.queries) for m in mod.members)} questions per image), "
          f"batch {batch}, merged ask: {'yes' if mod.merges else 'no (asks member by member)'}")
    print(f"  one by one : {t_alone:8.2f} s  {n / t_alone:7.2f} images/s")
    print(f"  bundle     : {t_bundle:8.2f} s  {n / t_bundle:7.2f} images/s")
    print(f"  ratio (one by one / bundle): {t_alone / t_bundle:.2f}x   same verdicts: {same}/{n * k}, "
          f"max |dP(violation)| = {max(diffs, default=0.0):.2e}, error records: {errors}")


def bench_hf(bundle: Bundle, rules: str | None, args: argparse.Namespace) -> None:
    import torch

    from icm.moderation.backends.hf import HFBackend
    from icm.moderation.engine import build_queries
    from icm.policy.bundle import bundle_members
    from icm.training import tiny

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    texts = [
        yes_no_prompt(q.question) if q.kind == "yes_no" else moderation_choice_prompt(q.question, q.options)
        for p, _ in bundle_members(bundle, rules) for q in build_queries(p)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny.build_tiny_llava(
            Path(tmp) / "llava-35m", image_size=args.image_size, patch_size=14, vision_hidden=384, vision_layers=6,
            vision_heads=6, text_hidden=512, text_layers=8, text_heads=8, intermediate=1376, init_scale=1.0,
            vocab_size=2000, tokenizer_texts=texts,  # the prompts' words are whole tokens, as with a real tokenizer
        )
        backend = HFBackend(model=str(path), batch_size=args.batch_size, device="cpu", dtype="float32", min_label_mass=0.0)
        print(f"hf: tiny LLaVA {tiny.count_parameters(backend.model) / 1e6:.1f}M parameters, {args.image_size} px CLIP "
              f"({(args.image_size // 14) ** 2} image tokens); torch {torch.__version__}, threads: {torch.get_num_threads()}")
        images = drawings(args.images, args.image_size)
        mod = BundleModerator(backend, bundle=bundle, rules=rules)
        report("hf", mod, images, args.batch_size, lambda: mod.moderate_loaded(images[:2]))
        if not backend.prefix_cache:
            print("  (warning: the shared-prefix cache was disabled during the run)")
        backend.close()


def bench_detector(bundle: Bundle, rules: str | None, args: argparse.Namespace) -> None:
    from icm.moderation.backends.detector import DetectorBackend

    backend: Backend = DetectorBackend(intra_op_num_threads=args.threads)
    photos = [load_image(str(p)) for p in sorted((ROOT / "examples" / "images").glob("*.jpg"))]
    images = (photos + drawings(max(0, args.images - len(photos)), 256))[: args.images]
    mod = BundleModerator(backend, bundle=bundle, rules=rules)
    print(f"detector: {backend.model_id}; onnxruntime intra-op threads: {args.threads}")
    report("detector", mod, images, args.batch_size, lambda: mod.moderate_loaded(images[:2]))
    backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="icm-standard", help="a bundle name or YAML file (BUNDLE[:RULES] too)")
    parser.add_argument("--rules", default=None)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224, help="hf: CLIP input size (224 -> 256 image tokens)")
    parser.add_argument("--backends", default="hf,detector")
    args = parser.parse_args()
    parsed = parse_bundle_ref(args.bundle, args.rules)
    if parsed is None:
        parser.error(f"not a bundle: {args.bundle}")
    bundle, rules = parsed
    print(f"bundle {bundle.name}: {', '.join(bundle.policies)}; rules {rules or bundle.default_rules or 'each default'}")
    for name in args.backends.split(","):
        {"hf": bench_hf, "detector": bench_detector}[name.strip()](bundle, rules, args)


if __name__ == "__main__":
    main()
