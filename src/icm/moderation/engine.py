"""The moderation engine: images in, one checked verdict per image out.

The engine knows nothing of its entry points (CLI, HTTP server, batch job): it takes
decoded images, asks a backend the policy's questions, turns the answers into evidence
and lets the policy's rule set decide (:func:`icm.policy.decide`).

With a second backend (``escalate_to``) the engine runs a *cascade*: the first backend
(typically the offline detector) sees every image, and only the images it cannot clear
with confidence (verdict other than ``allow``, or nothing judged) go to the second
(an MLLM). Each record says which stage decided.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from icm.moderation.backends.base import (
    TEXT_SOURCES,
    Answer,
    Backend,
    BackendConfigError,
    Box,
    Choice,
    Failed,
    NotJudged,
    Query,
    YesNoScore,
)
from icm.moderation.comparison import fmt_against, verdict_comparison
from icm.moderation.corroborate import SEVERITY, aggregate_video, frame_verdict
from icm.moderation.files import moderate_files, moderate_in_batches
from icm.moderation.images import DEFAULT_MAX_FRAMES, FrameView, LoadedImage
from icm.moderation.record import BoxRecord, FrameScore, ModerationRecord, TermScore, Timings
from icm.moderation.video import DEFAULT_FPS
from icm.policy import Decision, Policy, decide, load_policy
from icm.policy.model import RuleSet, VideoAggregation
from icm.policy.prompts import attribute_prompts, explanation_prompt, term_prompt
from icm.policy.taxonomy import SCHEMES, category_scores, flagged_categories, zero_tolerance_products

log = logging.getLogger(__name__)


def build_queries(policy: Policy) -> list[Query]:
    """The term's yes/no question and one lettered question per attribute."""
    t = term_prompt(policy)
    queries = [Query(key=f"term:{t.term}", kind="yes_no", question=t.question, term=t.term)]
    for a in attribute_prompts(policy):
        queries.append(
            Query(
                key=f"attr:{a.attribute}",
                kind="choice",
                question=a.question,
                options=tuple(a.options),
                option_ids=tuple(a.option_ids),
                attribute=a.attribute,
            )
        )
    return queries


@dataclass
class _Evidence:
    term: YesNoScore | None
    attributes: dict[str, dict[str, float]]
    sources: dict[str, str]
    boxes: list[Box]
    failed: dict[str, str]  # query key -> why its request failed
    unanswered: dict[str, NotJudged]  # query key -> why it is not judged (refused, off-format, cannot-judge)


def _collect(policy: Policy, queries: Sequence[Query], answers: dict[str, object]) -> _Evidence:
    term: YesNoScore | None = None
    attributes: dict[str, dict[str, float]] = {}
    sources: dict[str, str] = {}
    boxes: list[Box] = []
    seen_boxes: set[tuple] = set()
    failed: dict[str, str] = {}
    unanswered: dict[str, NotJudged] = {}
    for q in queries:
        ans = answers.get(q.key)
        if isinstance(ans, Failed):
            failed[q.key] = ans.error
            continue
        if ans is None or isinstance(ans, NotJudged):
            unanswered[q.key] = ans if isinstance(ans, NotJudged) else NotJudged("cannot-judge")
            continue
        for b in (getattr(ans, "raw", None) or {}).get("boxes", []) or []:
            if isinstance(b, Box):
                k = (b.label, b.x, b.y, b.w, b.h)
                if k not in seen_boxes:
                    seen_boxes.add(k)
                    boxes.append(b)
        if q.kind == "yes_no" and isinstance(ans, YesNoScore):
            term = ans
        elif q.kind == "choice" and isinstance(ans, Choice) and q.attribute:
            if len(ans.probs) != len(q.option_ids):
                raise ValueError(f"backend returned {len(ans.probs)} probabilities for {len(q.option_ids)} options of {q.attribute!r}")
            attributes[q.attribute] = dict(zip(q.option_ids, (float(p) for p in ans.probs), strict=True))
            sources[q.attribute] = ans.source
    return _Evidence(term, attributes, sources, boxes, failed, unanswered)


@dataclass
class Prefetched:
    """Answers a caller already has for a batch's first stage (a bundle asks once for all its policies).

    ``answers`` maps ``id(view image)`` (the PIL object :meth:`LoadedImage.judged_views` holds)
    to that view's ``{query key: answer}``; ``model_ms`` is this policy's share of the model
    time per view.
    """

    answers: dict[int, dict[str, Answer]]
    model_ms: float


