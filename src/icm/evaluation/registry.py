"""The metrics of an evaluation, registered as data.

Like the task registry of lm-evaluation-harness, every figure a summary can hold is
described once here: which task it belongs to, where it lives in the JSON summary
(a dotted path into :class:`icm.evaluation.summary.EvalSummary`), whether higher is
better and how to print it. Terminal tables, the HTML report and ``icm eval compare``
read this registry instead of each knowing the metrics by heart.

Metrics that are functions of a confusion matrix are registered with their function
(:data:`CONFUSION_METRICS`), so the headline table, the threshold sweep and the paper
protocol all compute them the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Task = str  # "icm", "mqa", "meq"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    task: Task
    title: str
    path: str
    higher_is_better: bool = True
    fmt: str = ".4f"
    description: str = ""

    def get(self, summary: Any) -> float | None:
        """The metric's value in a summary (a pydantic model or its JSON dict), or None."""
        node: Any = summary
        for part in self.path.split("."):
            if node is None:
                return None
            if isinstance(node, dict):
                node = node.get(part)
            else:
                node = getattr(node, part, None)
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            return None
        return float(node)

    def format(self, value: float | None) -> str:
        return "-" if value is None else format(value, self.fmt)


METRICS: dict[str, MetricSpec] = {}


def register(spec: MetricSpec) -> MetricSpec:
    if spec.name in METRICS:
        raise ValueError(f"metric {spec.name!r} is already registered")
    METRICS[spec.name] = spec
    return spec


def metrics_for(task: Task) -> list[MetricSpec]:
    return [m for m in METRICS.values() if m.task == task]


# -- confusion-matrix metrics ----------------------------------------------------------

ConfusionFn = Callable[[int, int, int, int], "float | None"]
CONFUSION_METRICS: dict[str, ConfusionFn] = {}


def confusion_metric(name: str) -> Callable[[ConfusionFn], ConfusionFn]:
    def deco(fn: ConfusionFn) -> ConfusionFn:
        CONFUSION_METRICS[name] = fn
        return fn

    return deco


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


@confusion_metric("accuracy")
def _accuracy(tp: int, fp: int, tn: int, fn: int) -> float | None:
    return _div(tp + tn, tp + fp + tn + fn)


@confusion_metric("precision")
def _precision(tp: int, fp: int, tn: int, fn: int) -> float | None:
    return _div(tp, tp + fp)


@confusion_metric("recall")
def _recall(tp: int, fp: int, tn: int, fn: int) -> float | None:
    return _div(tp, tp + fn)


@confusion_metric("f1")
def _f1(tp: int, fp: int, tn: int, fn: int) -> float | None:
    return _div(2 * tp, 2 * tp + fp + fn)


@confusion_metric("specificity")
def _specificity(tp: int, fp: int, tn: int, fn: int) -> float | None:
    return _div(tn, tn + fp)


@confusion_metric("balanced_accuracy")
def _balanced(tp: int, fp: int, tn: int, fn: int) -> float | None:
    r, s = _recall(tp, fp, tn, fn), _specificity(tp, fp, tn, fn)
    return None if r is None or s is None else (r + s) / 2


@confusion_metric("false_positive_rate")
def _fpr(tp: int, fp: int, tn: int, fn: int) -> float | None:
    return _div(fp, fp + tn)


def confusion_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float | None]:
    return {name: fn_(tp, fp, tn, fn) for name, fn_ in CONFUSION_METRICS.items()}


# -- the registry ------------------------------------------------------------------------

_ICM = [
    ("accuracy", "Accuracy", True, "Share of images whose flag matches the truth"),
    ("precision", "Precision", True, "Of the images flagged, the share that should be"),
    ("recall", "Recall", True, "Of the images that should be flagged, the share that is"),
    ("f1", "F1", True, "Harmonic mean of precision and recall"),
    ("specificity", "Specificity", True, "Of the images that should pass, the share that does"),
    ("balanced_accuracy", "Balanced accuracy", True, "Mean of recall and specificity"),
    ("false_positive_rate", "False-positive rate", False, "Of the images that should pass, the share flagged"),
    ("roc_auc", "ROC AUC", True, "Area under the ROC curve (threshold-free)"),
    ("average_precision", "Average precision", True, "Area under the precision-recall curve (step-wise)"),
    ("strict_accuracy", "Strict accuracy", True, "Accuracy with failed and not-judged images counted wrong (each image once)"),
    ("coverage", "Coverage", True, "Share of the labelled images that were judged (not failed, not refused)"),
]
for _key, _title, _hib, _desc in _ICM:
    register(MetricSpec(f"icm.{_key}", "icm", _title, f"icm.metrics.{_key}", _hib, description=_desc))
register(MetricSpec("icm.paper_accuracy", "icm", "Accuracy (published script)", "icm.paper.metrics.accuracy",
                    description="The published script's figure (may count some images twice)"))
register(MetricSpec("icm.per_image_accuracy", "icm", "Accuracy (each image once)", "icm.per_image.metrics.accuracy",
                    description="Each image counted once, by its own category"))

for _kind, _title in (("mc", "multiple-choice"), ("yes_no", "yes/no"), ("all", "all")):
    register(MetricSpec(f"mqa.{_kind}", "mqa", f"MQA accuracy ({_title})", f"mqa.{_kind}.accuracy",
                        description=f"Moderation Q-A accuracy, {_title} questions, first letter of the answer"))

for _crit in ("accuracy", "preciseness", "comprehensiveness", "fluency"):
    register(MetricSpec(f"meq.{_crit}", "meq", f"MEQ {_crit} (judge)", f"meq.means.{_crit}", fmt=".2f",
                        description=f"Mean judge score for {_crit}, 0-100, a missing score counted 0"))
register(MetricSpec("meq.failures", "meq", "MEQ judge failures", "meq.n_failed", higher_is_better=False, fmt=".0f",
                    description="Explanations the judge gave no usable score for"))
register(MetricSpec("meq.offline", "meq", "MEQ offline score", "meq.offline.mean", fmt=".2f",
                    description="Mean offline similarity score to the reference explanation, 0-100"))


def registered(names: Iterable[str] | None = None) -> list[MetricSpec]:
    return list(METRICS.values()) if names is None else [METRICS[n] for n in names]
