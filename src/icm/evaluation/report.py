"""A self-contained HTML report of an evaluation summary.

One file, no external resource: the page is rendered from the Jinja2 templates in
``icm/evaluation/templates`` (shipped as package data) with autoescape on, so every value
from a summary (file names, model output, notes) is HTML-escaped. Plots are drawn with
matplotlib (Agg backend, no display needed) and embedded as base64 PNG. Without
matplotlib (the ``eval`` extra) the report still has every table, and says why it has no
plots.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from icm.evaluation.compare import CompareReport
from icm.evaluation.icm_metrics import ICMReport
from icm.evaluation.meq import MEQReport
from icm.evaluation.meq_judge import CRITERIA
from icm.evaluation.peers import PeerComparison
from icm.evaluation.summary import EvalSummary
from icm.evaluation.tables import _interval_cell, icm_metric_rows
from icm.fileio import atomic_write

__all__ = ["icm_plots", "meq_plots", "render_html", "write_html"]


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(ci: tuple[float, float] | None, fmt: str = ".3f") -> str:
    return "" if ci is None else f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


# -- plots ------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig) -> str:
    """The figure as base64 PNG (for a ``data:`` URL)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def icm_plots(r: ICMReport) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    imgs = []
    if r.roc:
        fig, ax = plt.subplots(figsize=(4.6, 4))
        ax.plot(r.roc.x, r.roc.y, lw=2, label=f"AUC {r.roc.auc:.4f}")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate (recall)", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right")
        imgs.append(_png(fig))
    if r.pr:
        fig, ax = plt.subplots(figsize=(4.6, 4))
        ax.plot(r.pr.x, r.pr.y, lw=2, label=f"average precision {r.pr.auc:.4f}")
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower left")
        imgs.append(_png(fig))
    if r.sweep:
        fig, ax = plt.subplots(figsize=(4.6, 4))
        ts = [s.threshold for s in r.sweep]
        for key in ("precision", "recall", "f1", "accuracy"):
            ax.plot(ts, [getattr(s, key) if getattr(s, key) is not None else float("nan") for s in r.sweep], label=key, lw=1.6)
        ax.axvline(r.threshold, c="grey", ls=":", lw=1)
        ax.set(xlabel="threshold (flag when score >= threshold)", title="Threshold sweep", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower center")
        imgs.append(_png(fig))
    if r.score_histogram:
        fig, ax = plt.subplots(figsize=(4.6, 4))
        edges = [i / 20 for i in range(21)]
        for key, color in (("negative", "#2b8a3e"), ("positive", "#c92a2a")):
            counts = r.score_histogram.get(key) or []
            if counts:
                ax.stairs(counts, edges, label=f"truth {key}", color=color, fill=True, alpha=0.45)
        ax.set_yscale("log")
        ax.axvline(r.threshold, c="grey", ls=":", lw=1)
        ax.set(xlabel="score", ylabel="images (log)", title="Scores by truth")
        ax.legend()
        imgs.append(_png(fig))
    if r.per_category and len(r.per_category) > 1:
        rows = sorted(r.per_category, key=lambda c: c.accuracy)[:40][::-1]  # worst at the top
        fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.22 * len(rows) + 1)))
        ax.barh([c.category for c in rows], [c.accuracy for c in rows], color=["#c92a2a" if c.positive else "#2b8a3e" for c in rows])
        ax.set(xlim=(0, 1), xlabel="accuracy (red: should be flagged, green: should pass)", title="Per-category accuracy")
        ax.tick_params(axis="y", labelsize=7)
        imgs.append(_png(fig))
    return imgs


def meq_plots(r: MEQReport) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    imgs = []
    judged = [it for it in r.items if any(it.scores.get(c) is not None for c in CRITERIA)]
    if judged:
        fig, ax = plt.subplots(figsize=(4.6, 4))
        data = [[it.scores[c] for it in judged if it.scores.get(c) is not None] for c in CRITERIA]
        ax.boxplot(data)
        ax.set_xticks(range(1, len(CRITERIA) + 1), list(CRITERIA), fontsize=8)
        ax.set(ylim=(0, 102), ylabel="score", title="Judge scores")
        imgs.append(_png(fig))
    both = [it for it in judged if it.offline is not None and it.scores.get("accuracy") is not None]
    if both:
        fig, ax = plt.subplots(figsize=(4.6, 4))
        ax.scatter([it.offline.score for it in both], [it.scores["accuracy"] for it in both], s=10, alpha=0.6)  # type: ignore[union-attr]
        rho = next((c.spearman for c in r.correlations if c.measure == "offline" and c.criterion == "accuracy"), None)
        ax.set(xlabel="offline score", ylabel="judge accuracy", title=f"Offline vs judge (Spearman {_f(rho, '.3f')})")
        imgs.append(_png(fig))
    elif r.items and r.items[0].offline is not None:
        fig, ax = plt.subplots(figsize=(4.6, 4))
        ax.hist([it.offline.score for it in r.items if it.offline], bins=20, color="#1c7ed6")
        ax.set(xlabel="offline score", ylabel="explanations", title="Offline scores")
        imgs.append(_png(fig))
    return imgs


# -- rendering -------------------------------------------------------------------------------


def _icm_metric_rows(r: ICMReport) -> list[tuple[str, str, str, str]]:
    """Each metric of the registry that has a value (the ``icm.metrics.*`` ones always)."""
    return [(spec.title, _f(v, spec.fmt) if v is not None else "- (undefined)", _interval_cell(iv), spec.description)
            for spec, v, iv in icm_metric_rows(r)]


def _worst_error_rows(errors: Iterable[Any]) -> list[tuple[Any, ...]]:
    return [(e.id, e.category, e.product, "flag" if e.truth else "pass", f"{e.score:.4f}", e.verdict,
             " ".join(x for x in (e.reason, e.explanation) if x) or "-") for e in errors]


def _worst_scores(w: Any) -> str:
    sc = ", ".join(f"{c} {_f(w.scores.get(c), '.0f')}" for c in CRITERIA if w.scores.get(c) is not None)
    if w.offline is not None:
        sc += (", " if sc else "") + f"offline {w.offline:.1f}"
    return sc


@lru_cache(maxsize=1)
def _env() -> Environment:
    env = Environment(
        loader=PackageLoader("icm.evaluation", "templates"),
        autoescape=True,  # every value is escaped; the templates hold the only markup
        undefined=StrictUndefined,  # a misspelt field is an error, not an empty cell
        finalize=lambda x: "" if x is None else x,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fmt=_f, ci=_ci)
    env.globals.update(
        criteria=CRITERIA, icm_plots=icm_plots, meq_plots=meq_plots, icm_metric_rows=_icm_metric_rows,
        worst_error_rows=_worst_error_rows, worst_scores=_worst_scores,
        per_category_by_accuracy=lambda d: sorted(d.items(), key=lambda x: x[1].accuracy or 0),
    )
    return env


def render_html(summary: EvalSummary, compare: CompareReport | None = None, peers: Sequence[PeerComparison] | None = None) -> str:
    """The report page of ``summary`` (and of a comparison of runs, and of runs beside published figures)."""
    return _env().get_template("report.html.j2").render(summary=summary, compare=compare, peers=peers)


def write_html(summary: EvalSummary, path: str | Path, compare: CompareReport | None = None,
               peers: Sequence[PeerComparison] | None = None) -> Path:
    p = Path(path)
    with atomic_write(p) as fh:
        fh.write(render_html(summary, compare, peers))
    return p
