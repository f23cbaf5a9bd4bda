"""Choosing a rule set's ``review`` / ``block`` thresholds from labelled results.

A rule set turns P(violation) into a verdict with two thresholds (read
:func:`icm.policy.decision._verdict`; this module keeps the same rule as a function of the
numbers every record holds):

* **block** when the decision does not say *allow* (its label is ``violate``, or there is
  no product, as with a term score only) and P(violation) >= ``block`` (with a range,
  its lower end);
* **allow** when the decision does not say *violate* and P(violation) < ``review`` (with a
  range, its upper end), unless an answer was off-format (the engine never allows an
  image with unread answers);
* **review** otherwise. Every record with a verdict counts, whatever its attribute answers
  were (a model that says "Yes" to every question is blocked on the term alone, and those
  blocks count in the block precision). An image without a verdict of its own (refused,
  no evidence, conflict: the engine's ``review`` stands in for one) is reviewed whatever
  the thresholds; an error record has no verdict at all and is left out, with a count.

So the blocked set depends on ``block`` only and the allowed set on ``review`` only, and
each target picks one threshold:

* ``block_precision`` (of what is blocked, at least this share truly violates): the
  *lowest* ``block`` that meets it, so that as much as possible is blocked;
* ``allow_miss`` (of the true violations, at most this share is allowed): the *highest*
  ``review`` that meets it, so that as much as possible is allowed. The miss rate only
  grows with ``review``, so this is exact.

With ``by="bound"`` a target must hold for the whole Wilson interval (its lower end for a
precision, its upper end for a miss rate), not only for the point estimate: the safe
choice with little data. Scores within :data:`~icm.evaluation.gaps.TIE_TOLERANCE` (1e-9)
of each other are one score (float noise of the same evidence) and no threshold falls
between them. Any threshold between two neighbouring groups of scores gives the same
verdicts on the data; the one written is the decimal with the fewest digits strictly
between them, on the side of the chosen score (e.g. ``0.7`` for a gap from 0.55 to 0.75).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from icm.evaluation.confusion import Confusion
from icm.evaluation.gaps import simplest_between, tie_groups
from icm.evaluation.labels import LabelResolver, Truth
from icm.evaluation.policy_file import (
    CalibrationError,
    thresholds_field,
    write_calibrated,
)
from icm.evaluation.results import ResultItem, ResultSet, Status
from icm.evaluation.stats import DEFAULT_CONFIDENCE, wilson
from icm.policy import Policy, decide
from icm.policy.model import RuleSet, Thresholds

By = Literal["point", "bound"]
VerdictName = Literal["allow", "review", "block"]


def verdict_at(
    violates: bool | None, low: float, high: float, review: float, block: float, *, may_allow: bool = True,
) -> VerdictName:
    """The verdict of a judged image at the thresholds (the rule in the module docstring).

    ``may_allow=False`` for a record with an off-format answer: never allowed.
    """
    if violates is not False and low >= block:
        return "block"
    if may_allow and violates is not True and high < review:
        return "allow"
    return "review"


class OperatingPoint(BaseModel):
    """What a pair of thresholds does on the calibration data."""

    review: float
    block: float
    n: int = Field(description="Images counted (labelled, not failed)")
    blocked: int
    reviewed: int
    allowed: int
    blocked_fraction: float
    reviewed_fraction: float
    allowed_fraction: float
    blocked_ci: tuple[float, float] | None = None
    reviewed_ci: tuple[float, float] | None = None
    allowed_ci: tuple[float, float] | None = None
    blocked_violating: int = Field(description="Blocked images that truly violate")
    block_precision: float | None = Field(description="Of the blocked images, the share that truly violates")
    block_precision_ci: tuple[float, float] | None = None
    violations: int = Field(description="Images that truly violate")
    missed: int = Field(description="True violations allowed")
    allow_miss: float | None = Field(description="Of the true violations, the share allowed")
    allow_miss_ci: tuple[float, float] | None = None
    clean: int = Field(description="Images that truly do not violate")
    clean_allowed: int
    clean_allowed_rate: float | None = Field(description="Of the clean images, the share allowed without a person")


class TargetResult(BaseModel):
    name: str = Field(description="block_precision or allow_miss")
    target: float
    met: bool
    achieved: float | None = None
    ci: tuple[float, float] | None = None
    threshold: float | None = Field(default=None, description="The threshold chosen for it")
    message: str


class CalibrationReport(BaseModel):
    results: str
    labels: str
    policy: str
    rules: str
    confidence: float
    by: By
    n_records: int
    n_failed: int
    n_not_judged: int = Field(description="Labelled images not judged: reviewed whatever the thresholds")
    n_unlabelled: int
    n: int = Field(description="Images calibrated on: labelled and not failed")
    n_violations: int
    n_clean: int
    re_decided: int = Field(default=0, description="Records decided again under this rule set from their evidence")
    verdict_mismatches: int = Field(
        default=0, description="Records whose recorded verdict the rule does not reproduce at the thresholds they were written with"
    )
    current: OperatingPoint
    chosen: OperatingPoint | None = None
    targets: list[TargetResult] = Field(default_factory=list)
    ok: bool = Field(description="Every target named was met")
    block_sweep: list[OperatingPoint] = Field(default_factory=list, description="block varied, review fixed")
    review_sweep: list[OperatingPoint] = Field(default_factory=list, description="review varied, block fixed")
    notes: list[str] = Field(default_factory=list)


class _Data:
    """The calibration set as arrays: one entry per labelled, not failed image."""

    def __init__(
        self, truth: list[bool], state: list[int], low: list[float], high: list[float], judged: list[bool], may_allow: list[bool],
    ) -> None:
        self.truth = np.array(truth, dtype=bool)
        self.state = np.array(state, dtype=np.int8)  # 1 violate, 0 allow, -1 no product (term only)
        self.low = np.array(low, dtype=np.float64)
        self.high = np.array(high, dtype=np.float64)
        self.judged = np.array(judged, dtype=bool)
        self.may_allow = np.array(may_allow, dtype=bool)  # False: an off-format answer, never allowed

    def blocked(self, block: float) -> np.ndarray:
        return self.judged & (self.state != 0) & (self.low >= block)

    def allowed(self, review: float) -> np.ndarray:
        return self.judged & self.may_allow & (self.state != 1) & (self.high < review)


def _ci(k: int, n: int, confidence: float) -> tuple[float, float] | None:
    return wilson(k, n, confidence)


def operating_point(d: _Data, review: float, block: float, confidence: float = DEFAULT_CONFIDENCE) -> OperatingPoint:
    n = int(d.truth.size)
    b = d.blocked(block)
    a = d.allowed(review) & ~b
    nb, na = int(b.sum()), int(a.sum())
    nr = n - nb - na
    blocking = Confusion.of(d.truth, b)  # flagged: blocked
    passing = Confusion.of(d.truth, ~a)  # flagged: not allowed (a violation allowed is a miss)
    return OperatingPoint(
        review=review, block=block, n=n, blocked=nb, reviewed=nr, allowed=na,
        blocked_fraction=nb / n, reviewed_fraction=nr / n, allowed_fraction=na / n,
        blocked_ci=_ci(nb, n, confidence), reviewed_ci=_ci(nr, n, confidence), allowed_ci=_ci(na, n, confidence),
        blocked_violating=blocking.tp, block_precision=blocking.value("precision"), block_precision_ci=blocking.ci("precision", confidence),
        violations=passing.tp + passing.fn, missed=passing.fn, allow_miss=passing.value("false_negative_rate"),
        allow_miss_ci=passing.ci("false_negative_rate", confidence),
        clean=passing.tn + passing.fp, clean_allowed=passing.tn, clean_allowed_rate=passing.value("specificity"),
    )


def fmt_threshold(x: float) -> str:
    """A threshold as short as it can be written without changing it."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _choose_block(d: _Data, target: float, by: By, min_blocked: int, confidence: float) -> TargetResult:
    eligible = d.judged & (d.state != 0)
    order = np.argsort(d.low[eligible], kind="mergesort")
    lows, truths = d.low[eligible][order], d.truth[eligible][order]
    first = tie_groups(lows)  # where each group of equal scores starts; blocking from group i blocks lows[first[i]:]
    blocked_n = lows.size - first
    true_from = np.r_[np.cumsum(truths[::-1])[::-1], 0]  # violations among lows[i:]
    blocked_k = true_from[first]
    best: tuple[float, float, int, tuple[float, float] | None] | None = None  # (precision, c, blocked, ci)
    for i, start in enumerate(first):
        c = float(lows[start])
        nb = int(blocked_n[i])
        if nb < min_blocked:
            continue
        k = int(blocked_k[i])
        blocking = Confusion(tp=k, fp=nb - k)
        prec = blocking.value("precision") or 0.0  # nb >= 1
        ci = blocking.ci("precision", confidence)
        score = ci[0] if by == "bound" and ci else prec
        if best is None or score > best[0]:
            best = (score, c, nb, ci)
        if score >= target - 1e-12:
            lo = float(lows[start - 1]) if i > 0 else -1.0  # the highest score of the group below
            thr = max(0.0, simplest_between(lo, c))
            what = "lower end of its interval" if by == "bound" else "point estimate"
            return TargetResult(name="block_precision", target=target, met=True, achieved=prec, ci=ci, threshold=thr,
                                message=f"block precision >= {target:g} met at block {fmt_threshold(thr)}: {k}/{nb} = {prec:.4f}{_fmt_ci(ci)} "
                                        f"(the {what}; any lower threshold blocks more and misses it)")
    if best is None:
        return TargetResult(name="block_precision", target=target, met=False,
                            message=f"block precision >= {target:g} cannot be met on this data: no block threshold blocks "
                                    f"{min_blocked} or more judged images (none has a decision that may violate)")
    score, c, nb, _ = best
    what = "the lower end of its interval" if by == "bound" else "it"
    return TargetResult(name="block_precision", target=target, met=False, achieved=score,
                        message=f"block precision >= {target:g} cannot be met on this data: at best {what} is {score:.4f}, "
                                f"at block {c:.4g} ({nb} images blocked). Label more data, lower the target, or leave blocking "
                                "to people (a block threshold above every score blocks nothing automatically)")


