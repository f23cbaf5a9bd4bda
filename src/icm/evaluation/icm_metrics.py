"""ICM accuracy: how well moderation scores separate images that should be flagged.

The default protocol counts **each image once**, with the truth of its own category
(:mod:`icm.evaluation.labels`) and flags an image when its score is at least the
threshold (``score >= t``, scikit-learn's convention and the published ICM-Test script's).

``protocol="paper"`` reproduces the published scripts' figure and says how it differs:

* **ICM-Val script** (category names): every category *keyword* is matched as a
  substring of every image name, and each match counts once; a name that contains two
  keywords (``wearing_stockings_...`` contains ``stockings``) is counted twice, with each
  keyword's truth. It flags ``score > t`` (strictly).
* **ICM-Test script** (``sexy_*`` / ``not-sexy_*`` names): an image is negative when its
  name contains ``not-<term>``, positive otherwise, and flagged when ``score >= t``. Each
  image is counted once, so this one agrees with the per-image protocol.

The score of an image is, by default, P(violation) under the *evaluation* rule set: the
recorded value when the record was decided under that rule set, else re-decided from the
record's evidence (term score and attribute distributions) with :func:`icm.policy.decide`.
For the paper's JSON, whose only evidence is the term score, that is P(term) itself under
any rule set that labels exactly the positive products ``violate`` (the paper's rules).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from icm.evaluation.labels import LabelResolver, Truth, image_key
from icm.evaluation.registry import confusion_metrics
from icm.evaluation.results import ResultItem, ResultSet
from icm.evaluation.stats import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_CONFIDENCE,
    DEFAULT_SEED,
    Interval,
    bootstrap_curve_metrics,
    wilson,
    wilson_interval,
)
from icm.policy import decide

Protocol = Literal["image", "paper"]
ScoreMode = Literal["auto", "term", "recorded"]

MAX_CURVE_POINTS = 400


class Confusion(BaseModel):
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @property
    def total(self) -> int:
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


# The confusion-matrix metrics that are one proportion k / n, with their k and n.
_PROPORTIONS = {
    "accuracy": lambda c: (c.tp + c.tn, c.total),
    "precision": lambda c: (c.tp, c.tp + c.fp),
    "recall": lambda c: (c.tp, c.tp + c.fn),
    "specificity": lambda c: (c.tn, c.tn + c.fp),
    "false_positive_rate": lambda c: (c.fp, c.fp + c.tn),
}


def confusion_intervals(c: Confusion, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Interval]:
    """Wilson intervals of every confusion metric that is a proportion (not F1 or balanced accuracy)."""
    out = {}
    for name, kn in _PROPORTIONS.items():
        iv = wilson_interval(*kn(c), confidence)
        if iv is not None:
            out[name] = iv
    return out


class Scored(BaseModel):
    """A confusion matrix and the registered metrics computed from it."""

    confusion: Confusion
    metrics: dict[str, float | None]
    intervals: dict[str, Interval] = Field(default_factory=dict, description="Wilson intervals of the proportions")
    n: int = Field(description="Counted units: images, or keyword matches for the ICM-Val script")
    flag_rule: str = Field(description="When an image counts as flagged, e.g. 'score >= 0.5'")

    @classmethod
    def of(cls, c: Confusion, flag_rule: str, confidence: float = DEFAULT_CONFIDENCE) -> Scored:
        return cls(confusion=c, metrics=confusion_metrics(c.tp, c.fp, c.tn, c.fn), intervals=confusion_intervals(c, confidence),
                   n=c.total, flag_rule=flag_rule)


class PaperProtocol(BaseModel):
    script: Literal["icm-val", "icm-test"]
    description: str
    keywords: list[str] = Field(default_factory=list)
    matches: int
    images: int
    double_counted: int = Field(default=0, description="Images matched by more than one keyword")
    unmatched: int = Field(default=0, description="Images matched by no keyword (not counted)")
    overlaps: list[str] = Field(default_factory=list, description="Which keywords match which other categories' images")
    confusion: Confusion
    metrics: dict[str, float | None]
    intervals: dict[str, Interval] = Field(default_factory=dict, description="Wilson intervals (the matches counted as if independent)")
    difference: str = Field(description="How this figure differs from the per-image one")


class Curve(BaseModel):
    x: list[float]
    y: list[float]
    thresholds: list[float | None]
    auc: float | None


class SweepRow(BaseModel):
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float | None
    accuracy: float | None
    precision_ci: tuple[float, float] | None = None
    recall_ci: tuple[float, float] | None = None


class BestThreshold(BaseModel):
    threshold: float
    f1: float
    precision: float
    recall: float


class CategoryRow(BaseModel):
    category: str
    product: str | None
    positive: bool
    rule: str | None
    n: int
    flagged: int
    correct: int
    accuracy: float
    accuracy_ci: tuple[float, float] | None = Field(default=None, description="Wilson interval of the accuracy")
    mean_score: float


class ErrorItem(BaseModel):
    id: str
    category: str | None
    product: str | None = Field(description="The product the truth resolved to")
    predicted_product: str | None = None
    truth: bool
    score: float
    verdict: str | None = None
    reason: str | None = None
    explanation: str | None = None


class ICMReport(BaseModel):
    name: str
    source: str
    format: str
    policy: str
    rules: str
    target: str
    score: str = Field(description="Which score was thresholded")
    threshold: float
    protocol: Protocol
    n_items: int
    n_evaluated: int = Field(description="Labelled images judged and scored: the denominator of accuracy, precision, recall ...")
    n_unlabelled: int
    n_unscored: int
    n_judged: int = Field(default=0, description="Images judged (all, labelled or not)")
    n_failed: int = Field(default=0, description="Images whose moderation failed (error records)")
    n_not_judged: int = Field(default=0, description="Images without a verdict of their own (refused, no evidence, conflict)")
    not_judged_reasons: dict[str, int] = Field(default_factory=dict)
    n_strict: int = Field(default=0, description="Labelled images judged, failed or not judged: the denominator of strict accuracy and coverage")
    failed_examples: list[str] = Field(default_factory=list)
    not_judged_examples: list[str] = Field(default_factory=list)
    confidence: float = Field(default=DEFAULT_CONFIDENCE, description="Confidence level of every interval")
    bootstrap: int = Field(default=DEFAULT_BOOTSTRAP, description="Bootstrap resamples for AUC, AP, F1, balanced accuracy")
    seed: int = DEFAULT_SEED
    unlabelled_examples: list[str] = Field(default_factory=list)
    unscored_reasons: dict[str, int] = Field(default_factory=dict)
    n_positive: int
    n_ties: int = Field(description="Images whose score equals the threshold exactly")
    truth_sources: dict[str, int]
    confusion: Confusion
    metrics: dict[str, float | None] = Field(description="The headline figures (the chosen protocol's)")
    intervals: dict[str, Interval] = Field(default_factory=dict, description="Intervals of the headline figures")
    per_image: Scored
    paper: PaperProtocol | None = None
    roc: Curve | None = None
    pr: Curve | None = None
    best_f1: BestThreshold | None = None
    sweep: list[SweepRow] = Field(default_factory=list)
    per_category: list[CategoryRow] = Field(default_factory=list)
    score_histogram: dict[str, list[int]] = Field(default_factory=dict, description="20 bins over [0, 1], by truth")
    worst_errors: list[ErrorItem] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


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


# -- curves -----------------------------------------------------------------------------------


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
    yb = y.astype(bool)
    for t in thresholds:
        flag = s >= t
        tp = int(np.sum(flag & yb))
        fp = int(np.sum(flag & ~yb))
        fn = int(np.sum(~flag & yb))
        tn = int(np.sum(~flag & ~yb))
        m = confusion_metrics(tp, fp, tn, fn)
        rows.append(SweepRow(threshold=t, tp=tp, fp=fp, tn=tn, fn=fn, precision=m["precision"], recall=m["recall"], f1=m["f1"], accuracy=m["accuracy"],
                             precision_ci=wilson(tp, tp + fp, confidence), recall_ci=wilson(tp, tp + fn, confidence)))
    return rows


def sweep_thresholds(step: float, threshold: float) -> list[float]:
    if not 0 < step < 1:
        raise ValueError("the sweep step must be between 0 and 1")
    grid = {round(float(t), 6) for t in np.arange(step, 1.0 - 1e-9, step)}
    grid.add(round(threshold, 6))
    return sorted(grid)


# -- the paper's protocols -----------------------------------------------------------------------


def paper_protocol(
    scored: list[tuple[ResultItem, Truth | None, float]], resolver: LabelResolver, threshold: float, per_image: Scored,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PaperProtocol | None:
    """The published script's figure for these results (see the module docstring)."""
    labelled = [(it, tr, s) for it, tr, s in scored if tr is not None and tr.from_name]
    if not labelled:
        return None  # the scripts read the truth from file names only
    term = resolver.policy.term.id
    if all(tr.source == "term-name" for _, tr, _ in labelled):
        c = Confusion()
        neg = f"not-{term}"
        for it, _, s in scored:
            c.add(neg not in image_key(it.id).lower(), s >= threshold)
        same = (c.tp, c.fp, c.tn, c.fn) == (per_image.confusion.tp, per_image.confusion.fp, per_image.confusion.tn, per_image.confusion.fn)
        return PaperProtocol(
            script="icm-test",
            description=f"ICM-Test script: negative when the name contains '{neg}', positive otherwise; flagged when score >= {threshold:g}",
            matches=c.total, images=len(scored), confusion=c,
            metrics=confusion_metrics(c.tp, c.fp, c.tn, c.fn), intervals=confusion_intervals(c, confidence),
            difference="none: each image is counted once, as in the per-image protocol" if same else
            "the script takes every name without 'not-' as positive, including names the per-image protocol leaves unlabelled",
        )
    keywords = sorted({tr.category for _, tr, _ in labelled if tr.source in ("category", "product") and tr.category})
    truths: dict[str, bool] = {}
    for k in keywords:
        t = resolver._category_truth(k)
        if t is not None:
            truths[k] = t.positive
    c = Confusion()
    hits: dict[str, list[str]] = {}
    for it, _, s in scored:
        name = image_key(it.id)
        matched = [k for k in truths if k in name]
        hits[it.id] = matched
        for k in matched:
            c.add(truths[k], s > threshold)
    own = {it.id: (tr.category if tr else None) for it, tr, _ in scored}
    double = [i for i, m in hits.items() if len(m) > 1]
    overlap = Counter()
    for i in double:
        for k in hits[i]:
            if k != own[i]:
                overlap[(k, own[i])] += 1
    overlaps = [f"'{k}' also matches {n} image(s) of '{cat}'" for (k, cat), n in sorted(overlap.items())]
    unmatched = sum(1 for m in hits.values() if not m)
    m = confusion_metrics(c.tp, c.fp, c.tn, c.fn)
    pa, ia = m["accuracy"], per_image.metrics["accuracy"]
    diff_parts = []
    if double:
        diff_parts.append(f"{len(double)} image(s) matched by two or more keywords are counted once per keyword ({'; '.join(overlaps)})")
    if unmatched:
        diff_parts.append(f"{unmatched} image(s) match no keyword and are not counted")
    diff_parts.append(f"the script flags score > {threshold:g}, the per-image protocol score >= {threshold:g}")
    summary = (
        f"published script {pa:.5f} over {c.total} matches for {len(scored)} images; "
        f"each image once by its own category {ia:.5f} ({per_image.confusion.tp + per_image.confusion.tn}/{per_image.n})"
        if pa is not None and ia is not None else "no figure"
    )
    return PaperProtocol(
        script="icm-val",
        description=f"ICM-Val script: {len(truths)} category keywords matched as substrings of the image names, "
        f"one count per match; flagged when score > {threshold:g}",
        keywords=list(truths), matches=c.total, images=len(scored), double_counted=len(double), unmatched=unmatched,
        overlaps=overlaps, confusion=c, metrics=m, intervals=confusion_intervals(c, confidence),
        difference=summary + ". " + "; ".join(diff_parts) + ".",
    )


