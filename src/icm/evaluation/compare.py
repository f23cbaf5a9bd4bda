"""Runs side by side: every registered metric any of the summaries holds, best marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from icm.evaluation.registry import METRICS
from icm.evaluation.summary import EvalSummary, load_summary


class CompareRow(BaseModel):
    metric: str
    title: str
    task: str
    higher_is_better: bool
    fmt: str
    values: list[float | None]
    best: list[int] = Field(default_factory=list, description="Indexes of the runs with the best value")
    delta: list[float | None] = Field(default_factory=list, description="Difference to the first run")


class CompareReport(BaseModel):
    runs: list[str]
    sources: list[str]
    meta: list[dict] = Field(default_factory=list)
    rows: list[CompareRow]


def compare(summaries: Sequence[EvalSummary], sources: Sequence[str] | None = None) -> CompareReport:
    if len(summaries) < 1:
        raise ValueError("give at least one summary")
    rows = []
    for spec in METRICS.values():
        values = [spec.get(s) for s in summaries]
        present = [v for v in values if v is not None]
        if not present:
            continue
        target = max(present) if spec.higher_is_better else min(present)
        best = [i for i, v in enumerate(values) if v is not None and v == target] if len(present) > 1 else []
        first = values[0]
        delta = [None if (v is None or first is None) else v - first for v in values]
        rows.append(CompareRow(metric=spec.name, title=spec.title, task=spec.task, higher_is_better=spec.higher_is_better,
                               fmt=spec.fmt, values=values, best=best, delta=delta))
    names = [s.name for s in summaries]
    seen: dict[str, int] = {}
    unique = []
    for n in names:  # two runs of the same name stay apart
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return CompareReport(runs=unique, sources=list(sources or [""] * len(summaries)), meta=[s.meta for s in summaries], rows=rows)


def compare_files(paths: Sequence[str | Path]) -> CompareReport:
    return compare([load_summary(p) for p in paths], [str(p) for p in paths])