def _choose_review(d: _Data, target: float, by: By, confidence: float) -> TargetResult:
    nv = int(d.truth.sum())
    if nv == 0:
        return TargetResult(name="allow_miss", target=target, met=False,
                            message="the allow miss rate cannot be measured: no labelled image truly violates")
    eligible = d.judged & d.may_allow & (d.state != 1)
    order = np.argsort(d.high[eligible], kind="mergesort")
    highs, truths = d.high[eligible][order], d.truth[eligible][order]
    # candidate k allows the groups of equal scores below group k, at the simplest decimal between
    # group k-1's highest score and group k's lowest; the last one allows them all (review 1)
    starts = tie_groups(highs).tolist()
    if not starts or highs[-1] < 1.0:
        starts.append(int(highs.size))
    missed_before = np.r_[0, np.cumsum(truths)][np.array(starts, dtype=np.int64)]
    chosen: tuple[int, float, int, tuple[float, float] | None] | None = None
    for i, start in enumerate(starts):
        missed = int(missed_before[i])
        passing = Confusion(fn=missed, tp=nv - missed)
        ci = passing.ci("false_negative_rate", confidence)
        score = ci[1] if by == "bound" and ci else passing.value("false_negative_rate") or 0.0  # nv >= 1
        if score <= target + 1e-12:
            lo = float(highs[start - 1]) if start > 0 else -1.0
            thr = 1.0 if start == highs.size else simplest_between(lo, float(highs[start]))
            chosen = (i, thr, missed, ci)
        else:
            break  # the miss rate never falls as review grows
    if chosen is None:
        ci = Confusion(tp=nv).ci("false_negative_rate", confidence)  # allowing nothing misses nothing: 0 of nv
        return TargetResult(name="allow_miss", target=target, met=False, achieved=ci[1] if ci else None, ci=ci,
                            message=f"allow miss rate <= {target:g} cannot be shown on this data: even allowing nothing, "
                                    f"the upper end of the {confidence:.0%} interval of 0/{nv} is {ci[1] if ci else float('nan'):.4f}; "
                                    "label more violations or use --by point")
    _, c, missed, ci = chosen
    thr = min(1.0, max(0.0, c))
    what = "upper end of its interval" if by == "bound" else "point estimate"
    return TargetResult(name="allow_miss", target=target, met=True, achieved=missed / nv, ci=ci, threshold=thr,
                        message=f"allow miss rate <= {target:g} met at review {fmt_threshold(thr)}: {missed}/{nv} = {missed / nv:.4f}{_fmt_ci(ci)} "
                                f"(the {what}; any higher threshold allows more and misses it)")


