"""Choosing a rule set's ``video`` setting from labelled videos (``icm eval calibrate --video``).

A rule set with ``video: {aggregate: corroborate, min_run, window, thresholds}`` blocks a
video only when ``min_run`` of any ``window`` consecutive sampled frames block (read
:mod:`icm.moderation.corroborate`). Every video record keeps its frames' P(violation) and
verdicts (``frame_scores``), so another setting is tried on the records without
moderating again (:func:`redecide_video`):

* ``min_run`` and ``window`` are exact: the frames' verdicts are counted again;
* a per-frame block threshold (``--frame-threshold``) can only be *raised* above the one
  the frames were judged at: a frame that blocked keeps blocking when its P(violation) is
  at least the new threshold, else it becomes ``review``; a frame that did not block never
  blocks (its record does not say whether its product may violate). To try lower
  per-frame thresholds, moderate with a lower ``video.thresholds.block`` first. The
  candidates are the simplest decimals between neighbouring groups of the blocking
  frames' scores (:func:`icm.evaluation.gaps.simplest_between`; scores within
  :data:`~icm.evaluation.gaps.TIE_TOLERANCE` are one group and never split). A frame
  decided on a range of P(violation) is compared by its point value.

A video whose kept frame is of a zero-tolerance product (``aggregate: zero-tolerance``, or
a blocked worst frame of such a product) is blocked whatever the setting. The search runs
``min_run`` 1 to 5 and ``window`` ``min_run`` to ``min_run + 3`` (``min_run`` 1 is the worst
frame) and picks, with point estimates on all the labelled videos given:

* ``recall_loss`` (default 0.01): the lowest share of clean videos blocked among the
  settings that block at most that much fewer of the violating videos than the worst frame
  at the recorded frame verdicts;
* ``false_block``: the highest share of violating videos blocked among the settings that
  block at most that share of clean videos.

Ties go to the smaller ``min_run``, then ``window``, then threshold. Stills
(records without ``aggregate``) are left out: calibrate their thresholds without ``--video``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field
from rich.table import Table

from icm.evaluation.calibrate import LeftOut, fmt_threshold, labelled_records
from icm.evaluation.confusion import Confusion
from icm.evaluation.gaps import simplest_between, tie_groups
from icm.evaluation.labels import LabelResolver
from icm.evaluation.policy_file import CalibrationError, write_calibrated
from icm.evaluation.results import ResultSet
from icm.evaluation.stats import DEFAULT_CONFIDENCE
from icm.policy.model import RuleSet, Thresholds, VideoAggregation
from icm.policy.taxonomy import zero_tolerance_products

Goal = Literal["recall_loss", "false_block"]
VideoVerdictName = Literal["allow", "review", "block"]
MIN_RUNS = (1, 2, 3, 4, 5)
WINDOW_EXTRA = 3
_CODE = {"allow": 0, "review": 1, "block": 2}
_NAMES: dict[int, VideoVerdictName] = {0: "allow", 1: "review", 2: "block"}
_ABSENT = -1.0  # "no window holds the run": below every score and every threshold
_RECORDED = -0.5  # the threshold of "frames as recorded": every blocking frame blocks


class _Frame(Protocol):
    @property
    def p_violation(self) -> float | None: ...
    @property
    def verdict(self) -> str | None: ...


class VideoLike(Protocol):
    """A video's record: a :class:`~icm.moderation.record.ModerationRecord` or a results item."""

    @property
    def frame_scores(self) -> Sequence[_Frame]: ...
    @property
    def aggregate(self) -> str | None: ...
    @property
    def product(self) -> str | None: ...
    @property
    def verdict(self) -> str | None: ...
    @property
    def p_violation(self) -> float | None: ...


