"""ICM accuracy: how well moderation scores separate images that should be flagged.

The default protocol counts **each image once**, with the truth of its own category
(:mod:`icm.evaluation.labels`) and flags an image when its score is at least the
threshold (``score >= t``, scikit-learn's convention and the published ICM-Test script's).

``protocol="paper"`` reproduces the published scripts' figure and says how it differs
(:mod:`icm.evaluation.icm_paper`: the ICM-Val script counts each category keyword matched
in a name, and flags ``score > t``; the ICM-Test script counts each image once).

The score of an image is, by default, P(violation) under the *evaluation* rule set: the
recorded value when the record was decided under that rule set, else re-decided from the
record's evidence (term score and attribute distributions) with :func:`icm.policy.decide`.
For the paper's JSON, whose only evidence is the term score, that is P(term) itself under
any rule set that labels exactly the positive products ``violate`` (the paper's rules).

The report's records are in :mod:`icm.evaluation.icm_models`, the curves and the sweep in
:mod:`icm.evaluation.icm_curves`, every confusion figure in :mod:`icm.evaluation.confusion`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from icm.evaluation.confusion import Confusion
from icm.evaluation.icm_curves import MAX_CURVE_POINTS, curves, sweep_thresholds, threshold_sweep
from icm.evaluation.icm_models import (
    BestThreshold,
    CategoryRow,
    Curve,
    ErrorItem,
    ICMReport,
    PaperProtocol,
    Protocol,
    Scored,
    ScoreMode,
    SweepRow,
)
from icm.evaluation.icm_paper import paper_protocol
from icm.evaluation.labels import LabelResolver, Truth
from icm.evaluation.results import ResultItem, ResultSet
from icm.evaluation.stats import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_CONFIDENCE,
    DEFAULT_SEED,
    Interval,
    bootstrap_curve_metrics,
    wilson_interval,
)
from icm.policy import decide

__all__ = [
    "MAX_CURVE_POINTS", "BestThreshold", "CategoryRow", "Confusion", "Curve", "ErrorItem", "ICMReport", "PaperProtocol", "Protocol",
    "ScoreMode", "Scored", "SweepRow", "curves", "evaluate_icm", "item_score", "paper_protocol", "sweep_thresholds", "threshold_sweep",
]


# -- scores ---------------------------------------------------------------------------------


def item_score(item: ResultItem, resolver: LabelResolver, mode: ScoreMode = "auto") -> tuple[float | None, str | None]:
    """The score to threshold for ``item`` and, when there is none, why."""
    if item.error:
        return None, "moderation failed"
    if mode == "term":
        return (item.p_term, None) if item.p_term is not None else (None, "no term score")
    if mode == "recorded":
        return (item.p_violation, None) if item.p_violation is not None else (None, "no recorded P(violation)")
    policy, rs = resolver.policy, resolver.rule_set
    if item.policy is not None and item.policy != policy.name:
        return None, f"record of policy {item.policy!r}, not {policy.name!r}"
    if item.rules == rs.name and item.p_violation is not None:
        return item.p_violation, None
    if not item.has_evidence:
        return None, "no evidence to decide from"
    try:
        d = decide(policy, rs, attributes=item.attributes or None, p_term=item.p_term)
    except (ValueError, KeyError) as exc:
        return None, f"cannot re-decide: {exc}"
    if d.basis == "none":
        return None, "no evidence to decide from"
    if d.basis == "conflict":
        return None, "conflicting evidence"
    return d.p_violation, None


def _score_description(mode: ScoreMode, results: ResultSet, resolver: LabelResolver) -> str:
    if mode == "term":
        return f"P({resolver.policy.term.id}) (the term question)"
    if mode == "recorded":
        return "P(violation) as recorded"
    if results.format == "paper-json":
        return f"P(violation) under '{resolver.rule_set.name}' from the term score P({resolver.policy.term.id})"
    return f"P(violation) under '{resolver.rule_set.name}' (re-decided from the evidence where recorded under other rules)"


def _rules_equal_term(resolver: LabelResolver) -> bool:
    labels = resolver.policy.labels(resolver.rule_set)
    return all(labels[p.id].violates == p.positive for p in resolver.policy.products)


# -- the evaluation -----------------------------------------------------------------------------

Labelled = list[tuple[ResultItem, Truth, float]]


@dataclass
class _Scoring:
    """The records sorted out: judged and scored (with their truth), failed, not judged, and why."""

    scored: list[tuple[ResultItem, Truth | None, float]] = field(default_factory=list)
    unscored: Counter[str] = field(default_factory=Counter)
    failed: list[tuple[ResultItem, Truth | None]] = field(default_factory=list)
    not_judged: list[tuple[ResultItem, Truth | None]] = field(default_factory=list)
    not_judged_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def labelled(self) -> Labelled:
        return [(it, tr, s) for it, tr, s in self.scored if tr is not None]

    @property
    def unlabelled(self) -> list[str]:
        return [it.id for it, tr, _ in self.scored if tr is None]


def _score_items(results: ResultSet, resolver: LabelResolver, score: ScoreMode) -> _Scoring:
    out = _Scoring()
    for it in results.items:
        status, status_why = it.status()
        if status == "not_judged":
            out.unscored[f"not judged ({status_why})"] += 1
            out.not_judged_reasons[status_why or "not judged"] += 1
            out.not_judged.append((it, resolver.truth(it.id, sha256=it.sha256)))
            continue
        s, why = item_score(it, resolver, score)
        if s is None:
            out.unscored[why or "no score"] += 1
            if status == "failed":
                out.failed.append((it, resolver.truth(it.id, sha256=it.sha256)))
            elif why in ("no evidence to decide from", "conflicting evidence"):
                out.not_judged_reasons["no evidence" if why.startswith("no") else "basis conflict"] += 1
                out.not_judged.append((it, resolver.truth(it.id, sha256=it.sha256)))
            continue
        out.scored.append((it, resolver.truth(it.id, sha256=it.sha256), float(s)))
    if not out.labelled:
        hint = "give --labels FILE, or name images <category>_<number>.<ext>"
        if out.unscored and not out.scored:
            raise ValueError(f"no image has a usable score ({', '.join(f'{k}: {v}' for k, v in out.unscored.items())}): "
                             f"{len(out.failed)} failed, {len(out.not_judged)} not judged of {len(results.items)}")
        raise ValueError(f"no image could be labelled ({len(out.unlabelled)} without a known category): {hint}")
    return out


@dataclass
class _Headline:
    """A protocol's headline figures, and which bootstrap intervals describe them."""

    confusion: Confusion
    metrics: dict[str, float | None]
    intervals: dict[str, Interval]
    bootstrapped: tuple[str, ...] | None = None
    """The bootstrap intervals kept (None: all)."""
    note: str | None = None