def _grid(step: float, extra: list[float]) -> list[float]:
    if not 0 < step <= 0.5:
        raise CalibrationError(f"the table step must be in (0, 0.5], got {step}")
    pts = {round(float(t), 6) for t in np.arange(0.0, 1.0 + 1e-9, step)}
    pts.update(float(x) for x in extra)  # exact: the chosen thresholds' rows must be the chosen ones
    return sorted(p for p in pts if 0.0 <= p <= 1.0)


@dataclass
class LeftOut:
    """Counts of the records :func:`labelled_records` leaves out."""

    failed: int = 0
    unlabelled: int = 0
    other_policy: int = 0


def labelled_records(
    items: Iterable[ResultItem], resolver: LabelResolver, left_out: LeftOut
) -> Iterator[tuple[ResultItem, Status, str | None, Truth]]:
    """The records a calibration can use, with their status, its reason and their truth; the others are counted in ``left_out``.

    Left out: failed records, records without a label, records written under another policy
    than ``resolver.policy``; once all are read, any of the last is a :class:`CalibrationError`.
    """
    for it in items:
        status, why = it.status()
        if status == "failed":
            left_out.failed += 1
            continue
        tr = resolver.truth(it.id, sha256=it.sha256)
        if tr is None:
            left_out.unlabelled += 1
            continue
        if it.policy is not None and it.policy != resolver.policy.name:
            left_out.other_policy += 1
            continue
        yield it, status, why, tr
    if left_out.other_policy:
        raise CalibrationError(f"{left_out.other_policy} record(s) were written under another policy than {resolver.policy.name!r}: pass --policy")


