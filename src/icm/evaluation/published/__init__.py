"""Published figures of peer models: the data file ``icm eval compare --published FILE`` reads.

A figure is one number a paper or report printed: a model's value of a metric on a benchmark's
split, overall or for one category, with where it was printed (the source) and how far it was
checked (``verification``). The packaged file ``peers.yaml`` (``--published builtin``) holds the
figures this project could check; see the manual's "Compared with" page.

The file is YAML or JSON: a list of figures, or a mapping with a ``figures`` list. Every entry is
validated by :class:`PublishedFigure`; a bad one is reported with the file and the entry (its
position and model), e.g. ``peers.yaml: entry 3 (model 'LlavaGuard-7B'): value: ...``.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from icm.fileio import read_text

__all__ = [
    "BUILTIN",
    "METRICS",
    "PublishedFigure",
    "PublishedFile",
    "PublishedSource",
    "builtin_path",
    "load_published",
    "norm_benchmark",
    "norm_category",
    "norm_metric",
]

BUILTIN = "builtin"

#: The metrics a figure may name (icm's names), and the spellings papers use for them.
METRICS: dict[str, tuple[str, ...]] = {
    "f1": ("f1", "f1-score", "f1 score", "f-1", "f-score"),
    "precision": ("precision",),
    "recall": ("recall", "tpr", "true-positive rate", "sensitivity"),
    "accuracy": ("accuracy", "acc"),
    "balanced_accuracy": ("balanced_accuracy", "balanced accuracy", "bacc"),
    "false_positive_rate": ("false_positive_rate", "fpr", "false-positive rate"),
    "specificity": ("specificity", "tnr", "1 - fpr", "1-fpr", "true-negative rate"),
    "roc_auc": ("roc_auc", "auroc", "auc", "roc auc"),
    "average_precision": ("average_precision", "auprc", "au-prc", "ap", "average precision"),
}


def _spelling(metric: str) -> str:
    return re.sub(r"[\s_]+", " ", metric.strip().lower())


_ALIASES = {_spelling(alias): name for name, aliases in METRICS.items() for alias in aliases}


def norm_metric(metric: str) -> str | None:
    """icm's name of a metric as papers spell it (``"F1-score"`` -> ``"f1"``), None if unknown."""
    return _ALIASES.get(_spelling(metric))


def norm_benchmark(name: str) -> str:
    """The key benchmarks are joined on: ``"UnsafeBench"``, ``"unsafe_bench"`` -> ``"unsafebench"``."""
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def norm_category(name: str | None) -> str:
    """The key categories are joined on: case, spaces, ``_`` and ``-`` ignored; none is ``overall``."""
    key = re.sub(r"[\s_\-/&]+", "-", (name or "").strip().lower()).strip("-")
    return key or "overall"


class PublishedSource(BaseModel):
    """Where a figure was printed."""

    model_config = ConfigDict(extra="forbid")

    citation: str = Field(min_length=1, description="The paper or report: authors, title, venue or arXiv id")
    url: str = Field(min_length=1, description="Where to read it")
    where: str = Field(min_length=1, description="Table or section of the figure, e.g. 'Table 2'")


class PublishedFigure(BaseModel):
    """One published number: model, benchmark, split, metric, category, value and its source."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="The peer model, as the source names it")
    benchmark: str = Field(min_length=1, description="Benchmark, as `icm eval bench` names it (unsafebench, llavaguard, ...)")
    split: str = Field(min_length=1, description="The split the figure was measured on (test, validation, ...)")
    metric: str = Field(description="f1, precision, recall, accuracy, balanced_accuracy, false_positive_rate, ...")
    value: float
    unit: Literal["percent", "fraction"] = Field(default="percent", description="percent: 0-100 as papers print; fraction: 0-1")
    category: str = Field(default="overall", description="The benchmark's category, or overall")
    n: int | None = Field(
        default=None, ge=1,
        description="Images the figure was measured on, where the source says; a run on another number of images "
        "(a partial copy, a --limit trial) is then not comparable")
    source: PublishedSource
    verification: Literal["paper", "secondary"] = Field(
        description="paper: read in the source itself; secondary: the source's table as reproduced elsewhere (named in checked)")
    checked: str = Field(min_length=1, description="How the figure was checked, against what")
    notes: str = ""

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        name = norm_metric(v)
        if name is None:
            raise ValueError(f"unknown metric {v!r}; one of {', '.join(METRICS)}")
        return name

    @field_validator("split", "benchmark", "category")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("value must be a finite number")
        return v

    @model_validator(mode="after")
    def _in_range(self) -> PublishedFigure:
        top = 100.0 if self.unit == "percent" else 1.0
        if not 0.0 <= self.value <= top:
            raise ValueError(f"value {self.value:g} is outside 0-{top:g} (unit: {self.unit})")
        return self

    @property
    def fraction(self) -> float:
        """The value as a fraction (0-1), the unit of icm's own metrics."""
        return self.value / 100.0 if self.unit == "percent" else self.value

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What comparability is decided on: benchmark, split, metric, category."""
        return norm_benchmark(self.benchmark), self.split.lower(), self.metric, norm_category(self.category)


class PublishedFile(BaseModel):
    path: str
    figures: list[PublishedFigure]


def builtin_path() -> Path:
    """The packaged figures (``--published builtin``)."""
    return Path(str(resources.files("icm.evaluation.published").joinpath("peers.yaml")))


def _entry_name(i: int, raw: object) -> str:
    model = raw.get("model") if isinstance(raw, dict) else None
    return f"entry {i}" + (f" (model {model!r})" if isinstance(model, str) and model else "")


def _errors(exc: ValidationError) -> str:
    out = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {msg}" if where else msg)
    return "; ".join(out)


def load_published(path: str | Path) -> PublishedFile:
    """Read and validate a published-figures file (YAML or JSON); ``builtin`` is the packaged one.

    Raises ValueError naming the file, and the entry (1-based position and model) that is wrong.
    """
    p = builtin_path() if str(path) == BUILTIN and not Path(path).exists() else Path(path)
    text = read_text(p, "published figures")  # ValueError: cannot read published figures FILE: reason
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} ({exc})") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"figures", "description"})
        if unknown:
            raise ValueError(f"{p}: unknown top-level key(s) {', '.join(unknown)}; expected 'figures' (and 'description')")
        data = data.get("figures")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{p}: expected a non-empty list of figures (or a mapping with a 'figures' list)")
    figures = []
    for i, raw in enumerate(data, 1):
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: {_entry_name(i, raw)}: expected a mapping of model, benchmark, split, metric, value, source ...")
        try:
            figures.append(PublishedFigure.model_validate(raw))
        except ValidationError as exc:
            raise ValueError(f"{p}: {_entry_name(i, raw)}: {_errors(exc)}") from None
    seen: dict[tuple[str, ...], int] = {}
    for i, f in enumerate(figures, 1):
        k = (f.model, *f.key)
        if k in seen:
            raise ValueError(f"{p}: {_entry_name(i, {'model': f.model})}: the same model, benchmark, split, metric and "
                             f"category as entry {seen[k]}")
        seen[k] = i
    return PublishedFile(path=str(p), figures=figures)
