"""A run beside peers' published figures: which are comparable, and why not the others.

A run's figures are normalised to :class:`RunFigure` rows keyed like published ones on
(benchmark, split, metric, category). They come from either

- the JSON of ``icm eval bench NAME DATA --json`` (``benchmark``, ``split`` and per-category and
  overall metric values at one or more operating points), or
- a summary of today's ``icm eval icm --out`` / ``icm eval run`` (overall metrics, per-category
  accuracy), whose benchmark and split come from its ``meta`` or from ``--benchmark`` / ``--split``.

A published figure is comparable with the run's figure of the same benchmark, split, metric and
category; every other is listed with the reason it is not (other split, metric not measured by
the run, category missing, no figures on that benchmark).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from icm.evaluation.published import (
    PublishedFigure,
    PublishedFile,
    load_published,
    norm_benchmark,
    norm_category,
    norm_metric,
)
from icm.fileio import read_text

__all__ = [
    "PeerComparison", "PeerRow", "RunFigure", "RunFigures", "compare_files", "compare_published", "is_summary_file", "load_run",
    "peers_tables",
]


class RunFigure(BaseModel):
    metric: str
    category: str = "overall"
    value: float = Field(description="0-1, icm's unit")
    interval: tuple[float, float] | None = None
    n: int | None = None


class RunFigures(BaseModel):
    """One run's figures on one benchmark split."""

    name: str
    source: str
    benchmark: str | None = None
    split: str | None = None
    operating_point: str | None = Field(default=None, description="Which operating point's figures these are")
    figures: list[RunFigure] = Field(default_factory=list)

    def find(self, metric: str, category: str) -> RunFigure | None:
        cat = norm_category(category)
        return next((f for f in self.figures if f.metric == metric and norm_category(f.category) == cat), None)


class PeerRow(BaseModel):
    model: str
    benchmark: str
    split: str
    metric: str
    category: str
    published: float = Field(description="The published value, in percent")
    ours: float | None = Field(default=None, description="The run's value, in percent, where comparable")
    ours_interval: tuple[float, float] | None = None
    delta: float | None = Field(default=None, description="ours - published, percentage points")
    comparable: bool
    reason: str = Field(default="", description="Why not comparable")
    source: str
    verification: str
    notes: str = ""


class PeerComparison(BaseModel):
    run: str
    run_source: str
    benchmark: str | None
    split: str | None
    operating_point: str | None
    published: str
    rows: list[PeerRow]

    @property
    def n_comparable(self) -> int:
        return sum(r.comparable for r in self.rows)


# -- reading a run -------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _interval(x: Any) -> tuple[float, float] | None:
    if isinstance(x, dict):
        lo, hi = _num(x.get("low", x.get("lo"))), _num(x.get("high", x.get("hi")))
    elif isinstance(x, (list, tuple)) and len(x) == 2:
        lo, hi = _num(x[0]), _num(x[1])
    else:
        return None
    return (lo, hi) if lo is not None and hi is not None else None


def _count(d: dict[str, Any]) -> int | None:
    n = d.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _from_bench(data: dict[str, Any], source: str, name: str | None, operating_point: str | None) -> RunFigures:
    """The ``metrics`` rows of ``icm eval bench --json`` (benchmark, split, operating_point, category, metric, value ...)."""
    rows = data.get("metrics")
    if not isinstance(rows, list):
        raise ValueError("a bench run needs a 'metrics' list (the output of `icm eval bench ... --json`)")
    rows = [r for r in rows if isinstance(r, dict)]
    points = list(dict.fromkeys(str(r.get("operating_point")) for r in rows if r.get("operating_point")))
    chosen = operating_point or ("rules" if "rules" in points else (points[0] if points else None))
    if chosen is not None and points and chosen not in points:
        raise ValueError(f"no operating point {chosen!r}; the run has {', '.join(points)}")
    figures = []
    for r in rows:
        metric, v = norm_metric(str(r.get("metric", ""))), _num(r.get("value"))
        if metric is None or v is None or (points and r.get("operating_point") != chosen):
            continue  # an undefined figure (no positives, a category not judged) is not a figure
        if r.get("benchmark") not in (None, data["benchmark"]) or r.get("split") not in (None, data.get("split")):
            raise ValueError(f"a metrics row of {r.get('benchmark')}/{r.get('split')} in a run of {data['benchmark']}/{data.get('split')}")
        figures.append(RunFigure(metric=metric, category=str(r.get("category") or "overall"), value=v,
                                 interval=_interval(r.get("interval")), n=_count(r)))
    backend = " ".join(str(data[k]) for k in ("backend", "model") if data.get(k))
    default = str(data.get("name") or Path(source).stem) + (f" ({backend})" if backend else "")
    return RunFigures(name=name or default, source=source,
                      benchmark=str(data["benchmark"]), split=str(data.get("split") or "") or None,
                      operating_point=chosen, figures=_with_specificity(figures))