def calibrate(
    results: ResultSet,
    resolver: LabelResolver,
    *,
    block_precision: float | None = None,
    allow_miss: float | None = None,
    by: By = "point",
    min_blocked: int = 1,
    confidence: float = DEFAULT_CONFIDENCE,
    step: float = 0.05,
    labels_source: str = "file names",
) -> CalibrationReport:
    """Choose the thresholds of ``resolver.rule_set`` for the targets (see the module docstring)."""
    if block_precision is None and allow_miss is None:
        raise CalibrationError("name a target: --block-precision P (e.g. 0.95) and/or --allow-miss M (e.g. 0.01)")
    for name, goal in (("block precision", block_precision), ("allow miss rate", allow_miss)):
        if goal is not None and not 0.0 <= goal <= 1.0:
            raise CalibrationError(f"the {name} target must be between 0 and 1, got {goal}")
    if by not in ("point", "bound"):
        raise CalibrationError(f"--by must be point or bound, got {by!r}")
    policy: Policy = resolver.policy
    rs: RuleSet = resolver.rule_set
    cur = rs.thresholds
    notes = list(results.notes)

    truth: list[bool] = []
    state: list[int] = []
    low: list[float] = []
    high: list[float] = []
    judged: list[bool] = []
    may_allow: list[bool] = []
    not_judged = re_decided = mismatches = 0
    not_judged_why: Counter[str] = Counter()
    left_out = LeftOut()
    for it, status, why, tr in labelled_records(results.items, resolver, left_out):
        v: bool | None = None
        lo = hi = 0.0
        ok = status == "judged"
        if ok:
            if it.rules == rs.name and it.p_violation is not None:
                v = {"violate": True, "allow": False}.get(it.label or "")
                lo, hi = it.p_violation_range or (it.p_violation, it.p_violation)
                at = verdict_at(v, lo, hi, cur.review, cur.block, may_allow=not it.off_format)
                if it.verdict in ("allow", "review", "block") and at != it.verdict:
                    mismatches += 1
            elif it.has_evidence:
                try:
                    dec = decide(policy, rs, attributes=it.attributes or None, p_term=it.p_term)
                except (ValueError, KeyError) as exc:
                    ok, why = False, f"cannot re-decide: {exc}"
                else:
                    re_decided += 1
                    if dec.basis in ("none", "conflict"):
                        ok, why = False, f"basis {dec.basis}"
                    else:
                        v, (lo, hi) = dec.violates, dec.p_violation_range
            else:
                ok, why = False, "no evidence"
        if not ok:
            not_judged += 1
            not_judged_why[why or "not judged"] += 1
        truth.append(tr.positive)
        state.append(-1 if v is None else int(v))
        low.append(float(lo))
        high.append(float(hi))
        judged.append(ok)
        may_allow.append(not it.off_format)
    failed, unlabelled = left_out.failed, left_out.unlabelled
    if not truth:
        raise CalibrationError(
            f"no record can be calibrated on: {len(results.items)} records, {failed} failed, {unlabelled} without a label "
            f"(labels: {labels_source}; keys are the image path, file name, stem or SHA-256)"
        )
    d = _Data(truth, state, low, high, judged, may_allow)
    nv = int(d.truth.sum())
    if failed:
        notes.append(f"{failed} failed record(s) (errors, no verdict) are left out of the calibration")
    if unlabelled:
        notes.append(f"{unlabelled} record(s) have no label and are left out")
    if not_judged:
        notes.append(f"{not_judged} labelled image(s) were not judged ({', '.join(f'{k}: {v}' for k, v in not_judged_why.most_common())}): "
                     "they are reviewed whatever the thresholds, and counted in the fractions and the miss rate's denominator")
    if mismatches:
        notes.append(f"{mismatches} record(s) have a verdict the rule does not give at the thresholds they were written with "
                     f"(review {fmt_threshold(cur.review)}, block {fmt_threshold(cur.block)}): the records may come from an older decision model; "
                     "decide them again or check the table against a fresh run")
    if re_decided:
        notes.append(f"{re_decided} record(s) were decided again under rule set {rs.name!r} from their recorded evidence")

    targets: list[TargetResult] = []
    new_block, new_review = cur.block, cur.review
    if block_precision is not None:
        t = _choose_block(d, block_precision, by, min_blocked, confidence)
        targets.append(t)
        if t.met and t.threshold is not None:
            new_block = t.threshold
    if allow_miss is not None:
        t = _choose_review(d, allow_miss, by, confidence)
        targets.append(t)
        if t.met and t.threshold is not None:
            new_review = t.threshold
            if new_review <= 0.0:
                notes.append("to meet the allow miss target nothing can be allowed automatically: every image that is not "
                             "blocked goes to a person")
    ok = all(t.met for t in targets)
    if new_review > new_block:
        notes.append(f"the review threshold that meets the allow target ({fmt_threshold(new_review)}) is above the block threshold "
                     f"({fmt_threshold(new_block)}); review is set to {fmt_threshold(new_block)} (allowing less can only lower the miss rate)")
        new_review = new_block
    try:
        Thresholds(review=new_review, block=new_block)
    except ValueError as exc:  # pragma: no cover - ordered above
        raise CalibrationError(str(exc)) from None
    current = operating_point(d, cur.review, cur.block, confidence)
    chosen = operating_point(d, new_review, new_block, confidence) if ok else None
    fix_r, fix_b = (new_review, new_block) if ok else (cur.review, cur.block)
    grid = _grid(step, [cur.review, cur.block, new_review, new_block])
    block_sweep = [operating_point(d, fix_r, b, confidence) for b in grid if b >= fix_r]
    review_sweep = [operating_point(d, r, fix_b, confidence) for r in grid if r <= fix_b]
    if nv == 0:
        notes.append("no labelled image truly violates: block precision is 0 wherever anything is blocked")
    return CalibrationReport(
        results=results.source, labels=labels_source, policy=policy.name, rules=rs.name, confidence=confidence, by=by,
        n_records=len(results.items), n_failed=failed, n_not_judged=not_judged, n_unlabelled=unlabelled, n=int(d.truth.size),
        n_violations=nv, n_clean=int(d.truth.size) - nv, re_decided=re_decided, verdict_mismatches=mismatches,
        current=current, chosen=chosen, targets=targets, ok=ok, block_sweep=block_sweep, review_sweep=review_sweep, notes=notes,
    )