def _image_headline(per_image: Scored, paper: PaperProtocol | None) -> _Headline:
    return _Headline(per_image.confusion, dict(per_image.metrics), dict(per_image.intervals))


def _paper_headline(per_image: Scored, paper: PaperProtocol | None) -> _Headline:
    if paper is None:
        raise ValueError("the paper protocol reads the truth from file names (<category>_<number>, sexy_/not-sexy_): no image is named so")
    return _Headline(paper.confusion, dict(paper.metrics), dict(paper.intervals),
                     bootstrapped=("roc_auc", "average_precision"),  # F1 of the paper's matches is not per image
                     note="strict accuracy and coverage count each image once (the per-image protocol), not the published script's matches")


PROTOCOLS: dict[str, Callable[[Scored, PaperProtocol | None], _Headline]] = {"image": _image_headline, "paper": _paper_headline}
"""Each protocol's headline figures from the per-image and the published script's counts."""


def per_category(labelled: Labelled, threshold: float, confidence: float = DEFAULT_CONFIDENCE) -> list[CategoryRow]:
    """Accuracy per category (the worst first), each image flagged when ``score >= threshold``."""
    groups: dict[str, Labelled] = defaultdict(list)
    for it, tr, sc in labelled:
        groups[tr.category or ("(label)" if tr.source == "label" else "(none)")].append((it, tr, sc))
    rows = []
    for cat, items in groups.items():
        tr0 = items[0][1]
        c = Confusion.of([tr.positive for _, tr, _ in items], [sc >= threshold for _, _, sc in items])
        rows.append(CategoryRow(
            category=cat, product=tr0.product, positive=tr0.positive, rule=tr0.rule, n=c.total, flagged=c.tp + c.fp,
            correct=c.tp + c.tn, accuracy=c.value("accuracy") or 0.0, accuracy_ci=c.ci("accuracy", confidence),
            mean_score=float(np.mean([sc for _, _, sc in items])),
        ))
    rows.sort(key=lambda r: (r.accuracy, r.category))
    return rows


