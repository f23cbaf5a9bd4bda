"""A benchmark report as rows: the terminal tables and the HTML page (the report templates) share them."""

from __future__ import annotations

from pathlib import Path

from icm.evaluation.bench.run import BenchReport, CategoryResult
from icm.evaluation.bench.scoring import METRIC_NAMES, OPERATING_POINTS, MetricValue
from icm.fileio import atomic_write

POINT_TITLES = {
    "rules": "the rule set's own thresholds (block = unsafe; review counted safe)",
    "fpr5": "false-positive rate 5% (threshold chosen on the tuning images)",
    "recall95": "recall 95% (threshold chosen on the tuning images)",
}


def _cell(m: MetricValue | None) -> str:
    if m is None or m.value is None:
        return "-"
    iv = f" [{m.interval.low:.3f}, {m.interval.high:.3f}]" if m.interval is not None else ""
    return f"{m.value:.3f}{iv}"


def metric_rows(r: BenchReport, point: str) -> list[list[str]]:
    """Per scored category (overall first) at ``point``: the category, its images and each metric with its interval."""
    by = {(m.category, m.metric): m for m in r.metrics if m.operating_point == point}
    rows = []
    for c in [r.overall, *r.categories]:
        if c.status != "scored" or not any((c.category, name) in by for name in METRIC_NAMES):
            continue
        op = next((o for o in c.operating_points if o.name == point), None)
        extra = ""
        if op is not None and op.review is not None:
            extra = f"{op.review} to review"
        elif op is not None and op.thresholds:
            ts = sorted(set(op.thresholds))
            extra = f"threshold {ts[0]:.4g}" if len(ts) == 1 else f"thresholds {ts[0]:.4g}..{ts[-1]:.4g}"
        rows.append([c.category, f"{c.positives}/{c.negatives}", *(_cell(by.get((c.category, name))) for name in METRIC_NAMES), extra])
    return rows


def category_rows(r: BenchReport) -> list[list[str]]:
    """Every category: its mapping, status, coverage and why (for those not scored)."""
    def mapped(c: CategoryResult) -> str:
        return ", ".join(f"{s}:{'/'.join(v)}" for s, v in c.mapped.items()) or "-"

    return [[c.category, mapped(c), c.status.replace("_", " "), "-" if c.coverage is None else f"{c.coverage:.0%}",
             f"{c.positives}/{c.negatives}", ", ".join(c.mapped_by) or "-", c.note] for c in r.categories]


METRIC_HEADERS = ["category", "unsafe/safe", *METRIC_NAMES, ""]
CATEGORY_HEADERS = ["category", "maps onto", "status", "coverage", "unsafe/safe", "mapped by", "note"]


def render_html(r: BenchReport) -> str:
    from icm.evaluation.report import _env

    return _env().get_template("bench.html.j2").render(
        r=r, points=[(p, POINT_TITLES[p], metric_rows(r, p)) for p in OPERATING_POINTS],
        metric_headers=METRIC_HEADERS, categories=category_rows(r), category_headers=CATEGORY_HEADERS,
    )


def write_html(r: BenchReport, path: str | Path) -> Path:
    p = Path(path)
    with atomic_write(p) as fh:
        fh.write(render_html(r))
    return p


def print_tables(r: BenchReport) -> None:
    from rich.table import Table

    from icm.cli.common import console

    console.print(f"[bold]{r.title}[/bold]: split {r.split}, thresholds from {r.tune_split}; policy {r.policy}"
                  f"{':' + r.rules if r.rules else ''}, backend {r.backend}{' ' + r.model if r.model else ''}", highlight=False)
    for point in OPERATING_POINTS:
        t = Table(title=POINT_TITLES[point], title_justify="left")
        for h in METRIC_HEADERS:
            t.add_column(h)
        for row in metric_rows(r, point):
            t.add_row(*row)
        console.print(t)
    t = Table(title="categories", title_justify="left")
    for h in CATEGORY_HEADERS:
        t.add_column(h)
    for row in category_rows(r):
        t.add_row(*row)
    console.print(t)