# -- the policy file -------------------------------------------------------------------------------


def header_lines(report: CalibrationReport, source: str, previous: Thresholds) -> list[str]:
    """The lines of the comment that says how the thresholds were chosen."""
    c = report.chosen
    assert c is not None
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    from icm import __version__

    lines = [
        f"Calibrated by `icm eval calibrate` (icm {__version__}) on {now}.",
        f"Policy {report.policy!r} from {source}; only rule set {report.rules!r} changed:",
        f"  thresholds review {fmt_threshold(previous.review)} -> {fmt_threshold(c.review)}, block {fmt_threshold(previous.block)} -> {fmt_threshold(c.block)}",
        f"Chosen on {report.results} with labels from {report.labels}: {report.n} images "
        f"({report.n_violations} violate, {report.n_clean} do not; {report.n_not_judged} not judged, always reviewed); "
        f"{report.n_failed} failed and {report.n_unlabelled} unlabelled records left out.",
        f"Targets ({'point estimates' if report.by == 'point' else f'whole {report.confidence:.0%} Wilson interval'}):",
        *(f"  {t.message}" for t in report.targets),
        f"On that data at these thresholds: blocked {c.blocked_fraction:.1%}, reviewed {c.reviewed_fraction:.1%}, "
        f"allowed {c.allowed_fraction:.1%}; block precision {_num(c.block_precision)}{_fmt_ci(c.block_precision_ci)}, "
        f"allow miss rate {_num(c.allow_miss)}{_fmt_ci(c.allow_miss_ci)} ({report.confidence:.0%} Wilson intervals).",
        f"Use: icm moderate IMAGES --policy THIS_FILE --rules {report.rules}",
    ]
    return lines

def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def write_override(report: CalibrationReport, policy_ref: str, out: str | Path) -> Path:
    """Write the policy with the chosen thresholds to ``out`` (the whole policy: ``--policy`` takes a whole one)."""
    if not report.ok or report.chosen is None:
        raise CalibrationError("a target was not met: no policy file is written")
    value, flow = thresholds_field(report.chosen.review, report.chosen.block)
    return write_calibrated(policy_ref, out, report.rules, "thresholds", value, flow,
                            lambda source, previous: header_lines(report, source, previous.thresholds))