def worst_errors(labelled: Labelled, threshold: float, worst: int) -> list[ErrorItem]:
    """The ``worst`` wrong flags, the furthest from the threshold first."""
    errors = [(it, tr, sc) for it, tr, sc in labelled if (sc >= threshold) != tr.positive]
    errors.sort(key=lambda e: -abs(e[2] - threshold))
    return [
        ErrorItem(id=it.id, category=tr.category, product=tr.product, predicted_product=it.product, truth=tr.positive,
                  score=sc, verdict=it.verdict, reason=it.reason, explanation=it.explanation)
        for it, tr, sc in errors[:worst]
    ]


def _notes(results: ResultSet, resolver: LabelResolver, score: ScoreMode, sc: _Scoring, judged: int, n_strict: int) -> list[str]:
    """What the figures leave out or count otherwise (after the ties note)."""
    notes = []
    sources = Counter(tr.source for _, tr, _ in sc.labelled)
    if resolver.target == "rules" and sources.get("term-name"):
        notes.append(
            f"{sources['term-name']} image(s) are labelled by the term only (e.g. '{resolver.policy.term.id}_' / "
            f"'not-{resolver.policy.term.id}_' names): the rule set cannot relabel them, their truth is the term's"
        )
    if results.format == "paper-json" and score == "auto" and not _rules_equal_term(resolver):
        notes.append(
            f"the results hold only P({resolver.policy.term.id}); rule set '{resolver.rule_set.name}' does not label exactly "
            "the term's products 'violate', so P(violation) is estimated from the term score alone (see icm.policy.decide)"
        )
    if sc.unlabelled:
        notes.append(f"{len(sc.unlabelled)} image(s) have no label (no known category in the name, not in the labels file) and are not counted")
    if sc.unscored:
        notes.append("not scored: " + ", ".join(f"{k} ({v})" for k, v in sc.unscored.most_common()))
    if sc.failed or sc.not_judged:
        notes.append(
            f"{len(sc.failed)} failed and {len(sc.not_judged)} not judged image(s) are left out of accuracy, precision, recall and "
            f"the curves; the {n_strict - judged} of them with a label count as wrong in strict accuracy, "
            f"and coverage is {judged}/{n_strict} labelled images judged"
        )
    return notes