ESCALATED_NOTE = "escalated by "
"""How a cascade record escalated to the second stage begins its first note."""


def was_escalated(record: ModerationRecord) -> bool | None:
    """Whether the cascade sent this record's image to its second stage; ``None`` outside a cascade."""
    if not record.stage:
        return None
    return bool(record.notes) and record.notes[0].startswith(ESCALATED_NOTE)


def escalation_counts(records: Iterable[ModerationRecord]) -> tuple[int, int]:
    """``(escalated, judged by the cascade)`` over the records that went through a cascade."""
    flags = [e for e in (was_escalated(r) for r in records if r.ok) if e is not None]
    return sum(flags), len(flags)


def _reason(policy: Policy, d: Decision) -> str:
    if d.basis == "none":
        return "Not judged: the backend gave no usable evidence for this policy."
    if d.basis == "conflict":
        return f"Conflicting evidence: {d.conflict}; sent to review under rule set '{d.rules}'."
    # the comparison that decided, with the digits it takes to show it (0.6999 < block 0.7)
    th = policy.rule_set(d.rules).thresholds
    cmp = verdict_comparison(th, d.violates, *d.p_violation_range, d.p_violation)
    if d.product is None and d.label is not None:  # the most likely cells are ones no product covers
        cell = ", ".join(f"{a}={v}" for a, v in (d.cell or {}).items())
        verb = "violate" if d.label.violates else "are allowed"
        return (
            f"Most likely: cells no product covers (p={d.p_uncovered:.2f}; most likely cell {cell}); they {verb} "
            f"by the default of rule set '{d.rules}'; {cmp} -> {d.verdict}."
        )
    if d.product is not None and d.label is not None:
        verb = "violates" if d.label.violates else "is allowed"
        return (
            f"Most likely product '{d.product}' (p={d.product_probability:.2f}) {verb} under "
            f"rule set '{d.rules}' ({d.label.rule}); {cmp} -> {d.verdict}."
        )
    return (
        f"P({policy.term.id})={fmt_against(d.p_term or 0.0, th.review, th.block)} from the term question alone, no attribute product "
        f"identified; under rule set '{d.rules}' {cmp} -> {d.verdict}."
    )


def _apply_unanswered(
    rec: ModerationRecord, unanswered: dict[str, NotJudged], mapped: dict[str, dict[str, list[str]]] | None = None,
) -> ModerationRecord:
    """Record why queries went unanswered; a refusal or an off-format answer is never allowed.

    A refusal ("I'm sorry, but I can't help with that.") says nothing about which product
    the image is, and often that it is one a model will not discuss: the verdict is
    ``review``, basis ``refused``, with no product and no P(violation) (the evidence that
    was answered stays in ``term`` and ``attributes``). An off-format answer leaves its query out of the evidence;
    the rest decides, but ``allow`` becomes ``review``.
    """
    rec.unanswered = {key: nj.describe() for key, nj in unanswered.items()}
    refused = [key for key, nj in unanswered.items() if nj.reason == "refused"]
    off = [key for key, nj in unanswered.items() if nj.reason == "off-format"]
    if refused:
        said = next((str(unanswered[k].raw.get("text") or "").strip() for k in refused if unanswered[k].raw.get("text")), "")
        rec.product = rec.product_probability = rec.product_description = None
        rec.rule = rec.label = rec.severity = None
        rec.p_violation = rec.p_violation_range = None  # what was answered is not the whole picture
        rec.basis = "refused"
        rec.verdict = "review"
        rec.category_scores = {}
        if mapped is not None:  # a refusal is never passed as clean in any category
            rec.flagged_categories = {name: list(cats) for name, cats in mapped.items()}
        rec.reason = (
            f"The model refused to answer {', '.join(refused)}"
            + (f" ({said[:80]!r})" if said else "")
            + ": no product is assigned and the image goes to review."
        )
    elif off and rec.verdict == "allow":
        rec.verdict = "review"
        rec.reason = (
            f"The model's answer to {', '.join(off)} was not one of the labels, so that evidence is missing; "
            f"the rest would allow ({rec.reason}) but an image with unread answers is not allowed -> review."
        )
    elif off:
        rec.notes.append(f"not judged (off-format answer): {', '.join(off)}")
    return rec


