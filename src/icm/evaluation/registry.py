"""The metrics of an evaluation, registered as data.

Like the task registry of lm-evaluation-harness, every figure a summary can hold is
described once here: which task it belongs to, where it lives in the JSON summary
(a path into :class:`icm.evaluation.summary.EvalSummary`, and where its interval lives),
whether higher is better and how to print it. Terminal tables, the HTML report and
``icm eval compare`` read this registry instead of each knowing the metrics by heart.

Paths are checked when a metric is registered (:class:`~icm.evaluation.metric_path.MetricPath`):
a step that is not a field of the summary's models, or a key their dicts do not declare,
is a :class:`ValueError` at import, never an empty cell in a report. The figures of a
confusion matrix (titles, directions, formulas) come from the one table of
:mod:`icm.evaluation.confusion`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from icm.evaluation.confusion import CONFUSION_METRICS, confusion_metrics, reported_metrics
from icm.evaluation.metric_path import MetricPath
from icm.evaluation.stats import Interval
from icm.evaluation.summary import EvalSummary

__all__ = ["CONFUSION_METRICS", "METRICS", "MetricSpec", "confusion_metrics", "metrics_for", "register", "registered"]

Task = str  # "icm", "mqa", "meq": a field of EvalSummary


@dataclass(frozen=True)
class MetricSpec:
    """A registered figure: ``path`` (and ``interval_path``) lead from an :class:`EvalSummary` to it, checked here."""

    name: str
    task: Task
    title: str
    path: str
    higher_is_better: bool = True
    fmt: str = ".4f"
    description: str = ""
    interval_path: str | None = None
    always: bool = False
    """Listed in a report's table even where undefined (the headline ICM figures)."""
    value_path: MetricPath = field(init=False, repr=False, compare=False)
    interval_at: MetricPath | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for p in (self.path, self.interval_path):
            if p is not None and p.split(".", 1)[0] != self.task:
                raise ValueError(f"metric {self.name!r}: path {p!r} is not under its task {self.task!r}")
        object.__setattr__(self, "value_path", MetricPath.parse(EvalSummary, self.path))
        at = MetricPath.parse(EvalSummary, self.interval_path, leaf=Interval) if self.interval_path else None
        object.__setattr__(self, "interval_at", at)

    @staticmethod
    def _number(node: Any) -> float | None:
        return None if isinstance(node, bool) or not isinstance(node, (int, float)) else float(node)

    def get(self, summary: EvalSummary | dict[str, Any]) -> float | None:
        """The metric's value in a summary (the model or its JSON dict), or None."""
        return self._number(self.value_path.walk(summary))

    def of_report(self, report: BaseModel | dict[str, Any]) -> float | None:
        """The metric's value in its task's report (an ``ICMReport``, ``MQAReport`` or ``MEQReport``), or None."""
        return self._number(self.value_path.walk(report, start=1))

    def interval(self, report: BaseModel) -> Interval | None:
        """The metric's interval in its task's report, if it has one."""
        iv = self.interval_at.walk(report, start=1) if self.interval_at is not None else None
        return iv if isinstance(iv, Interval) else None

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


# -- the registry ------------------------------------------------------------------------

_ICM = [(m.name, m.title, m.higher_is_better, m.description) for m in reported_metrics()] + [
    ("roc_auc", "ROC AUC", True, "Area under the ROC curve (threshold-free)"),
    ("average_precision", "Average precision", True, "Area under the precision-recall curve (step-wise)"),
    ("strict_accuracy", "Strict accuracy", True, "Accuracy with failed and not-judged images counted wrong (each image once)"),
    ("coverage", "Coverage", True, "Share of the labelled images that were judged (not failed, not refused)"),
]
for _key, _title, _hib, _desc in _ICM:
    register(MetricSpec(f"icm.{_key}", "icm", _title, f"icm.metrics.{_key}", _hib, description=_desc,
                        interval_path=f"icm.intervals.{_key}", always=True))
register(MetricSpec("icm.paper_accuracy", "icm", "Accuracy (published script)", "icm.paper.metrics.accuracy",
                    description="The published script's figure (may count some images twice)", interval_path="icm.paper.intervals.accuracy"))
register(MetricSpec("icm.per_image_accuracy", "icm", "Accuracy (each image once)", "icm.per_image.metrics.accuracy",
                    description="Each image counted once, by its own category", interval_path="icm.per_image.intervals.accuracy"))

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
