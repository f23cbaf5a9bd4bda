"""The synthetic moderation task of the demo: drawn figures whose attributes are visible.

Real moderation data cannot be shipped or learned on a laptop CPU, yet the whole loop
(policy, data generation, tuning, moderation, evaluation, relabelling) must be runnable
and measurable anywhere. This module makes a task with the same structure as the
paper's, small enough for a tiny VLM:

* :func:`draw_figure` draws a figure whose every attribute value of the built-in policy
  ``synth-shapes`` is *visible*: the place of a coloured part of the body is the region
  (upper half, lower half, whole figure), its colour the exposure (blue covered, orange
  partly bare, red bare), a glyph beside the figure the action (none: still, a cyan
  triangle: waves, a green cross: touches itself). Background tint, figure place and
  size, colours and grey distractor shapes vary per image, so held-out images are new
  images, not copies.
* :func:`read_figure` reads the attributes back from the pixels (what the scripted
  teacher of :mod:`icm.demo.teacher` "sees"; it survives the JPEG encoding the OpenAI
  backend sends).
* :func:`make_synth_dataset` (``icm data synth``) draws a train and a held-out test set
  with the CSV/labels files the other commands read; :func:`general_instructions` is
  the text-only general data MSFT mixes in.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from icm.policy import Policy, load_policy

__all__ = [
    "ACTIONS",
    "EXPOSURES",
    "REGIONS",
    "SYNTH_POLICY",
    "Figure",
    "SynthResult",
    "check_synth_policy",
    "draw_figure",
    "general_instructions",
    "make_synth_dataset",
    "random_figure",
    "read_figure",
]

SYNTH_POLICY = "synth-shapes"
REGIONS = ("upper", "lower", "whole")
EXPOSURES = ("covered", "partial", "bare")
ACTIONS = ("still", "wave", "touch")

# Colours of the drawing (the decoder classifies pixels by distance to these).
PALETTE = {"covered": (40, 80, 210), "partial": (240, 150, 30), "bare": (215, 35, 40)}
CLOTHES = (62, 62, 68)
HEAD = (205, 185, 150)
CYAN = (40, 200, 225)
GREEN = (40, 190, 70)
COLOUR_WORD = {"covered": "blue", "partial": "orange", "bare": "red"}
EXPOSURE_WORD = {"covered": "covered", "partial": "partly bare", "bare": "bare"}
REGION_NP = {"upper": "the upper half", "lower": "the lower half", "whole": "the whole body"}


# --------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class Figure:
    """The attribute values one image shows."""

    region: str
    exposure: str
    action: str

    @property
    def assignment(self) -> dict[str, str]:
        return {"region": self.region, "exposure": self.exposure, "action": self.action}

    @property
    def product(self) -> str:
        return f"{self.region}_{self.exposure}_{self.action}"

    @property
    def positive(self) -> bool:
        return self.exposure != "covered"

    @classmethod
    def of_product(cls, policy: Policy, product: str) -> Figure:
        a = policy.product(product).assignment
        return cls(a["region"], a["exposure"], a["action"])


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)
    return r, g, b


def draw_figure(figure: Figure, *, size: int = 64, seed: int | str = 0) -> Image.Image:
    """Draw ``figure`` on a ``size`` x ``size`` canvas; ``seed`` varies everything else."""
    if figure.region not in REGIONS or figure.exposure not in EXPOSURES or figure.action not in ACTIONS:
        raise ValueError(f"not a synth-shapes figure: {figure}")
    rng = random.Random(f"synth:{seed}")
    base = 64
    img = Image.new("RGB", (base, base))
    grey = rng.randint(100, 165)
    img.paste(_jitter((grey, grey, grey), rng, 10), (0, 0, base, base))
    d = ImageDraw.Draw(img)
    # light grey distractors away from the figure and the glyph box
    for _ in range(rng.randint(0, 3)):
        g = rng.randint(175, 210)
        x, y = rng.randint(34, 58), rng.choice([rng.randint(1, 9), rng.randint(54, 58)])
        r = rng.randint(2, 3)
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x - r, y - r, x + r, y + r], fill=(g, g, g))
    # the figure: head and body, a marked part coloured by the exposure
    x0, w = rng.randint(3, 12), rng.randint(14, 19)
    y0, y1 = rng.randint(16, 20), rng.randint(56, 61)
    cx, hr = x0 + w // 2, rng.randint(5, 6)
    d.ellipse([cx - hr, y0 - 2 * hr - 1, cx + hr, y0 - 1], fill=_jitter(HEAD, rng, 12))
    mid = (y0 + y1) // 2 + rng.randint(-3, 3)
    marked = _jitter(PALETTE[figure.exposure], rng, 18)
    clothes = _jitter(CLOTHES, rng, 8)
    top, bottom = (marked, clothes) if figure.region == "upper" else (clothes, marked)
    if figure.region == "whole":
        top = bottom = marked
    d.rectangle([x0, y0, x0 + w - 1, mid], fill=top)
    d.rectangle([x0, mid + 1, x0 + w - 1, y1], fill=bottom)
    # the glyph beside the figure
    gs = rng.randint(16, 20)
    gx, gy = rng.randint(36, 62 - gs), rng.randint(16, 52 - gs)
    if figure.action == "wave":
        d.polygon([(gx + gs // 2, gy), (gx, gy + gs), (gx + gs, gy + gs)], fill=_jitter(CYAN, rng, 12))
    elif figure.action == "touch":
        colour = _jitter(GREEN, rng, 15)
        d.line([(gx, gy), (gx + gs, gy + gs)], fill=colour, width=6)
        d.line([(gx, gy + gs), (gx + gs, gy)], fill=colour, width=6)
    if size != base:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def random_figure(rng: random.Random) -> Figure:
    return Figure(rng.choice(REGIONS), rng.choice(EXPOSURES), rng.choice(ACTIONS))


def _dist(arr: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.sqrt(((arr - np.array(rgb, dtype=np.float32)) ** 2).sum(-1))


def read_figure(image: Image.Image) -> Figure | None:
    """The attribute values drawn in ``image`` (None when it is not a synth figure)."""
    arr = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
    dists = np.stack([_dist(arr, PALETTE[e]) for e in EXPOSURES])
    nearest = dists.argmin(0)
    close = dists.min(0) < 70
    counts = [int(((nearest == i) & close).sum()) for i in range(len(EXPOSURES))]
    if max(counts) < 25:
        return None
    e = int(np.argmax(counts))
    patch = (nearest == e) & close
    ys, xs = np.nonzero(patch)
    xl, xr = int(xs.min()), int(xs.max())
    cloth = _dist(arr, CLOTHES) < 40
    cloth[:, : max(0, xl)] = False
    cloth[:, xr + 1 :] = False
    cys = np.nonzero(cloth)[0]
    if len(cys) < 0.15 * len(ys):
        region = "whole"
    else:
        region = "upper" if cys.mean() > ys.mean() else "lower"
    box = arr[:, 34:]
    cyan = int((_dist(box, CYAN) < 60).sum())
    green = int((_dist(box, GREEN) < 60).sum())
    action = "touch" if green >= 8 and green > cyan else "wave" if cyan >= 8 else "still"
    return Figure(region, EXPOSURES[e], action)


def check_synth_policy(policy: Policy) -> None:
    """Raise ValueError unless ``policy`` has the attributes and values the drawings show."""
    wanted = {"region": REGIONS, "exposure": EXPOSURES, "action": ACTIONS}
    for attr, values in wanted.items():
        if attr not in policy.attribute_map or set(policy.attribute(attr).value_ids) != set(values):
            raise ValueError(
                f"policy {policy.name!r} does not describe the synthetic figures: it needs attribute {attr!r} "
                f"with values {', '.join(values)} (start from the built-in {SYNTH_POLICY!r})"
            )
    for p in policy.products:
        if set(p.assignment) != set(wanted):
            raise ValueError(f"product {p.id!r} of {policy.name!r} must set region, exposure and action")


# --------------------------------------------------------------------------- general instructions


_WORDS = ["apple", "river", "window", "garden", "pencil", "orange", "bridge", "candle", "forest", "letter"]


def general_instructions(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` text-only instruction examples in LLaVA's layout (arithmetic, comparisons,
    spelling): a stand-in, on a CPU, for the general instruction data MSFT mixes in (the
    paper used LLaVA's), so the mixing is exercised and a tuned model can be checked to
    keep a skill that is not moderation."""
    rng = random.Random(f"general:{seed}")
    out = []
    for i in range(n):
        kind = i % 4
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        if kind == 0:
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            q, ans = f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
        elif kind == 2:
            q, ans = f"Which is larger, {a} or {b}?", (f"{max(a, b)} is larger." if a != b else "They are equal.")
        else:
            w = rng.choice(_WORDS)
            q, ans = f"Spell the word {w} backwards.", f"{w[::-1]}"
        out.append({"id": f"general-{i:05d}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": ans}]})
    return out