class Moderator:
    """Runs one policy and rule set over images with a backend (and an optional second stage)."""

    def __init__(
        self,
        backend: Backend,
        *,
        policy: Policy | str = "icm-sexy",
        rules: str | None = None,
        explain: bool = False,
        escalate_to: Backend | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        self.policy = load_policy(policy) if isinstance(policy, str) else policy
        self.rule_set: RuleSet = self.policy.rule_set(rules)
        video = self.rule_set.video
        self._video = (video, zero_tolerance_products(self.policy)) if video and video.aggregate == "corroborate" else None
        # a guard-model preset renders its prompt from the policy and rule set: each Moderator asks its own view
        self.backend = backend.bind_policy(self.policy, self.rule_set)
        self.escalate_to = escalate_to.bind_policy(self.policy, self.rule_set) if escalate_to is not None else None
        self.explain = explain
        self.max_new_tokens = max_new_tokens
        self.queries = build_queries(self.policy)
        for b in (backend, escalate_to):  # the detector judges from the policy's evidence section
            if b is not None:
                b.use_policy(self.policy)
        # The policy's content, not its name: a calibrated copy keeps the name and rule-set
        # names but decides differently, so --resume must not take its old records as done.
        self.policy_digest = hashlib.sha256(self.policy.model_dump_json().encode()).hexdigest()[:16]
        self.explain_prompt = explanation_prompt(self.policy)

    @property
    def backend_name(self) -> str:
        return "cascade" if self.escalate_to is not None else self.backend.name

    @property
    def model_id(self) -> str:
        first = self.backend.model_id_for(self.policy)  # the detector: the sources this policy runs
        if self.escalate_to is not None:
            return f"{first} -> {self.escalate_to.model_id}"
        return first

    # -- one stage -----------------------------------------------------------------------

    def _run_stage(
        self, backend: Backend, images: Sequence[LoadedImage], prefetched: Prefetched | None = None
    ) -> list[ModerationRecord]:
        """Ask, decide and (optionally) explain for a batch; a failing batch is retried per image.

        With ``prefetched`` holding every image's answers the backend is not asked again.
        """
        t0 = time.perf_counter()
        if prefetched is not None and all(id(im.image) in prefetched.answers for im in images):
            answers = [prefetched.answers[id(im.image)] for im in images]
            return self._decide_stage(backend, images, answers, prefetched.model_ms)
        try:
            answers = backend.ask([im.image for im in images], self.queries)
            if len(answers) != len(images):
                raise RuntimeError(f"backend {backend.name!r} returned {len(answers)} answers for {len(images)} images")
        except BackendConfigError:
            raise  # no image can succeed: stop the job with this one message
        except Exception as exc:  # noqa: BLE001 - isolate the bad image, keep the batch going
            if len(images) == 1:
                return [self.error_record(images[0].source, f"{backend.name} backend failed: {type(exc).__name__}: {exc}", images[0])]
            log.warning("batch of %d failed (%s); retrying image by image", len(images), exc)
            return [r for im in images for r in self._run_stage(backend, [im])]
        model_ms = (time.perf_counter() - t0) * 1000 / max(1, len(images))
        return self._decide_stage(backend, images, answers, model_ms)

    def _decide_stage(
        self, backend: Backend, images: Sequence[LoadedImage], answers: Sequence[dict[str, Answer]], model_ms: float
    ) -> list[ModerationRecord]:
        records = []
        for im, ans in zip(images, answers, strict=True):
            try:
                records.append(self._record(backend, im, ans, model_ms))
            except Exception as exc:  # noqa: BLE001 - one image's odd answers are its error record; the batch goes on
                records.append(self.error_record(im.source, f"could not interpret the {backend.name} backend's answers: {exc}", im))
        if self.explain and backend.supports("generate"):
            self._add_explanations(backend, images, records)
        return records

    def _record(self, backend: Backend, im: LoadedImage, answers: dict, model_ms: float) -> ModerationRecord:
        """One image's record from its answers.

        A query whose request failed makes the whole record an error naming every failed
        query (no verdict from partial evidence; ``--resume`` retries it). A refused query
        makes the verdict ``review`` with no product; an off-format one makes ``allow``
        into ``review``; ``cannot-judge`` (a detector asked about an action) only leaves
        the attribute out, as before.
        """
        ev = _collect(self.policy, self.queries, answers)
        if ev.failed:
            err = "; ".join(f"{key}: {why}" for key, why in ev.failed.items())
            rec = self.error_record(im.source, f"{backend.name} backend failed on {len(ev.failed)} of {len(self.queries)} queries: {err}", im)
            rec.failed_queries = dict(ev.failed)
            rec.notes = list(im.notes)
            rec.stage = backend.name if self.escalate_to is not None else None
            rec.timings = Timings(model_ms=round(model_ms, 3))
            return rec
        p_term = ev.term.p_yes if ev.term is not None else None
        d = decide(self.policy, self.rule_set, attributes=ev.attributes or None, p_term=p_term)
        scores = category_scores(self.policy, self.rule_set, d)
        not_judged = [a.id for a in self.policy.attributes if a.id not in ev.attributes]
        notes = list(im.notes)
        from_text = [f"term:{self.policy.term.id}"] if ev.term is not None and ev.term.source in TEXT_SOURCES else []
        from_text += [f"attr:{a}" for a, src in ev.sources.items() if src in TEXT_SOURCES]
        if from_text:
            notes.append(f"read from the answer text (one sampled answer, no usable logprobs): {', '.join(from_text)}")
        rec = ModerationRecord(
            path=im.source,
            sha256=im.sha256,
            bytes=im.n_bytes,
            width=im.width,
            height=im.height,
            policy=self.policy.name,
            policy_digest=self.policy_digest,
            rules=self.rule_set.name,
            backend=self.backend_name,
            model=self.model_id,
            stage=backend.name if self.escalate_to is not None else None,
            term=TermScore(
                term=self.policy.term.id,
                question=self.policy.term.question,
                p_yes=p_term,
                source=ev.term.source if ev.term is not None else None,
            ),
            attributes=ev.attributes,
            attribute_sources=ev.sources,
            not_judged=not_judged,
            product=d.product,
            product_probability=d.product_probability,
            product_description=d.product_description,
            rule=d.label.rule if d.label else None,
            label=d.label.verdict if d.label else None,
            severity=d.label.severity if d.label else None,
            p_violation=d.p_violation,
            p_violation_range=d.p_violation_range,
            basis=d.basis,
            p_uncovered=d.p_uncovered,
            cell=d.cell,
            conflict=d.conflict,
            verdict=d.verdict,
            category_scores=scores,
            flagged_categories=flagged_categories(scores, self.rule_set.thresholds.review),
            reason=_reason(self.policy, d),
            boxes=[BoxRecord(**b.as_dict()) for b in ev.boxes],
            notes=notes,
            timings=Timings(model_ms=round(model_ms, 3)),
        )
        rec = _apply_unanswered(rec, ev.unanswered, self.policy.standard_categories)
        return backend.finish_record(rec, answers, self.policy, self.rule_set)  # a guard-model preset adds its categories and rationale

    def _add_explanations(self, backend: Backend, images: Sequence[LoadedImage], records: list[ModerationRecord]) -> None:
        todo = [(im, r) for im, r in zip(images, records, strict=True) if r.ok]
        if not todo:
            return
        t0 = time.perf_counter()
        messages = [[{"role": "user", "content": self.explain_prompt}] for _ in todo]
        try:
            texts = backend.generate([im.image for im, _ in todo], messages, max_new_tokens=self.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - the verdicts stand without an explanation
            for _, r in todo:
                r.notes.append(f"explanation failed: {type(exc).__name__}: {exc}")
            return
        ms = (time.perf_counter() - t0) * 1000 / len(todo)
        for (_, r), text in zip(todo, texts, strict=True):
            r.explanation = text.strip() if text else None
            r.timings.explain_ms = round(ms, 3)

    def error_record(self, path: str, error: str, im: LoadedImage | None = None) -> ModerationRecord:
        return ModerationRecord(
            path=path,
            sha256=im.sha256 if im else None,
            bytes=im.n_bytes if im else None,
            width=im.width if im else None,
            height=im.height if im else None,
            policy=self.policy.name,
            policy_digest=self.policy_digest,
            rules=self.rule_set.name,
            backend=self.backend_name,
            model=self.model_id,
            error=error,
        )

    # -- public --------------------------------------------------------------------------

    def moderate_loaded(
        self, images: Sequence[LoadedImage], load_ms: Sequence[float] | None = None, *, prefetched: Prefetched | None = None
    ) -> list[ModerationRecord]:
        """Moderate decoded images (one batch), cascade included.

        Every view of every image (each sampled frame, over each background that matters)
        is judged, all views of the batch together; each image then takes its worst view
        (:func:`_worst_view`), after escalation with the cascade. A view that fails makes
        the whole image an error: no verdict is made on part of its frames. ``prefetched``
        answers the first stage (see :class:`Prefetched`); the second stage always asks.
        """
        if not images:
            return []
        owners: list[int] = []
        metas: list[FrameView] = []
        views: list[LoadedImage] = []
        for i, im in enumerate(images):
            judged = im.judged_views()
            for v in judged:
                owners.append(i)
                metas.append(v)
                views.append(im if len(judged) == 1 and v.image is im.image
                             else replace(im, image=v.image, width=v.image.width, height=v.image.height, views=[]))
        multi = len(views) > len(images)
        # With several views per image, explain only the view kept (below), not every frame.
        runner = self
        if self.explain and multi:
            runner = copy.copy(self)
            runner.explain = False
        records = runner._run_stage(self.backend, views, prefetched)
        deciders: list[Backend] = [self.backend] * len(records)
        if self.escalate_to is not None:
            idx = [i for i, r in enumerate(records) if r.ok and r.verdict != "allow"]
            if idx:
                second = runner._run_stage(self.escalate_to, [views[i] for i in idx])
                for i, r in zip(idx, second, strict=True):
                    r.notes.insert(0, f"{ESCALATED_NOTE}{self.backend.name}: {records[i].reason}")
                    r.timings.model_ms += records[i].timings.model_ms
                    records[i] = r
                    deciders[i] = self.escalate_to
        out: list[ModerationRecord] = []
        kept: list[int] = []
        for i, im in enumerate(images):
            members = [j for j, o in enumerate(owners) if o == i]
            record, j = _aggregate(im, [records[j] for j in members], [metas[j] for j in members], self._video)
            out.append(record)
            kept.append(members[j])
        if runner is not self:
            for backend in {id(b): b for b in deciders}.values():
                todo = [(views[j], r) for j, r in zip(kept, out, strict=True) if deciders[j] is backend and r.ok]
                if todo and backend.supports("generate"):
                    self._add_explanations(backend, [v for v, _ in todo], [r for _, r in todo])
        for i, r in enumerate(out):
            r.timings.load_ms = load_ms[i] if load_ms else 0.0
            r.timings.total_ms = round(r.timings.load_ms + r.timings.model_ms + r.timings.explain_ms, 3)
        return out

    def moderate_paths(
        self,
        paths: Sequence[str],
        *,
        max_pixels: int | None = None,
        max_frames: int | None = None,
        fps: float | None = None,
    ) -> list[ModerationRecord]:
        """Load and moderate one batch of files (stills, multi-frame images, videos).

        Unreadable files become error records. ``max_frames`` and ``fps`` set the frame
        sampling (defaults :data:`DEFAULT_MAX_FRAMES` and :data:`DEFAULT_FPS`).
        """
        return moderate_files(paths, self.moderate_loaded, self.error_record,
                              max_pixels=max_pixels, max_frames=max_frames, fps=fps)

def _worst_view(records: Sequence[ModerationRecord]) -> int:
    """The view an image is judged by: the most severe verdict, then the highest P(violation), then the earliest.

    Verdict first: a file is blocked when any of its frames is, and a frame that was refused or
    answered off-format (verdict ``review``, often with no P(violation)) keeps the whole file
    from being allowed, whatever P(violation) the other frames have.
    """
    def key(i: int) -> tuple[int, float, int]:
        r = records[i]
        return (SEVERITY.get(r.verdict or "", -1), r.p_violation if r.p_violation is not None else -1.0, -i)

    return max(range(len(records)), key=key)


def _aggregate(
    im: LoadedImage, records: Sequence[ModerationRecord], metas: Sequence[FrameView],
    video: tuple[VideoAggregation, frozenset[str]] | None = None,
) -> tuple[ModerationRecord, int]:
    """One record for an image from its views' records, and the index of the view it came from.

    A video under a rule set with ``video: {aggregate: corroborate}`` is decided by
    :func:`icm.moderation.corroborate.aggregate_video`; anything else takes its worst view.
    """
    def where(m: FrameView) -> str:
        at = f"frame {m.frame}" + (f" at {m.timestamp:g}s" if m.timestamp is not None else "")
        return at + (f" over {m.background}" if m.background else "")

    failed = [i for i, r in enumerate(records) if not r.ok]
    decided = aggregate_video(records, *video) if video and im.mode == "video" and not failed else None
    chosen = failed[0] if failed else decided.chosen if decided else _worst_view(records)
    r, m = records[chosen], metas[chosen]
    thresholds = video[0].thresholds if decided is not None and video else None
    frame_verdicts = [frame_verdict(y, thresholds) for y in records]  # before the kept record changes
    if decided is not None:
        if r.verdict != decided.verdict:
            r.notes.insert(0, f"{where(m)} alone: {r.verdict}")
            r.verdict = decided.verdict
        r.notes.insert(0, f"video verdict from {len(records)} frames ({decided.how}, {where(m)}): {decided.note}")
        r.aggregate = decided.how
    elif im.mode == "video":
        r.aggregate = "worst"
    if len(records) > 1:
        if failed:
            r.error = f"{where(m)} (of {im.frames} frames): {r.error}"
        else:
            if decided is None:
                r.notes.insert(0, f"worst of {len(records)} views judged: {where(m)}")
            # a category is as likely as in the view where it is most likely, whichever view decided
            for x in records:
                for name, cats in x.category_scores.items():
                    for cat, p in cats.items():
                        r.category_scores.setdefault(name, {})[cat] = max(p, r.category_scores.get(name, {}).get(cat, 0.0))
                for name, flagged in x.flagged_categories.items():
                    r.flagged_categories[name] = [c for c in SCHEMES[name] if c in flagged or c in r.flagged_categories.get(name, [])]
            r.frame_scores = [
                FrameScore(frame=x.frame, timestamp=x.timestamp, background=x.background,
                           p_violation=y.p_violation, verdict=v, scene_change=x.scene)
                for x, y, v in zip(metas, records, frame_verdicts, strict=True)
            ]
        r.timings.model_ms = round(sum(x.timings.model_ms for x in records), 3)
    r.frame, r.timestamp, r.background = m.frame, m.timestamp, m.background
    r.frames_seen, r.frame_count = im.frames_seen, im.frames
    if im.frames > 1:
        r.unsampled_gap_frames, r.unsampled_gap_s = im.gap_frames, im.gap_s
    return r, chosen


def moderate(
    images: Iterable[str] | str,
    *,
    policy: Policy | str = "icm-sexy",
    rules: str | None = None,
    backend: Backend | str = "detector",
    explain: bool = False,
    batch_size: int = 8,
    max_frames: int = DEFAULT_MAX_FRAMES,
    fps: float = DEFAULT_FPS,
    **backend_options: object,
) -> list[ModerationRecord]:
    """Moderate image and video files with a policy; the library form of ``icm moderate``.

    Multi-frame images and videos are judged on up to ``max_frames`` frames (videos
    sampled at ``fps``); each record carries the worst frame. ``policy`` may name a bundle
    (``icm-standard``, ``icm-standard:teen`` or a bundle YAML file): then each image has one
    record per member policy (:func:`icm.moderation.bundle.moderate_bundle`).

    >>> records = moderate(["photo.jpg"], policy="icm-sexy", rules="children")  # doctest: +SKIP
    """
    if isinstance(policy, str):  # a bundle (icm-standard[:RULES]): one record per image and member policy
        from icm.moderation.bundle import moderate_bundle, parse_bundle_ref

        if parse_bundle_ref(policy, rules) is not None:
            return moderate_bundle(images, bundle=policy, rules=rules, backend=backend, explain=explain,
                                   batch_size=batch_size, max_frames=max_frames, fps=fps, **backend_options)

    def start(be: Backend) -> Callable[[list[str]], list[ModerationRecord]]:
        mod = Moderator(be, policy=policy, rules=rules, explain=explain)
        return lambda batch: mod.moderate_paths(batch, max_frames=max_frames, fps=fps)

    return moderate_in_batches(images, backend, backend_options, batch_size, start)
