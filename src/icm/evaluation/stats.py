"""Confidence intervals for evaluation figures: Wilson score and a stratified bootstrap.

* Every **proportion** (accuracy, precision, recall, coverage, a blocked fraction, a miss
  rate ...) gets a Wilson score interval: unlike the normal ("Wald") interval it stays
  inside [0, 1] and keeps close to its nominal coverage for small counts and for
  proportions near 0 or 1, which is where moderation figures live. It needs only the
  normal quantile, from :class:`statistics.NormalDist` (no scipy).
* **Threshold-free figures** (ROC AUC, average precision) and those that are not a single
  proportion (F1, balanced accuracy) get a percentile bootstrap interval. The resampling is
  stratified (positives and negatives resampled apart, as pROC does by default), so every
  resample has both classes, and vectorised with numpy: a resample is a vector of
  multinomial counts over the items, and each figure is computed from the counts without
  copying the data. It is seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from pydantic import BaseModel, Field

DEFAULT_CONFIDENCE = 0.95
DEFAULT_BOOTSTRAP = 1000
DEFAULT_SEED = 0


class Interval(BaseModel):
    """A confidence interval of one figure."""

    low: float
    high: float
    method: str = Field(description="wilson or bootstrap")
    confidence: float
    k: int | None = Field(default=None, description="Successes (Wilson)")
    n: int | None = Field(default=None, description="Trials (Wilson) or items resampled (bootstrap)")
    resamples: int | None = Field(default=None, description="Bootstrap resamples with a defined value")

    def text(self, fmt: str = ".4f") -> str:
        return f"[{self.low:{fmt}}, {self.high:{fmt}}]"


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"the confidence level must be between 0 and 1 (e.g. 0.95), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float] | None:
    """The Wilson score interval of ``k`` successes in ``n`` trials; None when ``n`` is 0.

    >>> tuple(round(x, 4) for x in wilson(8, 10))
    (0.4902, 0.9433)
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = _z(confidence)
    if n == 0:
        return None
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    # exact at the ends: k = 0 has lower bound 0, k = n upper bound 1 (rounding can miss by 1e-17)
    return (0.0 if k == 0 else low, 1.0 if k == n else high)


def wilson_interval(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> Interval | None:
    w = wilson(k, n, confidence)
    if w is None:
        return None
    return Interval(low=w[0], high=w[1], method="wilson", confidence=confidence, k=k, n=n)


# -- bootstrap -------------------------------------------------------------------------------


def _group_sums(weights: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per resample (rows), the sums of the columns of each group of equal scores."""
    return np.add.reduceat(weights, starts, axis=1)


def _stratified_counts(rng: np.random.Generator, mask: np.ndarray, size: int) -> np.ndarray:
    """``size`` multinomial resamples of the items under ``mask`` (zero elsewhere)."""
    n = int(mask.sum())
    out = np.zeros((size, mask.size), dtype=np.float64)
    if n:
        out[:, mask] = rng.multinomial(n, np.full(n, 1.0 / n), size=size)
    return out


def bootstrap_curve_metrics(
    y: np.ndarray,
    s: np.ndarray,
    *,
    threshold: float | None = None,
    resamples: int = DEFAULT_BOOTSTRAP,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
    chunk: int = 200,
) -> dict[str, Interval]:
    """Percentile bootstrap intervals of ROC AUC and average precision (and, given a
    ``threshold``, of F1 and balanced accuracy at ``score >= threshold``).

    AUC is the Mann-Whitney statistic with ties counted one half (scikit-learn's
    ``roc_auc_score``); average precision is scikit-learn's step-wise
    ``average_precision_score``. Both are computed for all resamples at once from the
    multinomial counts, a chunk of resamples at a time to bound memory.
    """
    from icm.evaluation.confusion import metric_arrays  # it reads the Wilson interval here

    _z(confidence)
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError("labels and scores must be 1-D and of the same length")
    if resamples < 1:
        return {}
    if y.all() or not y.any():
        return {}
    order = np.argsort(s, kind="mergesort")
    s, y = s[order], y[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of equal scores, ascending
    flagged = s >= threshold if threshold is not None else None
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {"roc_auc": [], "average_precision": []}
    if flagged is not None:
        values["f1"], values["balanced_accuracy"] = [], []
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        wp = _stratified_counts(rng, y, b)
        wn = _stratified_counts(rng, ~y, b)
        pg, ng = _group_sums(wp, starts), _group_sums(wn, starts)
        ptot, ntot = pg.sum(axis=1), ng.sum(axis=1)
        below = np.cumsum(ng, axis=1) - ng
        values["roc_auc"].append((pg * (below + 0.5 * ng)).sum(axis=1) / (ptot * ntot))
        # average precision: thresholds from the highest score down; precision at each group
        tp_at = np.cumsum(pg[:, ::-1], axis=1)
        fp_at = np.cumsum(ng[:, ::-1], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = np.where(tp_at + fp_at > 0, tp_at / (tp_at + fp_at), 0.0)
        values["average_precision"].append((pg[:, ::-1] * prec).sum(axis=1) / ptot)
        if flagged is not None:
            tp = wp[:, flagged].sum(axis=1)
            fp = wn[:, flagged].sum(axis=1)
            for name, v in metric_arrays(("f1", "balanced_accuracy"), tp, fp, ntot - fp, ptot - tp).items():
                values[name].append(v)
        done += b
    alpha = 1.0 - confidence
    out: dict[str, Interval] = {}
    for name, chunks in values.items():
        v = np.concatenate(chunks)
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
        out[name] = Interval(low=float(lo), high=float(hi), method="bootstrap", confidence=confidence, n=int(y.size), resamples=int(v.size))
    return out
