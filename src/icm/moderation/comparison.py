"""The comparison that decided a verdict, written so that a reader can check it.

A reason such as "P(violation) is 0.70 -> review" next to a block threshold of 0.7 reads
as a contradiction when P(violation) is 0.6999. Here every value is printed with as many
decimals as it takes (two at least) for the printed number to compare with the threshold
as the value does: "P(violation)=0.6999 < block 0.7 -> review".
"""

from __future__ import annotations

from icm.policy.model import Thresholds


def fmt_threshold(t: float) -> str:
    """A threshold as short as it can be written without changing it (0.7, not 0.70)."""
    short = f"{t:g}"
    return short if float(short) == t else repr(float(t))


def fmt_against(x: float, *thresholds: float, min_digits: int = 2) -> str:
    """``x`` with the fewest decimals (at least ``min_digits``) whose printed value is on the
    same side of every threshold as ``x`` (below it, or at or above it)."""
    sides = [x < t for t in thresholds]
    for digits in range(min_digits, 18):
        text = f"{x:.{digits}f}"
        shown = float(text)
        if all((shown < t) == below for t, below in zip(thresholds, sides, strict=True)):
            return text
    return repr(float(x))


def verdict_comparison(th: Thresholds, violates: bool | None, low: float, high: float, point: float) -> str:
    """The threshold comparison behind the verdict of :func:`icm.policy.decision._verdict`.

    ``violates``: the decision's label (None: no product, a term score only); ``low`` /
    ``high``: the range of P(violation) (equal for a product's decision), ``point`` its
    estimate. Block needs ``low >= block``, allow ``high < review``.
    """
    review, block = th.review, th.block
    r, b = fmt_threshold(review), fmt_threshold(block)
    if abs(high - low) < 1e-12:
        p = low
        if violates is not False and p >= block:
            return f"P(violation)={fmt_against(p, block)} >= block {b}"
        if violates is not True and p < review:
            return f"P(violation)={fmt_against(p, review)} < review {r}"
        if violates is True:
            return f"P(violation)={fmt_against(p, block)} < block {b}"
        if violates is False:
            return f"P(violation)={fmt_against(p, review)} >= review {r}"
        return f"review {r} <= P(violation)={fmt_against(p, review, block)} < block {b}"
    head = f"P(violation) between {fmt_against(low, block)} and {fmt_against(high, review)} (estimate {point:.2f})"
    if violates is not False and low >= block:
        return f"{head}, lower end >= block {b}"
    if violates is not True and high < review:
        return f"{head}, upper end < review {r}"
    parts = []
    if violates is not False:
        parts.append(f"lower end < block {b}")
    if violates is not True:
        parts.append(f"upper end >= review {r}")
    return f"{head}, {' and '.join(parts)}"
