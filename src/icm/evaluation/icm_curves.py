"""The threshold-free figures of an ICM evaluation: ROC and precision-recall curves, the
best-F1 threshold (scikit-learn) and the threshold sweep (:class:`~icm.evaluation.confusion.Confusion`
at each threshold of a grid)."""

from __future__ import annotations

import numpy as np

from icm.evaluation.confusion import Confusion
from icm.evaluation.icm_models import BestThreshold, Curve, SweepRow
from icm.evaluation.stats import DEFAULT_CONFIDENCE

MAX_CURVE_POINTS = 400


def _downsample(n: int, limit: int = MAX_CURVE_POINTS) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _finite(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def curves(y: np.ndarray, s: np.ndarray) -> tuple[Curve | None, Curve | None, BestThreshold | None, list[str]]:
    """ROC and precision-recall curves with their areas (scikit-learn), and the best-F1 threshold."""
    notes: list[str] = []
    if len(set(y.tolist())) < 2:
        return None, None, None, ["ROC and precision-recall curves need both positive and negative images"]
    try:
        from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
    except ImportError:
        return None, None, None, ["ROC/PR curves need scikit-learn: pip install 'icm-assistant[eval]'"]
    fpr, tpr, thr = roc_curve(y, s)
    idx = _downsample(len(fpr))
    roc = Curve(x=fpr[idx].tolist(), y=tpr[idx].tolist(), thresholds=_finite(thr[idx]), auc=float(roc_auc_score(y, s)))
    prec, rec, pthr = precision_recall_curve(y, s)
    ap = float(average_precision_score(y, s))
    idx = _downsample(len(prec))
    pr = Curve(x=rec[idx].tolist(), y=prec[idx].tolist(), thresholds=_finite(np.append(pthr, np.inf)[idx]), auc=ap)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(prec[:-1] + rec[:-1] > 0, 2 * prec[:-1] * rec[:-1] / (prec[:-1] + rec[:-1]), 0.0)
    best = int(np.argmax(f1))
    bt = BestThreshold(threshold=float(pthr[best]), f1=float(f1[best]), precision=float(prec[best]), recall=float(rec[best]))
    return roc, pr, bt, notes


def threshold_sweep(y: np.ndarray, s: np.ndarray, thresholds: list[float], confidence: float = DEFAULT_CONFIDENCE) -> list[SweepRow]:
    rows = []
    for t in thresholds:
        c = Confusion.of(y, s >= t)
        rows.append(SweepRow(threshold=t, **c.model_dump(), **{k: c.value(k) for k in ("precision", "recall", "f1", "accuracy")},
                             precision_ci=c.ci("precision", confidence), recall_ci=c.ci("recall", confidence)))
    return rows


def sweep_thresholds(step: float, threshold: float) -> list[float]:
    if not 0 < step < 1:
        raise ValueError("the sweep step must be between 0 and 1")
    grid = {round(float(t), 6) for t in np.arange(step, 1.0 - 1e-9, step)}
    grid.add(round(threshold, 6))
    return sorted(grid)