def evaluate_icm(
    results: ResultSet,
    resolver: LabelResolver,
    *,
    threshold: float = 0.5,
    protocol: Protocol = "image",
    score: ScoreMode = "auto",
    sweep_step: float = 0.05,
    worst: int = 20,
    name: str | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
) -> ICMReport:
    """Accuracy, precision, recall, F1, curves, sweep and per-category figures of ``results``.

    Every record with a verdict is judged, whatever its attribute answers were. Images whose
    moderation failed (error records) or that have no verdict of their own
    (:meth:`ResultItem.status`: refused, basis none or conflict) are counted, never dropped: they
    are left out of accuracy, precision, recall and the curves, which describe the judged
    images, and counted wrong in ``strict_accuracy``; ``coverage`` is the share of the
    labelled images that were judged. Every proportion carries a Wilson interval at
    ``confidence``; AUC, average precision, F1 and balanced accuracy a seeded bootstrap
    interval over ``bootstrap`` resamples (0: none).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the threshold must be in [0, 1], got {threshold}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (image or paper)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"the confidence level must be between 0 and 1 (e.g. 0.95), got {confidence}")
    if bootstrap < 0:
        raise ValueError(f"the number of bootstrap resamples must be 0 or more, got {bootstrap}")
    sc = _score_items(results, resolver, score)
    labelled = sc.labelled
    y = np.array([tr.positive for _, tr, _ in labelled], dtype=int)
    s = np.array([x for _, _, x in labelled], dtype=float)
    c = Confusion.of(y, s >= threshold)
    per_image = Scored.of(c, f"score >= {threshold:g}", confidence)
    paper = paper_protocol(sc.scored, resolver, threshold, per_image, confidence)
    head = PROTOCOLS[protocol](per_image, paper)
    metrics, intervals = head.metrics, head.intervals

    # failures and images not judged: counted wrong in strict accuracy, out of coverage
    n_strict = c.total + sum(1 for _, tr in sc.failed + sc.not_judged if tr is not None)
    for key, k in (("strict_accuracy", c.tp + c.tn), ("coverage", c.total)):
        metrics[key] = k / n_strict
        if (iv := wilson_interval(k, n_strict, confidence)) is not None:
            intervals[key] = iv

    roc, pr, best, curve_notes = curves(y, s)
    metrics["roc_auc"] = roc.auc if roc else None
    metrics["average_precision"] = pr.auc if pr else None
    if bootstrap and roc is not None:
        boot = bootstrap_curve_metrics(y, s, threshold=threshold, resamples=bootstrap, confidence=confidence, seed=seed)
        intervals.update({k: v for k, v in boot.items() if head.bootstrapped is None or k in head.bootstrapped})

    bins = np.linspace(0, 1, 21)
    hist = {
        "positive": np.histogram(np.clip(s[y == 1], 0, 1), bins=bins)[0].tolist(),
        "negative": np.histogram(np.clip(s[y == 0], 0, 1), bins=bins)[0].tolist(),
    }
    ties = int(np.sum(s == threshold))
    notes = list(results.notes) + curve_notes
    if ties:
        notes.append(
            f"{ties} image(s) score exactly {threshold:g}: flagged here (score >= threshold, as the published ICM-Test "
            "script); the published ICM-Val script would not flag them (score > threshold)"
        )
    notes += _notes(results, resolver, score, sc, c.total, n_strict)
    if head.note:
        notes.append(head.note)

    return ICMReport(
        name=name or results.source, source=results.source, format=results.format, policy=resolver.policy.name,
        rules=resolver.rule_set.name, target=resolver.target, score=_score_description(score, results, resolver),
        threshold=threshold, protocol=protocol, n_items=len(results.items), n_evaluated=len(labelled),
        n_unlabelled=len(sc.unlabelled), n_unscored=sum(sc.unscored.values()), n_judged=len(sc.scored), n_failed=len(sc.failed),
        n_not_judged=len(sc.not_judged), not_judged_reasons=dict(sc.not_judged_reasons), n_strict=n_strict,
        failed_examples=[it.id for it, _ in sc.failed[:10]], not_judged_examples=[it.id for it, _ in sc.not_judged[:10]],
        confidence=confidence, bootstrap=bootstrap, seed=seed, unlabelled_examples=sc.unlabelled[:10],
        unscored_reasons=dict(sc.unscored), n_positive=int(y.sum()), n_ties=ties,
        truth_sources=dict(Counter(tr.source for _, tr, _ in labelled)), confusion=head.confusion, metrics=metrics,
        intervals=intervals, per_image=per_image, paper=paper, roc=roc, pr=pr, best_f1=best,
        sweep=threshold_sweep(y, s, sweep_thresholds(sweep_step, threshold), confidence),
        per_category=per_category(labelled, threshold, confidence), score_histogram=hist,
        worst_errors=worst_errors(labelled, threshold, worst), notes=notes,
    )
