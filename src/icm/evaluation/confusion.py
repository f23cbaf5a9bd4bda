"""The confusion matrix and every figure computed from it, defined once.

:data:`CONFUSION_METRICS` is the one table of the figures of a 2x2 confusion matrix
(accuracy, precision, recall, F1, specificity, balanced accuracy, false-positive and
false-negative rates): each is a ratio ``k / n`` of the four counts, with its title, its
direction and whether it is a binomial proportion (then it has a Wilson interval, from
:func:`icm.evaluation.stats.wilson`). :class:`Confusion` counts and computes them; the
ICM report, its threshold sweep and the paper's protocol, the bootstrap of
:mod:`icm.evaluation.stats`, and the calibration of thresholds and of video settings all
read them here. The formulas take plain numbers or numpy arrays of counts alike (the
bootstrap computes a figure for a thousand resamples at once).

Use::

    c = Confusion.of(truth, flagged)           # two boolean sequences
    c.value("precision")                        # None when nothing is flagged
    c.interval("recall", 0.95)                  # an Interval (Wilson), or None
    c.metrics()                                 # the reported figures, by name
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel

from icm.evaluation.stats import DEFAULT_CONFIDENCE, Interval, wilson, wilson_interval

__all__ = ["CONFUSION_METRICS", "Confusion", "ConfusionMetric", "Figure", "confusion_metrics", "metric_arrays", "reported_metrics"]

Figure = Literal[
    "accuracy", "precision", "recall", "f1", "specificity", "balanced_accuracy", "false_positive_rate", "false_negative_rate",
]
"""The name of a figure of :data:`CONFUSION_METRICS` (a type checker catches a misspelled one at the call)."""

Ratio = Callable[[Any, Any, Any, Any], tuple[Any, Any]]
"""``(tp, fp, tn, fn) -> (k, n)``: the figure is ``k / n``."""


@dataclass(frozen=True)
class ConfusionMetric:
    """One figure of a confusion matrix: ``ratio(tp, fp, tn, fn) = (k, n)``, the figure ``k / n``."""

    name: Figure
    title: str
    description: str
    ratio: Ratio | None
    """None for a mean of figures (``mean_of``)."""
    proportion: bool = True
    """``k`` successes in ``n`` trials: it has a Wilson interval (F1 and balanced accuracy do not)."""
    higher_is_better: bool = True
    reported: bool = True
    """One of the figures an ICM report lists (its ``metrics``)."""
    mean_of: tuple[Figure, ...] = ()
    """The figure is the mean of these figures (balanced accuracy), not ``ratio``."""


CONFUSION_METRICS: dict[str, ConfusionMetric] = {
    m.name: m
    for m in (
        ConfusionMetric("accuracy", "Accuracy", "Share of images whose flag matches the truth",
                        lambda tp, fp, tn, fn: (tp + tn, tp + fp + tn + fn)),
        ConfusionMetric("precision", "Precision", "Of the images flagged, the share that should be",
                        lambda tp, fp, tn, fn: (tp, tp + fp)),
        ConfusionMetric("recall", "Recall", "Of the images that should be flagged, the share that is",
                        lambda tp, fp, tn, fn: (tp, tp + fn)),
        ConfusionMetric("f1", "F1", "Harmonic mean of precision and recall",
                        lambda tp, fp, tn, fn: (2 * tp, 2 * tp + fp + fn), proportion=False),
        ConfusionMetric("specificity", "Specificity", "Of the images that should pass, the share that does",
                        lambda tp, fp, tn, fn: (tn, tn + fp)),
        ConfusionMetric("balanced_accuracy", "Balanced accuracy", "Mean of recall and specificity",
                        None, proportion=False, mean_of=("recall", "specificity")),
        ConfusionMetric("false_positive_rate", "False-positive rate", "Of the images that should pass, the share flagged",
                        lambda tp, fp, tn, fn: (fp, fp + tn), higher_is_better=False),
        ConfusionMetric("false_negative_rate", "Miss rate", "Of the images that should be flagged, the share that is not",
                        lambda tp, fp, tn, fn: (fn, tp + fn), higher_is_better=False, reported=False),
    )
}
"""Every figure of a confusion matrix, by name, in the order reports list them."""
if tuple(CONFUSION_METRICS) != get_args(Figure):  # pragma: no cover - a figure added to one and not the other
    raise TypeError(f"Figure {get_args(Figure)} and CONFUSION_METRICS {tuple(CONFUSION_METRICS)} name different figures")


def reported_metrics() -> list[ConfusionMetric]:
    """The figures an ICM report lists, in order."""
    return [m for m in CONFUSION_METRICS.values() if m.reported]


def _spec(name: str) -> ConfusionMetric:
    try:
        return CONFUSION_METRICS[name]
    except KeyError:
        raise KeyError(f"unknown confusion metric {name!r} (known: {', '.join(CONFUSION_METRICS)})") from None


class Confusion(BaseModel):
    """The four counts of a binary decision against the truth (``flagged`` = predicted positive)."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @classmethod
    def of(cls, truth: Iterable[bool] | np.ndarray, flagged: Iterable[bool] | np.ndarray) -> Confusion:
        """The counts of two boolean sequences of the same length."""
        y = np.asarray(list(truth) if not isinstance(truth, np.ndarray) else truth).astype(bool)
        f = np.asarray(list(flagged) if not isinstance(flagged, np.ndarray) else flagged).astype(bool)
        if y.shape != f.shape:
            raise ValueError(f"truth and flags differ in length ({y.size} and {f.size})")
        return cls(tp=int((y & f).sum()), fp=int((~y & f).sum()), tn=int((~y & ~f).sum()), fn=int((y & ~f).sum()))

    @property
    def total(self) -> int:
        """Everything counted: images, or keyword matches for the ICM-Val script."""
        return self.tp + self.fp + self.tn + self.fn

    def add(self, truth: bool, flagged: bool) -> None:
        if truth and flagged:
            self.tp += 1
        elif truth:
            self.fn += 1
        elif flagged:
            self.fp += 1
        else:
            self.tn += 1

    def ratio(self, name: Figure) -> tuple[int, int]:
        """``(k, n)`` of the figure ``name`` (``k / n``); not for a mean of figures."""
        spec = _spec(name)
        if spec.ratio is None:
            raise ValueError(f"{name} is the mean of {' and '.join(spec.mean_of)}, not one ratio")
        k, n = spec.ratio(self.tp, self.fp, self.tn, self.fn)
        return int(k), int(n)

    def value(self, name: Figure) -> float | None:
        """The figure ``name``; None where its denominator is 0."""
        spec = _spec(name)
        if spec.mean_of:
            parts = [self.value(p) for p in spec.mean_of]
            return None if any(p is None for p in parts) else sum(p for p in parts if p is not None) / len(parts)
        k, n = self.ratio(name)
        return k / n if n else None

    def ci(self, name: Figure, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float] | None:
        """The Wilson interval of the proportion ``name``; None where it has no trials."""
        if not _spec(name).proportion:
            raise ValueError(f"{name} is not a proportion: it has no Wilson interval (bootstrap it)")
        return wilson(*self.ratio(name), confidence)

    def interval(self, name: Figure, confidence: float = DEFAULT_CONFIDENCE) -> Interval | None:
        """:meth:`ci` as an :class:`~icm.evaluation.stats.Interval` (with its ``k`` and ``n``)."""
        if not _spec(name).proportion:
            raise ValueError(f"{name} is not a proportion: it has no Wilson interval (bootstrap it)")
        return wilson_interval(*self.ratio(name), confidence)

    def metrics(self) -> dict[str, float | None]:
        """The reported figures, by name (None where undefined)."""
        return {m.name: self.value(m.name) for m in reported_metrics()}

    def intervals(self, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Interval]:
        """Wilson intervals of the reported figures that are proportions (those with trials)."""
        out: dict[str, Interval] = {}
        for m in reported_metrics():
            if m.proportion and (iv := self.interval(m.name, confidence)) is not None:
                out[m.name] = iv
        return out


def confusion_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float | None]:
    """The reported figures of the counts (:meth:`Confusion.metrics`)."""
    return Confusion(tp=tp, fp=fp, tn=tn, fn=fn).metrics()


def metric_arrays(names: Iterable[Figure], tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """The figures ``names`` of arrays of counts, element-wise (nan or inf where a denominator is 0)."""
    out: dict[str, np.ndarray] = {}

    def one(name: Figure) -> np.ndarray:
        spec = _spec(name)
        if spec.ratio is None:
            return np.mean([one(p) for p in spec.mean_of], axis=0)
        k, n = spec.ratio(tp, fp, tn, fn)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(k, dtype=np.float64) / np.asarray(n, dtype=np.float64)

    for name in names:
        out[name] = one(name)
    return out