# -- the evaluation -----------------------------------------------------------------------------


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
    if protocol not in ("image", "paper"):
        raise ValueError(f"unknown protocol {protocol!r} (image or paper)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"the confidence level must be between 0 and 1 (e.g. 0.95), got {confidence}")
    if bootstrap < 0:
        raise ValueError(f"the number of bootstrap resamples must be 0 or more, got {bootstrap}")
    notes = list(results.notes)
    scored: list[tuple[ResultItem, Truth | None, float]] = []
    unlabelled: list[str] = []
    unscored: Counter[str] = Counter()
    failed: list[tuple[ResultItem, Truth | None]] = []
    not_judged: list[tuple[ResultItem, Truth | None]] = []
    not_judged_reasons: Counter[str] = Counter()
    for it in results.items:
        status, status_why = it.status()
        if status == "not_judged":
            unscored[f"not judged ({status_why})"] += 1
            not_judged_reasons[status_why or "not judged"] += 1
            not_judged.append((it, resolver.truth(it.id, sha256=it.sha256)))
            continue
        s, why = item_score(it, resolver, score)
        if s is None:
            unscored[why or "no score"] += 1
            if status == "failed":
                failed.append((it, resolver.truth(it.id, sha256=it.sha256)))
            elif why in ("no evidence to decide from", "conflicting evidence"):
                not_judged_reasons["no evidence" if why.startswith("no") else "basis conflict"] += 1
                not_judged.append((it, resolver.truth(it.id, sha256=it.sha256)))
            continue
        scored.append((it, resolver.truth(it.id, sha256=it.sha256), float(s)))
    labelled = [(it, tr, s) for it, tr, s in scored if tr is not None]
    unlabelled = [it.id for it, tr, _ in scored if tr is None]
    if not labelled:
        hint = "give --labels FILE, or name images <category>_<number>.<ext>"
        if unscored and not scored:
            raise ValueError(f"no image has a usable score ({', '.join(f'{k}: {v}' for k, v in unscored.items())}): "
                             f"{len(failed)} failed, {len(not_judged)} not judged of {len(results.items)}")
        raise ValueError(f"no image could be labelled ({len(unlabelled)} without a known category): {hint}")

    y = np.array([tr.positive for _, tr, _ in labelled], dtype=int)
    s = np.array([sc for _, _, sc in labelled], dtype=float)
    c = Confusion()
    for truth, sc in zip(y, s, strict=True):
        c.add(bool(truth), bool(sc >= threshold))
    per_image = Scored.of(c, f"score >= {threshold:g}", confidence)
    paper = paper_protocol(scored, resolver, threshold, per_image, confidence)
    if protocol == "paper" and paper is None:
        raise ValueError("the paper protocol reads the truth from file names (<category>_<number>, sexy_/not-sexy_): no image is named so")
    head_c = paper.confusion if protocol == "paper" and paper else c
    metrics = dict(paper.metrics if protocol == "paper" and paper else per_image.metrics)
    intervals = dict(paper.intervals if protocol == "paper" and paper else per_image.intervals)

    # failures and images not judged: counted wrong in strict accuracy, out of coverage
    failed_l = sum(1 for _, tr in failed if tr is not None)
    not_judged_l = sum(1 for _, tr in not_judged if tr is not None)
    correct = c.tp + c.tn
    n_strict = c.total + failed_l + not_judged_l
    metrics["strict_accuracy"] = correct / n_strict
    metrics["coverage"] = c.total / n_strict
    for key, k in (("strict_accuracy", correct), ("coverage", c.total)):
        iv = wilson_interval(k, n_strict, confidence)
        if iv is not None:
            intervals[key] = iv

    roc, pr, best, cnotes = curves(y, s)
    notes += cnotes
    metrics["roc_auc"] = roc.auc if roc else None
    metrics["average_precision"] = pr.auc if pr else None
    if bootstrap and roc is not None:
        boot = bootstrap_curve_metrics(y, s, threshold=threshold, resamples=bootstrap, confidence=confidence, seed=seed)
        keep = ("roc_auc", "average_precision") if protocol == "paper" else tuple(boot)  # F1 of the paper's matches is not per image
        intervals.update({k: v for k, v in boot.items() if k in keep})

    # per category
    groups: dict[str, list[tuple[ResultItem, Truth, float]]] = defaultdict(list)
    for it, tr, sc in labelled:
        groups[tr.category or ("(label)" if tr.source == "label" else "(none)")].append((it, tr, sc))
    per_cat = []
    for cat, rows in groups.items():
        tr0 = rows[0][1]
        flagged = sum(1 for _, _, sc in rows if sc >= threshold)
        cat_correct = sum(1 for _, tr, sc in rows if (sc >= threshold) == tr.positive)
        per_cat.append(CategoryRow(
            category=cat, product=tr0.product, positive=tr0.positive, rule=tr0.rule, n=len(rows), flagged=flagged,
            correct=cat_correct, accuracy=cat_correct / len(rows), accuracy_ci=wilson(cat_correct, len(rows), confidence),
            mean_score=float(np.mean([sc for _, _, sc in rows])),
        ))
    per_cat.sort(key=lambda r: (r.accuracy, r.category))

    errors = [(it, tr, sc) for it, tr, sc in labelled if (sc >= threshold) != tr.positive]
    errors.sort(key=lambda e: -abs(e[2] - threshold))
    worst_errors = [
        ErrorItem(id=it.id, category=tr.category, product=tr.product, predicted_product=it.product, truth=tr.positive,
                  score=sc, verdict=it.verdict, reason=it.reason, explanation=it.explanation)
        for it, tr, sc in errors[:worst]
    ]

    bins = np.linspace(0, 1, 21)
    hist = {
        "positive": np.histogram(np.clip(s[y == 1], 0, 1), bins=bins)[0].tolist(),
        "negative": np.histogram(np.clip(s[y == 0], 0, 1), bins=bins)[0].tolist(),
    }
    ties = int(np.sum(s == threshold))
    if ties:
        notes.append(
            f"{ties} image(s) score exactly {threshold:g}: flagged here (score >= threshold, as the published ICM-Test "
            "script); the published ICM-Val script would not flag them (score > threshold)"
        )
    sources = Counter(tr.source for _, tr, _ in labelled)
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
    if unlabelled:
        notes.append(f"{len(unlabelled)} image(s) have no label (no known category in the name, not in the labels file) and are not counted")
    if unscored:
        notes.append("not scored: " + ", ".join(f"{k} ({v})" for k, v in unscored.most_common()))
    if failed or not_judged:
        notes.append(
            f"{len(failed)} failed and {len(not_judged)} not judged image(s) are left out of accuracy, precision, recall and "
            f"the curves; the {failed_l + not_judged_l} of them with a label count as wrong in strict accuracy, "
            f"and coverage is {c.total}/{n_strict} labelled images judged"
        )
    if protocol == "paper" and paper is not None:
        notes.append("strict accuracy and coverage count each image once (the per-image protocol), not the published script's matches")

    return ICMReport(
        name=name or results.source,
        source=results.source,
        format=results.format,
        policy=resolver.policy.name,
        rules=resolver.rule_set.name,
        target=resolver.target,
        score=_score_description(score, results, resolver),
        threshold=threshold,
        protocol=protocol,
        n_items=len(results.items),
        n_evaluated=len(labelled),
        n_unlabelled=len(unlabelled),
        n_unscored=sum(unscored.values()),
        n_judged=len(scored),
        n_failed=len(failed),
        n_not_judged=len(not_judged),
        not_judged_reasons=dict(not_judged_reasons),
        n_strict=n_strict,
        failed_examples=[it.id for it, _ in failed[:10]],
        not_judged_examples=[it.id for it, _ in not_judged[:10]],
        confidence=confidence,
        bootstrap=bootstrap,
        seed=seed,
        unlabelled_examples=unlabelled[:10],
        unscored_reasons=dict(unscored),
        n_positive=int(y.sum()),
        n_ties=ties,
        truth_sources=dict(sources),
        confusion=head_c,
        metrics=metrics,
        intervals=intervals,
        per_image=per_image,
        paper=paper,
        roc=roc,
        pr=pr,
        best_f1=best,
        sweep=threshold_sweep(y, s, sweep_thresholds(sweep_step, threshold), confidence),
        per_category=per_cat,
        score_histogram=hist,
        worst_errors=worst_errors,
        notes=notes,
    )