def _frames(video: VideoLike) -> tuple[np.ndarray, np.ndarray]:
    """The frames' scores and verdict codes (2 block, 1 review, 0 allow, -1 none); a one-frame video is its record."""
    frames: Sequence[_Frame] = video.frame_scores or [video]
    p = np.array([f.p_violation if f.p_violation is not None else 0.0 for f in frames], dtype=np.float64)
    codes = np.array([_CODE.get(f.verdict or "", -1) for f in frames], dtype=np.int8)
    return p, codes


def _zero(video: VideoLike, zero_tolerance: frozenset[str]) -> bool:
    return video.aggregate == "zero-tolerance" or (video.product in zero_tolerance and video.verdict == "block")


def _decide(blocks: np.ndarray, codes: np.ndarray, min_run: int, window: int, zero: bool) -> int:
    """The rule of :func:`icm.moderation.corroborate.aggregate_video` on the frames' verdicts (-1: none)."""
    if zero:
        return 2
    n = blocks.size
    span, need = min(window, n), min(min_run, n)
    c = np.r_[0, np.cumsum(blocks)]
    if n and int((c[span:] - c[:-span]).max()) >= need:
        return 2
    if blocks.any() or (codes == 2).any():  # a blocking frame not corroborated (or demoted by a higher threshold)
        return 1
    return int(codes.max()) if n else -1


def redecide_video(video: VideoLike, cfg: VideoAggregation | None, zero_tolerance: frozenset[str] = frozenset()) -> VideoVerdictName | None:
    """The video's verdict under ``cfg`` from its recorded frames, without moderating again.

    ``cfg.thresholds.block`` counts only above the threshold the frames were judged at (a
    frame that did not block never blocks here); ``None`` or ``aggregate: worst`` is the
    worst frame.
    """
    p, codes = _frames(video)
    corroborate = cfg is not None and cfg.aggregate == "corroborate"
    t = cfg.thresholds.block if corroborate and cfg is not None and cfg.thresholds else None
    blocks = (codes == 2) & (p >= t) if t is not None else codes == 2
    min_run, window = (cfg.min_run, cfg.span) if corroborate and cfg is not None else (1, 1)
    return _NAMES.get(_decide(blocks, codes, min_run, window, _zero(video, zero_tolerance)))


class VideoCandidate(BaseModel):
    """What one video setting does on the labelled videos."""

    min_run: int
    window: int
    frame_block: float | None = Field(description="Per-frame block threshold; None: the frames' verdicts as recorded")
    n: int
    clean: int
    violations: int
    clean_blocked: int
    false_block_rate: float | None = Field(description="Of the clean videos, the share blocked")
    false_block_ci: tuple[float, float] | None = None
    violating_blocked: int
    block_recall: float | None = Field(description="Of the violating videos, the share blocked")
    block_recall_ci: tuple[float, float] | None = None
    reviewed: int
    review_rate: float
    allowed: int
    meets: bool = False

    def setting(self) -> str:
        t = "as recorded" if self.frame_block is None else fmt_threshold(self.frame_block)
        return f"min_run {self.min_run}, window {self.window}, frame block {t}"


class VideoCalibrationReport(BaseModel):
    results: str
    labels: str
    policy: str
    rules: str
    goal: Goal
    recall_loss: float | None = None
    false_block: float | None = None
    frame_thresholds_searched: bool
    judged_at: Thresholds = Field(description="The per-frame thresholds the recorded frame verdicts are taken to be at")
    n_records: int
    n_stills: int = Field(description="Records that are not videos: left out")
    n_failed: int
    n_unlabelled: int
    n_not_judged: int = Field(description="Labelled videos without a verdict of their own: reviewed whatever the setting")
    n: int = Field(description="Videos calibrated on")
    n_violations: int
    n_clean: int
    baseline: VideoCandidate = Field(description="The worst frame at the recorded frame verdicts")
    current: VideoCandidate = Field(description="The rule set's video setting as it is")
    chosen: VideoCandidate | None = None
    video: VideoAggregation | None = Field(default=None, description="The video block written into the policy")
    candidates: list[VideoCandidate] = Field(
        default_factory=list,
        description="Each min_run/window at the recorded frame verdicts, and (with frame thresholds) at its best threshold for the goal",
    )
    frame_thresholds: list[float] = Field(default_factory=list, description="The per-frame block thresholds searched")
    n_searched: int = Field(default=0, description="Settings tried: min_run x window x per-frame threshold")
    ok: bool
    message: str
    notes: list[str] = Field(default_factory=list)