# --------------------------------------------------------------------------- the data set


@dataclass
class SynthResult:
    out: str
    policy: str
    train_csv: str
    test_csv: str
    test_labels: str
    train: int
    test: int
    products: dict[str, int] = field(default_factory=dict)
    general: str | None = None
    n_general: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _balanced(policy: Policy, n: int, rng: random.Random) -> Iterator[str]:
    """Products in shuffled rounds, so every product gets n / len(products) images."""
    ids = [p.id for p in policy.products]
    produced = 0
    while produced < n:
        batch = ids[:]
        rng.shuffle(batch)
        for pid in batch[: n - produced]:
            produced += 1
            yield pid


def make_synth_dataset(
    out: str | Path,
    *,
    policy: Policy | str = SYNTH_POLICY,
    n_train: int = 540,
    n_test: int = 270,
    size: int = 64,
    seed: int = 0,
    n_general: int = 0,
) -> SynthResult:
    """Draw ``n_train`` + ``n_test`` figures (every product equally often) under ``out``.

    Writes ``train/images/*.png`` with ``train/inputs.csv`` (image, product: the input of
    ``icm data generate``) and ``test/images/*.png`` with ``test/labels.csv`` (image,
    product: the ``--labels`` of ``icm eval icm``). Test images are drawn with other seeds
    than the train images, so no image is in both. ``n_general`` > 0 also writes
    ``general.json``: text-only general instructions (:func:`general_instructions`) for MSFT.
    """
    t0 = time.perf_counter()
    pol = load_policy(policy) if isinstance(policy, str) else policy
    check_synth_policy(pol)
    if n_train < 0 or n_test < 0:
        raise ValueError("image counts must be >= 0")
    if size < 16:
        raise ValueError("images must be at least 16 px")
    root = Path(out)
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, pid in enumerate(_balanced(pol, n, rng)):
            fig = Figure.of_product(pol, pid)
            name = f"synth-{split}-{i:05d}.png"
            draw_figure(fig, size=size, seed=f"{seed}:{split}:{i}").save(folder / name)
            rows.append((f"images/{name}", pid))
            counts[pid] = counts.get(pid, 0) + 1
        csv_path = root / split / ("inputs.csv" if split == "train" else "labels.csv")
        with open(csv_path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "product"])
            w.writerows(rows)
        files[split] = csv_path
    general = None
    if n_general > 0:
        general = root / "general.json"
        general.write_text(json.dumps(general_instructions(n_general, seed), indent=1) + "\n", encoding="utf-8")
    return SynthResult(
        out=str(root), policy=pol.name, train_csv=str(files["train"]), test_csv=str(files["test"]),
        test_labels=str(files["test"]), train=n_train, test=n_test, products=dict(sorted(counts.items())),
        general=str(general) if general else None, n_general=n_general,
        seconds=time.perf_counter() - t0,
    )
