"""A video's verdict from its sampled frames: the worst frame, or corroborating frames.

By default a video takes its worst frame. A rule set with ``video: {aggregate: corroborate}``
(:class:`icm.policy.model.VideoAggregation`) blocks a video only when at least ``min_run``
of any ``window`` consecutive sampled frames block; a blocking frame without that
corroboration makes the video ``review``, never ``allow``. A blocking frame whose product a
policy maps to a zero-tolerance category (:data:`icm.policy.taxonomy.ZERO_TOLERANCE`)
blocks the video on its own. A video with fewer sampled frames than ``min_run`` is blocked
when all of them block.

Per-frame false alarms add up over a video: at 6% per frame, 60 frames give a false alarm
in 98% of clean videos under the worst frame (``bench/video_corroboration.py`` measures what
corroboration does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from icm.moderation.record import ModerationRecord, VerdictName
from icm.policy.model import Thresholds, VideoAggregation

How = Literal["worst", "corroborated", "uncorroborated", "zero-tolerance"]

SEVERITY: dict[str, int] = {"allow": 0, "review": 1, "block": 2}
"""How severe each verdict is (the worst verdict is the largest); the engine and bundles rank by it too."""
_JUDGED = frozenset({"attributes", "products", "term"})


@dataclass(frozen=True)
class VideoVerdict:
    """What :func:`aggregate_video` decided: the frame kept, the verdict and why."""

    chosen: int
    """Index (in the records given) of the frame the video's record comes from."""
    verdict: VerdictName | None
    how: How
    best: int
    """The most blocking frames found in any window of consecutive sampled frames."""
    note: str


def frame_verdict(r: ModerationRecord, thresholds: Thresholds | None) -> VerdictName | None:
    """The frame's verdict at ``thresholds`` (the rule of :func:`icm.policy.decision.decide`),
    or as recorded when none are given or the frame was not judged (refused, conflict ...)."""
    if thresholds is None or r.verdict is None or r.basis not in _JUDGED or r.p_violation is None or r.unanswered:
        return r.verdict
    low, high = r.p_violation_range or (r.p_violation, r.p_violation)
    violates = True if r.label == "violate" else False if r.label == "allow" else None
    if violates is not False and low >= thresholds.block:
        return "block"
    if violates is not True and high < thresholds.review:
        return "allow"
    return "review"


def _worst(records: Sequence[ModerationRecord], verdicts: Sequence[VerdictName | None], among: Sequence[int]) -> int:
    def key(i: int) -> tuple[int, float, int]:
        p = records[i].p_violation
        return (SEVERITY.get(verdicts[i] or "", -1), p if p is not None else -1.0, -i)

    return max(among, key=key)


def aggregate_video(
    records: Sequence[ModerationRecord], cfg: VideoAggregation, zero_tolerance: frozenset[str] = frozenset()
) -> VideoVerdict:
    """The video's verdict from its frames' records (in frame order) under ``cfg``."""
    if not records:
        raise ValueError("a video needs at least one judged frame")
    verdicts = [frame_verdict(r, cfg.thresholds) for r in records]
    blocks = [i for i, v in enumerate(verdicts) if v == "block"]
    zero = [i for i, r in enumerate(records) if r.product in zero_tolerance and (r.verdict == "block" or verdicts[i] == "block")]
    span = min(cfg.span, len(records))
    need = min(cfg.min_run, len(records))
    best, first = 0, -1
    for start in range(len(records) - span + 1):
        hits = sum(1 for v in verdicts[start : start + span] if v == "block")
        if hits > best:
            best, first = hits, start
    if zero:
        i = _worst(records, ["block"] * len(records), zero)
        return VideoVerdict(i, "block", "zero-tolerance", best,
                            f"product {records[i].product} is of a zero-tolerance category: one frame blocks the video")
    if best >= need:
        window = [i for i in range(first, first + span) if verdicts[i] == "block"]
        i = _worst(records, verdicts, window)
        return VideoVerdict(i, "block", "corroborated", best,
                            f"corroborated: {best} of {span} consecutive sampled frames block (at least {need} needed)")
    if blocks:
        i = _worst(records, verdicts, blocks)
        return VideoVerdict(i, "review", "uncorroborated", best,
                            f"not corroborated: {len(blocks)} frame(s) block but at most {best} of any {span} "
                            f"consecutive sampled frames (at least {need} needed to block): review")
    i = _worst(records, verdicts, range(len(records)))
    return VideoVerdict(i, verdicts[i], "worst", best, "no frame blocks: the worst frame decides")