class _Videos:
    """Per video, for each (min_run, window): the highest threshold at which it is blocked."""

    def __init__(self, truth: list[bool], judged: list[bool], zero: list[bool], frames: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.truth = np.array(truth, dtype=bool)
        self.judged = np.array(judged, dtype=bool)
        self.zero = np.array(zero, dtype=bool) & self.judged
        top_w = max(MIN_RUNS) + WINDOW_EXTRA
        self.reach = np.full((len(frames), max(MIN_RUNS) + 1, top_w + 1), _ABSENT)
        self.any_block = np.zeros(len(frames), dtype=bool)
        self.worst = np.zeros(len(frames), dtype=np.int8)
        for v, (p, codes) in enumerate(frames):
            n = codes.size
            self.any_block[v] = bool((codes == 2).any())
            self.worst[v] = int(codes.max()) if n else -1
            if not self.any_block[v]:
                continue
            bp = np.where(codes == 2, p, _ABSENT)
            for w in range(1, top_w + 1):
                span = min(w, n)
                # each window's blocking scores, highest first: the m-th is the highest threshold blocking m of them
                wins = -np.sort(-np.lib.stride_tricks.sliding_window_view(bp, span), axis=1)
                for m in range(1, min(w, max(MIN_RUNS)) + 1):  # window >= min_run
                    need = min(m, n)
                    self.reach[v, m, w] = float(wins[:, need - 1].max())

        self.allowed = int((self.judged & ~self.zero & ~self.any_block & (self.worst == 0)).sum())  # whatever the setting
        live = self.judged & ~self.zero
        self._zero_k = (int((self.zero & ~self.truth).sum()), int((self.zero & self.truth).sum()))
        self._live = (live & ~self.truth, live & self.truth)

    def counts(self, min_run: int, window: int, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clean and violating videos blocked at each per-frame threshold of ``cuts`` (ascending)."""
        out = []
        for zero_k, live in zip(self._zero_k, self._live, strict=True):
            r = np.sort(self.reach[live, min_run, window])
            out.append(zero_k + r.size - np.searchsorted(r, cuts, side="left"))  # videos whose reach >= the threshold
        return out[0], out[1]

    def row(self, min_run: int, window: int, t: float | None, fb: int, tb: int, confidence: float) -> VideoCandidate:
        n, nv = int(self.truth.size), int(self.truth.sum())
        nr = n - fb - tb - self.allowed
        c = Confusion(tp=tb, fp=fb, fn=nv - tb, tn=n - nv - fb)  # flagged: blocked
        return VideoCandidate(
            min_run=min_run, window=window, frame_block=t, n=n, clean=n - nv, violations=nv,
            clean_blocked=fb, false_block_rate=c.value("false_positive_rate"), false_block_ci=c.ci("false_positive_rate", confidence),
            violating_blocked=tb, block_recall=c.value("recall"), block_recall_ci=c.ci("recall", confidence),
            reviewed=nr, review_rate=nr / n if n else 0.0, allowed=self.allowed,
        )


def _frame_cuts(frames: list[tuple[np.ndarray, np.ndarray]], judged: list[bool]) -> list[float]:
    """Thresholds between neighbouring groups of the blocking frames' scores (the lowest group: as recorded)."""
    scores = np.sort(np.concatenate([p[codes == 2] for (p, codes), ok in zip(frames, judged, strict=True) if ok] or [np.zeros(0)]))
    first = tie_groups(scores)
    return [simplest_between(float(scores[i - 1]), float(scores[i])) for i in first[1:]]


def calibrate_video(
    results: ResultSet,
    resolver: LabelResolver,
    *,
    recall_loss: float | None = None,
    false_block: float | None = None,
    frame_threshold: bool = False,
    confidence: float = DEFAULT_CONFIDENCE,
    labels_source: str = "file names",
) -> VideoCalibrationReport:
    """Choose ``resolver.rule_set``'s video setting for the goal (see the module docstring)."""
    if recall_loss is not None and false_block is not None:
        raise CalibrationError("name one video goal: --recall-loss or --false-block")
    goal: Goal = "false_block" if false_block is not None else "recall_loss"
    if recall_loss is None and false_block is None:
        recall_loss = 0.01
    for name, x in (("recall loss", recall_loss), ("false-block rate", false_block)):
        if x is not None and not 0.0 <= x <= 1.0:
            raise CalibrationError(f"the {name} must be between 0 and 1, got {x}")
    policy, rs = resolver.policy, resolver.rule_set
    cur = rs.video
    judged_at = cur.thresholds if cur is not None and cur.aggregate == "corroborate" and cur.thresholds else rs.thresholds
    zt = zero_tolerance_products(policy)
    notes = list(results.notes)
    truth: list[bool] = []
    judged: list[bool] = []
    zero: list[bool] = []
    frames: list[tuple[np.ndarray, np.ndarray]] = []
    not_judged = below = 0
    other_rules: set[str] = set()
    current_v: list[int] = []
    videos = [it for it in results.items if it.aggregate is not None]
    stills = len(results.items) - len(videos)
    left_out = LeftOut()
    for it, status, _, tr in labelled_records(videos, resolver, left_out):
        if it.rules is not None and it.rules != rs.name:
            other_rules.add(it.rules)
            continue
        ok = status == "judged"
        not_judged += not ok
        p, codes = _frames(it)
        below += int(((codes == 2) & (p < judged_at.block - 1e-12)).sum())
        truth.append(tr.positive)
        judged.append(ok)
        zero.append(_zero(it, zt))
        frames.append((p, codes))
        current_v.append(_CODE[redecide_video(it, cur, zt) or "review"] if ok else 1)
    failed, unlabelled = left_out.failed, left_out.unlabelled
    if other_rules:
        raise CalibrationError(f"video records were decided under rule set(s) {', '.join(sorted(other_rules))}, not {rs.name!r}: "
                               "their frame verdicts cannot be decided again; moderate the videos under this rule set")
    if not truth:
        raise CalibrationError(f"no labelled video record to calibrate on: {len(results.items)} records, {stills} not videos, "
                               f"{failed} failed, {unlabelled} without a label (labels: {labels_source})")
    d = _Videos(truth, judged, zero, frames)
    nv = int(d.truth.sum())
    if goal == "recall_loss" and nv == 0:
        raise CalibrationError("no labelled video truly violates: the share of violating videos blocked cannot be measured")
    if goal == "false_block" and nv == d.truth.size:
        raise CalibrationError("every labelled video violates: the share of clean videos blocked cannot be measured")
    for k, what in ((stills, "record(s) are not videos (stills, images): left out; calibrate them without --video"),
                    (failed, "failed video record(s) are left out"), (unlabelled, "video record(s) have no label and are left out"),
                    (not_judged, "labelled video(s) have no verdict of their own: reviewed whatever the setting"),
                    (below, f"blocking frame(s) score below block {fmt_threshold(judged_at.block)}, the threshold the "
                            "frames are taken to be judged at: the records may come from another version of the rule set")):
        if k:
            notes.append(f"{k} {what}")
    cut_list = _frame_cuts(frames, judged) if frame_threshold else []
    cuts = np.array([_RECORDED, *cut_list])
    settings = [(m, w) for m in MIN_RUNS for w in range(m, m + WINDOW_EXTRA + 1)]
    fb, tb = (np.stack(x) for x in zip(*(d.counts(m, w, cuts) for m, w in settings), strict=True))  # [setting, threshold]
    nc = int(d.truth.size) - nv
    if goal == "recall_loss":
        assert recall_loss is not None
        meets = tb >= tb[0, 0] - recall_loss * nv - 1e-9  # the worst frame at the recorded verdicts always meets it
        rank = np.lexsort((np.arange(tb.size), -tb.ravel(), fb.ravel()))  # fewest clean blocked, most violating, simplest
    else:
        assert false_block is not None
        meets = fb <= false_block * nc + 1e-9
        rank = np.lexsort((np.arange(tb.size), fb.ravel(), -tb.ravel()))  # most violating blocked, fewest clean, simplest
    order = [int(i) for i in rank if meets.ravel()[i]]

    def row(si: int, ti: int) -> VideoCandidate:
        c = d.row(*settings[si], None if ti == 0 else cut_list[ti - 1], int(fb[si, ti]), int(tb[si, ti]), confidence)
        c.meets = bool(meets[si, ti])
        return c

    shown: dict[tuple[int, int], VideoCandidate] = {(si, 0): row(si, 0) for si in range(len(settings))}
    if cut_list:  # each setting's best per-frame threshold for the goal
        done: set[int] = set()
        for i in order:
            si, ti = divmod(i, cuts.size)
            if si not in done:
                done.add(si)
                shown[(si, ti)] = shown.get((si, ti)) or row(si, ti)
    cands = sorted(shown.values(), key=lambda c: (c.min_run, c.window, -1.0 if c.frame_block is None else c.frame_block))
    baseline = shown[(0, 0)]
    chosen = shown.get(divmod(order[0], cuts.size)) if order else None
    cv = np.array(current_v, dtype=np.int8)
    cm, cw = (cur.min_run, cur.span) if cur is not None and cur.aggregate == "corroborate" else (1, 1)
    current = d.row(cm, cw, None, int(((cv == 2) & ~d.truth).sum()), int(((cv == 2) & d.truth).sum()), confidence)
    if chosen is not None and goal == "recall_loss":
        assert recall_loss is not None
        message = (f"{chosen.setting()}: clean videos blocked {_pct(chosen.false_block_rate)} (worst frame "
                   f"{_pct(baseline.false_block_rate)}), violating videos blocked {_pct(chosen.block_recall)} (worst frame "
                   f"{_pct(baseline.block_recall)}, at most {_points(recall_loss)} fewer allowed)")
    elif chosen is not None:
        message = (f"{chosen.setting()}: clean videos blocked {_pct(chosen.false_block_rate)} (at most {false_block:g} "
                   f"wanted), violating videos blocked {_pct(chosen.block_recall)}")
    else:
        least = row(*divmod(int(np.argmin(fb)), cuts.size))
        message = (f"no setting blocks at most {false_block:g} of the clean videos: the fewest is {_pct(least.false_block_rate)} "
                   f"({least.setting()}); zero-tolerance videos block whatever the setting")
    ok = chosen is not None
    video: VideoAggregation | None = None
    if chosen is not None:
        thr = None if chosen.frame_block is None else Thresholds(review=min(judged_at.review, chosen.frame_block), block=chosen.frame_block)
        if thr is None and cur is not None and cur.aggregate == "corroborate":
            thr = cur.thresholds  # the frames were judged at these: keep them
        video = VideoAggregation(aggregate="corroborate", min_run=chosen.min_run, window=chosen.window, thresholds=thr)
    return VideoCalibrationReport(
        results=results.source, labels=labels_source, policy=policy.name, rules=rs.name, goal=goal, recall_loss=recall_loss,
        false_block=false_block, frame_thresholds_searched=frame_threshold, judged_at=judged_at, n_records=len(results.items),
        n_stills=stills, n_failed=failed, n_unlabelled=unlabelled, n_not_judged=not_judged, n=int(d.truth.size),
        n_violations=nv, n_clean=int(d.truth.size) - nv, baseline=baseline, current=current, chosen=chosen, video=video,
        candidates=cands, frame_thresholds=cut_list, n_searched=int(fb.size), ok=ok, message=message, notes=notes,
    )


def _points(x: float) -> str:
    return f"{x * 100:g} point{'' if x == 0.01 else 's'}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def video_table(report: VideoCalibrationReport) -> Table:
    """The candidates' trade-off: clean videos blocked, violating videos blocked, videos reviewed."""
    title = (f"video settings of {report.policy}:{report.rules} on {report.n} labelled videos "
             f"({report.n_violations} violate, {report.n_clean} do not)")
    if report.frame_thresholds:
        title += (f"; {report.n_searched} tried over {len(report.frame_thresholds) + 1} per-frame block thresholds, "
                  "each min_run/window shown at the recorded frame verdicts and at its best threshold for the goal")
    t = Table(title=title)
    for col in ("min_run", "window", "frame block", "clean blocked", "violating blocked", "reviewed", ""):
        t.add_column(col, justify="right" if col else "left")
    key = _key(report.chosen)
    for c in report.candidates:
        mark = "chosen" if _key(c) == key else "worst frame" if _key(c) == _key(report.baseline) else "meets" if c.meets else ""
        t.add_row(str(c.min_run), str(c.window), "recorded" if c.frame_block is None else fmt_threshold(c.frame_block),
                  f"{c.clean_blocked}/{c.clean} {_pct(c.false_block_rate)}", f"{c.violating_blocked}/{c.violations} {_pct(c.block_recall)}",
                  f"{c.reviewed}/{c.n} {_pct(c.review_rate)}", mark)
    return t


def _key(c: VideoCandidate | None) -> tuple[int, int, float | None] | None:
    return None if c is None else (c.min_run, c.window, c.frame_block)


def _flow(cfg: VideoAggregation) -> str:
    parts = [f"aggregate: {cfg.aggregate}", f"min_run: {cfg.min_run}", f"window: {cfg.span}"]
    if cfg.thresholds is not None:
        parts.append(f"thresholds: {{review: {cfg.thresholds.review!r}, block: {cfg.thresholds.block!r}}}")
    return "{" + ", ".join(parts) + "}"


def write_video_override(report: VideoCalibrationReport, policy_ref: str, out: str | Path) -> Path:
    """Write the whole policy with the rule set's chosen ``video`` block to ``out``, under a header saying how."""
    if not report.ok or report.video is None or report.chosen is None:
        raise CalibrationError("the video goal was not met: no policy file is written")
    cfg = VideoAggregation.model_validate(report.video.model_dump() | {"window": report.video.span})
    from icm import __version__

    c = report.chosen
    goal = (f"at most {_points(report.recall_loss)} fewer violating videos blocked than the worst frame"
            if report.goal == "recall_loss" and report.recall_loss is not None else f"at most {report.false_block:g} of clean videos blocked")

    def header(source: str, previous: RuleSet) -> list[str]:
        return [
            f"Calibrated by `icm eval calibrate` --video (icm {__version__}) on {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
            f"Policy {report.policy!r} from {source}; only rule set {report.rules!r} changed: video {_flow(cfg)}",
            f"Chosen on {report.results} with labels from {report.labels}: {report.n} videos ({report.n_violations} violate, "
            f"{report.n_clean} do not); goal: {goal}.",
            f"On that data: clean videos blocked {c.clean_blocked}/{c.clean} (worst frame {report.baseline.clean_blocked}), "
            f"violating videos blocked {c.violating_blocked}/{c.violations} (worst frame {report.baseline.violating_blocked}), "
            f"reviewed {c.reviewed}/{c.n}.",
            f"Use: icm moderate VIDEOS --policy THIS_FILE --rules {report.rules}",
        ]

    return write_calibrated(policy_ref, out, report.rules, "video", cfg.model_dump(mode="json"), _flow(cfg), header)
