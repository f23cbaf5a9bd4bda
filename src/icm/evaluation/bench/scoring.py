"""Operating points and metrics of a benchmark run, each with its interval.

Per image the moderation gives a verdict per member policy and scores per taxonomy
category (:class:`Judged`). An operating point turns that into unsafe / safe:

* ``rules``: the rule set's own thresholds: an image is unsafe when a member policy
  blocks it (for a category: a member that maps onto the category); review counts as
  safe here, and how many images went to review is reported beside;
* ``fpr5``: the score threshold with a false-positive rate of at most 5% on the tuning
  images;
* ``recall95``: the highest score threshold with a recall of at least 95% there.

The tuning images are the benchmark's train or validation split, never the split
reported; without one, k stratified folds of the reported split (each fold's threshold
chosen on the other folds). The figures are those of the one confusion table
(:mod:`icm.evaluation.confusion`): precision, recall and FPR get a Wilson interval, F1 and
balanced accuracy a stratified bootstrap one (:mod:`icm.evaluation.stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from icm.evaluation.confusion import CONFUSION_METRICS, Confusion, Figure
from icm.evaluation.stats import DEFAULT_BOOTSTRAP, DEFAULT_CONFIDENCE, DEFAULT_SEED, Interval, bootstrap_curve_metrics

OPERATING_POINTS = ("rules", "fpr5", "recall95")
METRIC_NAMES = ("precision", "recall", "f1", "fpr", "balanced_accuracy")
TARGET_FPR = 0.05
TARGET_RECALL = 0.95


@dataclass
class Judged:
    """One image as the moderation saw it, for one category (or overall)."""

    unsafe: bool
    """The truth."""
    score: float
    blocked: bool
    review: bool
    judged: bool


class MetricValue(BaseModel):
    """One figure: the rows ``icm eval compare --published`` matches by benchmark, split, category and metric."""

    benchmark: str
    split: str
    operating_point: str
    category: str = Field(description="'overall' or the benchmark's own category")
    metric: str = Field(description="precision, recall, f1, fpr or balanced_accuracy")
    value: float | None
    interval: Interval | None = None
    n: int = Field(description="Images the figure is computed on")


class OperatingPoint(BaseModel):
    name: str
    thresholds: list[float] = Field(default_factory=list, description="The score threshold (one per fold with cross-validation)")
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    review: int | None = Field(default=None, description="rules: images not blocked that a member sent to review (counted safe)")
    note: str = ""


def choose_threshold(y: np.ndarray, s: np.ndarray, point: str) -> float | None:
    """The score threshold (unsafe when score >= it) of ``point`` on tuning labels ``y`` and scores ``s``."""
    pos, neg = s[y], s[~y]
    if point == "fpr5":
        if not neg.size:
            return None
        cands = np.unique(np.r_[s, np.nextafter(s.max(), np.inf)])
        neg_sorted = np.sort(neg)
        fpr = (neg.size - np.searchsorted(neg_sorted, cands, side="left")) / neg.size
        ok = cands[fpr <= TARGET_FPR]
        return float(ok.min())
    if point == "recall95":
        if not pos.size:
            return None
        cands = np.unique(pos)
        pos_sorted = np.sort(pos)
        recall = (pos.size - np.searchsorted(pos_sorted, cands, side="left")) / pos.size
        return float(cands[recall >= TARGET_RECALL].max())
    raise ValueError(f"unknown operating point {point!r}")


def _folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number per item, stratified by label (seeded)."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(y.size, dtype=int)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        fold[idx] = np.arange(idx.size) % k
    return fold


def predict(point: str, report: Sequence[Judged], tune: Sequence[Judged] | None, *, folds: int = 5,
            seed: int = DEFAULT_SEED) -> tuple[np.ndarray | None, OperatingPoint]:
    """Predictions (unsafe) on ``report`` at ``point``; thresholds from ``tune``, or from folds of ``report`` when None."""
    op = OperatingPoint(name=point)
    if point == "rules":
        pred = np.array([j.blocked for j in report], dtype=bool)
        op.review = sum(1 for j in report if j.review and not j.blocked)
        return pred, op
    y = np.array([j.unsafe for j in report], dtype=bool)
    s = np.array([j.score for j in report], dtype=float)
    if tune is not None:
        ty = np.array([j.unsafe for j in tune], dtype=bool)
        ts = np.array([j.score for j in tune], dtype=float)
        t = choose_threshold(ty, ts, point) if ty.size else None
        if t is None:
            op.note = "the tuning images lack the positives or negatives this point needs"
            return None, op
        op.thresholds = [t]
        return s >= t, op
    k = min(folds, int(y.sum()), int((~y).sum()))
    if k < 2:
        op.note = "too few positives or negatives for cross-validation folds"
        return None, op
    fold = _folds(y, k, seed)
    pred = np.zeros(y.size, dtype=bool)
    for f in range(k):
        rest = fold != f
        t = choose_threshold(y[rest], s[rest], point)
        if t is None:
            op.note = "a fold lacks the positives or negatives this point needs"
            return None, op
        op.thresholds.append(t)
        pred[fold == f] = s[fold == f] >= t
    op.note = f"thresholds chosen by {k}-fold cross-validation on the reported split"
    return pred, op


FIGURES: dict[str, Figure] = {"precision": "precision", "recall": "recall", "f1": "f1", "fpr": "false_positive_rate",
                               "balanced_accuracy": "balanced_accuracy"}
"""Each of :data:`METRIC_NAMES` as a figure of the one confusion table (:mod:`icm.evaluation.confusion`)."""


def metric_values(y: np.ndarray, pred: np.ndarray, op: OperatingPoint, *, benchmark: str, split: str, category: str,
                  confidence: float = DEFAULT_CONFIDENCE, bootstrap: int = DEFAULT_BOOTSTRAP,
                  seed: int = DEFAULT_SEED) -> list[MetricValue]:
    """The five figures of predictions ``pred`` against truth ``y``, with intervals; fills op's confusion counts."""
    c = Confusion.of(y, pred)
    op.tp, op.fp, op.fn, op.tn = c.tp, c.fp, c.fn, c.tn
    boot = bootstrap_curve_metrics(y, pred.astype(float), threshold=0.5, resamples=bootstrap, confidence=confidence, seed=seed)
    return [MetricValue(benchmark=benchmark, split=split, operating_point=op.name, category=category, metric=m,
                        value=c.value(FIGURES[m]), n=int(y.size),
                        interval=c.interval(FIGURES[m], confidence) if CONFUSION_METRICS[FIGURES[m]].proportion else boot.get(m))
            for m in METRIC_NAMES]
