"""A self-contained HTML report of an evaluation summary.

One file, no external resource: plots are drawn with matplotlib (Agg backend, no
display needed) and embedded as base64 PNG; tables and text are plain HTML with every
value escaped. Without matplotlib (the ``eval`` extra) the report still has every table,
and says why it has no plots.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Iterable, Sequence

from icm.evaluation.compare import CompareReport
from icm.evaluation.icm_metrics import ICMReport
from icm.evaluation.meq import MEQReport
from icm.evaluation.meq_judge import CRITERIA
from icm.evaluation.mqa import MQAReport
from icm.evaluation.registry import metrics_for
from icm.evaluation.summary import EvalSummary
from icm.evaluation.tables import _interval_cell, icm_interval

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d1d1f;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:2px solid #ddd;padding-bottom:.2rem}h3{margin-top:1.4rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}.bad{color:#b00020}.good{color:#0a7a2f}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4rem .7rem;margin:.4rem 0}.meta{color:#555}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots img{max-width:520px;width:100%;border:1px solid #eee}
details{margin:.3rem 0}pre{white-space:pre-wrap;background:#f7f7f7;padding:.5rem}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _ci2(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], num: Sequence[int] = ()) -> str:
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in headers), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in num else ""
            out.append(f"<td{cls}>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _notes(notes: Iterable[str]) -> str:
    return "".join(f'<div class="note">{_e(n)}</div>' for n in notes if n)


# -- plots ------------------------------------------------------------------------------


def _pyplot():  # noqa: ANN202
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig) -> str:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


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


# -- sections --------------------------------------------------------------------------------


def icm_section(r: ICMReport) -> str:
    parts = ["<h2>ICM accuracy</h2>"]
    parts.append(
        f'<p class="meta">{_e(r.source)} ({_e(r.format)}), policy <b>{_e(r.policy)}</b>, rules <b>{_e(r.rules)}</b>, '
        f"target {_e(r.target)}, score: {_e(r.score)}; protocol <b>{_e(r.protocol)}</b>, threshold {r.threshold:g}. "
        f"{r.n_evaluated} of {r.n_items} images evaluated ({r.n_positive} should be flagged), "
        f"{r.n_unlabelled} unlabelled, {r.n_unscored} without a score. "
        f"Judged {r.n_judged}, failed {r.n_failed}, not judged {r.n_not_judged}"
        + (f" ({_e(', '.join(f'{k}: {v}' for k, v in r.not_judged_reasons.items()))})" if r.not_judged_reasons else "")
        + f"; intervals at {r.confidence:.0%} (Wilson for proportions, {r.bootstrap} bootstrap resamples, seed {r.seed}).</p>"
    )
    rows = []
    data = {"icm": r.model_dump()}
    for spec in metrics_for("icm"):
        v = spec.get(data)
        if v is not None or spec.path.startswith("icm.metrics."):
            iv = icm_interval(r, spec.name)
            rows.append((_e(spec.title), _f(v, spec.fmt) if v is not None else "- (undefined)",
                         _e(_interval_cell(iv)), _e(spec.description)))
    parts.append(_table(["metric", "value", f"{r.confidence:.0%} interval", "what"], rows, num=(1,)))
    c = r.confusion
    parts.append("<h3>Confusion matrix</h3>")
    parts.append(_table(["", "flagged", "passed"], [("should be flagged", f"TP {c.tp}", f"FN {c.fn}"), ("should pass", f"FP {c.fp}", f"TN {c.tn}")]))
    if r.paper:
        p = r.paper
        parts.append("<h3>The published script's protocol</h3>")
        parts.append(f"<p>{_e(p.description)}.</p>")
        parts.append(_table(
            ["protocol", "counted", "TP", "FP", "TN", "FN", "accuracy", "precision", "recall"],
            [
                ("published script", f"{p.matches} matches / {p.images} images", p.confusion.tp, p.confusion.fp, p.confusion.tn, p.confusion.fn,
                 _f(p.metrics.get("accuracy"), ".5f"), _f(p.metrics.get("precision")), _f(p.metrics.get("recall"))),
                ("each image once", f"{r.per_image.n} images", r.per_image.confusion.tp, r.per_image.confusion.fp, r.per_image.confusion.tn,
                 r.per_image.confusion.fn, _f(r.per_image.metrics.get("accuracy"), ".5f"), _f(r.per_image.metrics.get("precision")),
                 _f(r.per_image.metrics.get("recall"))),
            ], num=(2, 3, 4, 5, 6, 7, 8)))
        parts.append(f"<p><b>Difference:</b> {_e(p.difference)}</p>")
    if r.best_f1:
        b = r.best_f1
        parts.append(f"<p>Best F1 {b.f1:.4f} at threshold {b.threshold:.4f} (precision {b.precision:.4f}, recall {b.recall:.4f}).</p>")
    imgs = icm_plots(r)
    parts.append('<div class="plots">' + "".join(imgs) + "</div>" if imgs else _notes(["no plots: install matplotlib (pip install 'icm-assistant[eval]')"]))
    if r.sweep:
        parts.append("<details><summary>Threshold sweep</summary>")
        parts.append(_table(["threshold", "TP", "FP", "TN", "FN", "precision", "recall", "F1", "accuracy"],
                            [(f"{s.threshold:g}", s.tp, s.fp, s.tn, s.fn, _f(s.precision) + _ci(s.precision_ci), _f(s.recall) + _ci(s.recall_ci),
                              _f(s.f1), _f(s.accuracy)) for s in r.sweep],
                            num=tuple(range(9))))
        parts.append("</details>")
    if r.per_category:
        parts.append("<h3>Per category (worst first)</h3>")
        parts.append(_table(
            ["category", "product", "should", "rule", "images", "flagged", "accuracy", "mean score"],
            [(_e(c.category), _e(c.product), "flag" if c.positive else "pass", _e(c.rule), c.n, c.flagged,
              f'<span class="{"bad" if c.accuracy < 0.9 else "good"}">{c.accuracy:.4f}</span>' + _ci(c.accuracy_ci), f"{c.mean_score:.4f}")
             for c in r.per_category],
            num=(4, 5, 6, 7)))
    if r.worst_errors:
        parts.append("<h3>Worst errors</h3><p>Misclassified images, most confident first, with what the model said.</p>")
        rows = []
        for e in r.worst_errors:
            said = " ".join(x for x in (e.reason, e.explanation) if x)
            rows.append((_e(e.id), _e(e.category), _e(e.product), "flag" if e.truth else "pass", f"{e.score:.4f}", _e(e.verdict), _e(said) or "-"))
        parts.append(_table(["image", "category", "product", "should", "score", "verdict", "reason / explanation"], rows, num=(4,)))
    parts.append(_notes(r.notes))
    return "".join(parts)


def mqa_section(r: MQAReport) -> str:
    parts = ["<h2>Moderation Q-A</h2>", f'<p class="meta">{_e(r.name)}: {_e(r.source)} ({_e(r.format)})</p>']
    rows = []
    for label, k in (("multiple-choice", r.mc), ("yes/no", r.yes_no), ("all", r.all)):
        rows.append((label, k.correct, k.total, _f(k.accuracy) + _ci(k.accuracy_ci), k.invalid_answers, k.missing_answers, k.invalid_truth,
                     _f(k.accuracy_valid_truth)))
    parts.append(_table(["questions", "correct", "total", f"accuracy [{r.confidence:.0%} Wilson]", "invalid answers", "no answer", "invalid truth",
                         "accuracy (valid truth)"],
                        rows, num=(1, 2, 3, 4, 5, 6, 7)))
    if r.per_category:
        parts.append("<details><summary>Per category</summary>")
        parts.append(_table(["category", "correct", "total", "accuracy"],
                            [(_e(c), k.correct, k.total, _f(k.accuracy) + _ci(k.accuracy_ci))
                             for c, k in sorted(r.per_category.items(), key=lambda x: x[1].accuracy or 0)],
                            num=(1, 2, 3)))
        parts.append("</details>")
    parts.append(_notes(r.notes))
    return "".join(parts)


def meq_section(r: MEQReport) -> str:
    parts = ["<h2>Moderation explanation quality</h2>",
             f'<p class="meta">{_e(r.name)}: {_e(r.source)}; mode {_e(r.mode)}' + (f", judge {_e(r.judge_model)}" if r.judge_model else "") +
             f"; {r.n_items} explanations, {r.n_complete} fully scored, {r.n_partial} partly, {r.n_failed} failed.</p>"]
    if r.means:
        parts.append(_table(["criterion", "mean (missing = 0)", "mean over scored", "missing"],
                            [(c, _f(r.means.get(c), ".2f") + _ci2(r.means_ci.get(c)), _f(r.means_scored.get(c), ".2f"), r.missing.get(c, 0))
                             for c in CRITERIA],
                            num=(1, 2, 3)))
    if r.offline:
        o = r.offline
        parts.append(f"<p>Offline metric: {_e(o.metric)}" + (f" ({_e(o.model)})" if o.model else "") +
                     f"; mean {o.mean:.2f} / 100, mean ROUGE-L {o.mean_lexical:.4f}" +
                     (f", mean embedding cosine {o.mean_embedding:.4f}" if o.mean_embedding is not None else "") + ".</p>")
    if r.correlations:
        parts.append("<h3>How far to trust the offline metric</h3>")
        parts.append(_table(["measure", "criterion", "Spearman", "p-value", "n"],
                            [(_e(c.measure), _e(c.criterion), _f(c.spearman), _f(c.p_value, ".2e"), c.n) for c in r.correlations], num=(2, 3, 4)))
    imgs = meq_plots(r)
    if imgs:
        parts.append('<div class="plots">' + "".join(imgs) + "</div>")
    if r.failures:
        parts.append("<details><summary>Failures</summary>")
        parts.append(_table(["item", "error"], [(_e(f.id), _e(f.error)) for f in r.failures]))
        parts.append("</details>")
    if r.worst:
        parts.append("<h3>Lowest-scored explanations</h3>")
        for w in r.worst:
            sc = ", ".join(f"{c} {_f(w.scores.get(c), '.0f')}" for c in CRITERIA if w.scores.get(c) is not None)
            if w.offline is not None:
                sc += (", " if sc else "") + f"offline {w.offline:.1f}"
            parts.append(f"<details><summary>{_e(w.id)}: {_e(sc)}</summary><p><b>Reference</b></p><pre>{_e(w.reference)}</pre>"
                         f"<p><b>Model</b></p><pre>{_e(w.candidate)}</pre></details>")
    parts.append(_notes(r.notes))
    return "".join(parts)


def render_html(summary: EvalSummary, compare: CompareReport | None = None) -> str:
    meta = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in summary.meta.items())
    body = [f"<h1>Evaluation: {_e(summary.name)}</h1>",
            f'<p class="meta">icm {_e(summary.icm_version)}, {_e(summary.created_at)}</p>']
    if meta:
        body.append(f"<table>{meta}</table>")
    if summary.icm:
        body.append(icm_section(summary.icm))
    if summary.mqa:
        body.append(mqa_section(summary.mqa))
    if summary.meq:
        body.append(meq_section(summary.meq))
    if compare:
        body.append(compare_section(compare))
    if not (summary.icm or summary.mqa or summary.meq or compare):
        body.append("<p>No figures in this summary.</p>")
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>icm evaluation: {_e(summary.name)}</title><style>{_CSS}</style></head><body>"
        + "".join(body) + "</body></html>\n"
    )


def compare_section(c: CompareReport) -> str:
    rows = []
    for r in c.rows:
        cells = []
        for i, v in enumerate(r.values):
            txt = "-" if v is None else format(v, r.fmt)
            cells.append(f"<b>{txt}</b>" if i in r.best else txt)
        rows.append((_e(r.title) + (" &uarr;" if r.higher_is_better else " &darr;"), *cells))
    return "<h2>Runs compared</h2>" + _table(["metric", *c.runs], rows, num=tuple(range(1, len(c.runs) + 1)))


def write_html(summary: EvalSummary, path: str | Path, compare: CompareReport | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_html(summary, compare), encoding="utf-8")
    return p
