"""The records of an ICM evaluation (:func:`icm.evaluation.icm_metrics.evaluate_icm`).

What ``icm eval icm --out`` writes under ``icm`` and ``icm eval compare`` reads: the
headline figures of the chosen protocol, each image counted once (:class:`Scored`), the
published script's figure (:class:`PaperProtocol`), curves, the threshold sweep, per
category rows and the worst errors. The keys of every ``metrics`` and ``intervals`` dict
are declared (:class:`~icm.evaluation.metric_path.Keys`), so the metric registry checks
its paths into them when it is loaded.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from icm.evaluation.confusion import Confusion, reported_metrics
from icm.evaluation.metric_path import Keys
from icm.evaluation.stats import DEFAULT_BOOTSTRAP, DEFAULT_CONFIDENCE, DEFAULT_SEED, Interval

Protocol = Literal["image", "paper"]
ScoreMode = Literal["auto", "term", "recorded"]

CONFUSION_KEYS = Keys(m.name for m in reported_metrics())
"""The figures of one confusion matrix a report lists."""
ICM_KEYS = Keys((*CONFUSION_KEYS.names, "strict_accuracy", "coverage", "roc_auc", "average_precision"))
"""The headline figures of an ICM report: the confusion matrix's, then those over all labelled images and the curves'."""

ConfusionFigures = Annotated[dict[str, float | None], CONFUSION_KEYS]
ConfusionIntervals = Annotated[dict[str, Interval], CONFUSION_KEYS]


class Scored(BaseModel):
    """A confusion matrix and the registered metrics computed from it."""

    confusion: Confusion
    metrics: ConfusionFigures
    intervals: ConfusionIntervals = Field(default_factory=dict, description="Wilson intervals of the proportions")
    n: int = Field(description="Counted units: images, or keyword matches for the ICM-Val script")
    flag_rule: str = Field(description="When an image counts as flagged, e.g. 'score >= 0.5'")

    @classmethod
    def of(cls, c: Confusion, flag_rule: str, confidence: float = DEFAULT_CONFIDENCE) -> Scored:
        return cls(confusion=c, metrics=c.metrics(), intervals=c.intervals(confidence), n=c.total, flag_rule=flag_rule)


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
    metrics: ConfusionFigures
    intervals: ConfusionIntervals = Field(default_factory=dict, description="Wilson intervals (the matches counted as if independent)")
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
    metrics: Annotated[dict[str, float | None], ICM_KEYS] = Field(description="The headline figures (the chosen protocol's)")
    intervals: Annotated[dict[str, Interval], ICM_KEYS] = Field(default_factory=dict, description="Intervals of the headline figures")
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
