"""Where a threshold falls between scores: ties within float noise, the simplest decimal in a gap.

Two records decided from the same evidence can differ in the last bits of their
P(violation) (a sum taken in another order, a logit difference read through another
path). A threshold must never fall between them: calibration groups scores that lie
within :data:`TIE_TOLERANCE` of each other (chained: each score within the tolerance of
the group's previous one) and places thresholds only between distinct groups.
"""

from __future__ import annotations

import math

import numpy as np

TIE_TOLERANCE = 1e-9
"""Scores this close are the same score (float noise): one group, never split by a threshold."""


def tie_groups(sorted_values: np.ndarray, tol: float = TIE_TOLERANCE) -> np.ndarray:
    """The index where each group of ``sorted_values`` (ascending) starts.

    A new group starts where a value is more than ``tol`` above the one before it.
    """
    v = np.asarray(sorted_values, dtype=np.float64)
    if v.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.r_[0, np.flatnonzero(np.diff(v) > tol) + 1].astype(np.int64)


def simplest_between(lo: float, hi: float) -> float:
    """The decimal with the fewest digits strictly between ``lo`` and ``hi``, the closest to ``hi`` of those.

    ``0.7`` for (0.55, 0.75), ``0.626`` for (0.62, 0.6261241772283035). When ``hi <= lo``
    (nothing between) ``hi`` itself.
    """
    if not hi > lo:
        return hi
    for digits in range(0, 18):
        scale = 10**digits
        k = math.floor(hi * scale)
        v = round(k / scale, digits)
        while v >= hi:  # strictly below hi, whatever the float rounding did
            k -= 1
            v = round(k / scale, digits)
        if v > lo:
            return v
    return (lo + hi) / 2  # pragma: no cover - two distinct doubles always have a decimal between them