def _with_specificity(figures: list[RunFigure]) -> list[RunFigure]:
    """Specificity (1 - FPR, as some papers print it) wherever the run has the false-positive rate and not it."""
    have = {(f.metric, norm_category(f.category)) for f in figures}
    out = list(figures)
    for f in figures:
        if f.metric == "false_positive_rate" and ("specificity", norm_category(f.category)) not in have:
            iv = (1 - f.interval[1], 1 - f.interval[0]) if f.interval else None
            out.append(RunFigure(metric="specificity", category=f.category, value=1 - f.value, interval=iv, n=f.n))
    return out


def _from_summary(data: dict[str, Any], source: str, name: str | None) -> RunFigures:
    """Figures of a summary, read through the metric registry (the summary's own layout is its business)."""
    from icm.evaluation.registry import metrics_for

    meta: dict[str, Any] = data["meta"] if isinstance(data.get("meta"), dict) else {}
    icm = data.get("icm") if isinstance(data.get("icm"), dict) else None
    figures: list[RunFigure] = []
    if icm is not None:
        ivs = icm.get("intervals") if isinstance(icm.get("intervals"), dict) else {}
        for spec in metrics_for("icm"):
            key = spec.name.split(".", 1)[1]
            metric, v = norm_metric(key), spec.get(data)
            if metric is not None and v is not None:
                n = icm.get("n_evaluated")
                figures.append(RunFigure(metric=metric, value=v, interval=_interval(ivs.get(key)),
                                         n=n if isinstance(n, int) else None))
        for c in icm.get("per_category") or []:  # today's summaries hold per-category accuracy only
            if isinstance(c, dict) and c.get("category") and _num(c.get("accuracy")) is not None:
                figures.append(RunFigure(metric="accuracy", category=str(c["category"]), value=float(c["accuracy"]),
                                         interval=_interval(c.get("accuracy_ci")), n=_count(c)))
    threshold = _num(icm.get("threshold")) if icm is not None else None
    return RunFigures(name=name or str(data.get("name") or Path(source).stem), source=source,
                      benchmark=meta.get("benchmark"), split=meta.get("split"),
                      operating_point=f"threshold {threshold:g}" if threshold is not None else None, figures=figures)


def is_summary_file(path: str | Path) -> bool:
    """Whether a file is an evaluation summary (``icm eval ... --out``) rather than a bench run."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "schema_version" in data and "benchmark" not in data


def load_run(path: str | Path, *, name: str | None = None, benchmark: str | None = None, split: str | None = None,
             operating_point: str | None = None) -> RunFigures:
    """A run's figures from a bench JSON or an evaluation summary; ``benchmark``/``split`` override the file's."""
    p = Path(path)
    text = read_text(p, "the run")  # ValueError: cannot read the run FILE: reason
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object (the output of `icm eval bench ... --json` or a summary)")
    try:
        if "schema_version" in data and "benchmark" not in data:
            run = _from_summary(data, str(p), name)
        elif "benchmark" in data:
            run = _from_bench(data, str(p), name, operating_point)
        else:
            raise ValueError(f"{p}: neither `icm eval bench --json` output (no 'benchmark') nor an evaluation summary "
                             "(no 'schema_version')")
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None
    if benchmark:
        run.benchmark = benchmark
    if split:
        run.split = split
    return run


# -- comparing ----------------------------------------------------------------------------------


def _why_not(f: PublishedFigure, run: RunFigures) -> str:
    bench, split, metric, cat = f.key
    if run.benchmark is None:
        return "the run names no benchmark (give --benchmark)"
    if norm_benchmark(run.benchmark) != bench:
        return f"other benchmark: the run is on {run.benchmark}"
    if run.split is None:
        return "the run names no split (give --split)"
    if run.split.lower() != split:
        return f"other split: published on {f.split}, the run on {run.split}"
    metrics = sorted({x.metric for x in run.figures if norm_category(x.category) == cat})
    if metrics and metric not in metrics:
        return f"other metric: the run has no {metric} for {f.category} (it has {', '.join(metrics)})"
    if not metrics:
        cats = sorted({x.category for x in run.figures if x.metric == metric})
        return f"category {f.category!r} not in the run" + (f" (its {metric} categories: {', '.join(cats)})" if cats else "")
    return "no matching figure"


def compare_published(run: RunFigures, published: PublishedFile) -> PeerComparison:
    """Every published figure beside the run's, comparable when benchmark, split, metric and category agree."""
    rows = []
    for f in published.figures:
        bench, split, metric, cat = f.key
        mine = None
        if run.benchmark and run.split and norm_benchmark(run.benchmark) == bench and run.split.lower() == split:
            mine = run.find(metric, cat)
        pub = f.fraction * 100
        src = f"{f.source.citation}, {f.source.where} ({f.source.url})"
        common: dict[str, Any] = dict(model=f.model, benchmark=f.benchmark, split=f.split, metric=f.metric, category=f.category,
                      published=pub, source=src, verification=f.verification, notes=f.notes)
        if mine is not None and f.n is not None and mine.n is not None and mine.n != f.n:
            rows.append(PeerRow(**common, comparable=False,
                                reason=f"other images: the run's {metric} is on {mine.n} images, the published one on {f.n}"))
        elif mine is None:
            rows.append(PeerRow(**common, comparable=False, reason=_why_not(f, run)))
        else:
            ours = mine.value * 100
            iv = (mine.interval[0] * 100, mine.interval[1] * 100) if mine.interval else None
            rows.append(PeerRow(**common, comparable=True, ours=ours, ours_interval=iv, delta=ours - pub))
    rows.sort(key=lambda r: (not r.comparable, r.benchmark.lower(), r.split, r.metric, r.category != "overall", r.category, r.model))
    return PeerComparison(run=run.name, run_source=run.source, benchmark=run.benchmark, split=run.split,
                          operating_point=run.operating_point, published=published.path, rows=rows)


def compare_files(runs: Sequence[str | Path], published: str | Path, **kw: Any) -> list[PeerComparison]:
    pub = load_published(published)
    return [compare_published(load_run(r, **kw), pub) for r in runs]


# -- the terminal table -------------------------------------------------------------------------


def peers_tables(comparisons: Sequence[PeerComparison]) -> RenderableType:
    """One table per run; sources numbered under the tables (the cells would not fit a terminal)."""
    parts: list[RenderableType] = []
    sources: dict[str, int] = {}
    for c in comparisons:
        where = ", ".join(x for x in (c.benchmark, c.split and f"split {c.split}", c.operating_point) if x) or "benchmark unknown"
        t = Table(title=f"{c.run} on {where}: {c.n_comparable} of {len(c.rows)} published figures comparable")
        for col in ("model", "benchmark", "split", "category", "metric", "published", "ours", "Δ", "comparable", "src"):
            t.add_column(col, justify="right" if col in ("published", "ours", "Δ") else "left", overflow="fold")
        for r in c.rows:
            ours = "-" if r.ours is None else f"{r.ours:.1f}" + (f" [{r.ours_interval[0]:.1f}-{r.ours_interval[1]:.1f}]"
                                                                 if r.ours_interval else "")
            delta = "-" if r.delta is None else f"{r.delta:+.1f}"
            comp = "yes" if r.comparable else f"no: {r.reason}"
            ref = sources.setdefault(r.source, len(sources) + 1)
            t.add_row(r.model, r.benchmark, r.split, r.category, r.metric, f"{r.published:.1f}", ours, delta,
                      Text(comp, style="green" if r.comparable else "yellow"),
                      f"[{ref}]" + ("" if r.verification == "paper" else " secondary"))
        parts.append(t)
    parts += [Text(f"[{i}] {src}") for src, i in sources.items()]
    parts.append(Text("Values in percent; Δ = ours - published (points). Comparable: same benchmark, split, metric and category. "
                      "'secondary': the source's table as reproduced elsewhere, the source itself not read (see the figure's "
                      "'checked' in the published file)."))
    return Group(*parts)
