"""Rich tables of evaluation reports, for the terminal."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from icm.evaluation.calibrate import CalibrationReport, fmt_threshold
from icm.evaluation.compare import CompareReport
from icm.evaluation.icm_metrics import ICMReport
from icm.evaluation.meq import MEQReport
from icm.evaluation.meq_judge import CRITERIA
from icm.evaluation.mqa import MQAReport
from icm.evaluation.registry import METRICS, MetricSpec, metrics_for
from icm.evaluation.stats import Interval
from icm.evaluation.summary import EvalSummary


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _notes(notes: list[str]) -> list[RenderableType]:
    return [Text(f"note: {n}", style="yellow") for n in notes if n]


def icm_interval(r: ICMReport, metric: str) -> Interval | None:
    """The interval of a registered ICM metric (``icm.accuracy``, ``icm.paper_accuracy`` ...), if any."""
    return METRICS[metric].interval(r)


def icm_metric_rows(r: ICMReport) -> list[tuple[MetricSpec, float | None, Interval | None]]:
    """Each registered ICM metric that has a value in ``r`` (the headline ones always), with its interval."""
    return [(spec, v, spec.interval(r)) for spec in metrics_for("icm") if (v := spec.of_report(r)) is not None or spec.always]


def _interval_cell(iv: Interval | None) -> str:
    if iv is None:
        return ""
    how = f"Wilson, {iv.k}/{iv.n}" if iv.method == "wilson" else f"bootstrap, {iv.resamples}"
    return f"{iv.text()} ({how})"


def _interval_parts(iv: Interval | None) -> tuple[str, str]:
    if iv is None:
        return "", ""
    return iv.text(), (f"{iv.k}/{iv.n}" if iv.method == "wilson" else "bootstrap")


def icm_tables(r: ICMReport, *, categories: int = 10) -> RenderableType:
    out: list[RenderableType] = []
    t = Table(title=f"ICM accuracy: {r.name} ({r.n_evaluated} images, protocol {r.protocol}, threshold {r.threshold:g})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column(f"{r.confidence:.0%} interval", no_wrap=True)
    t.add_column("k/n", justify="right")
    for spec, v, iv in icm_metric_rows(r):
        t.add_row(spec.title, spec.format(v) if v is not None else "- (undefined)", *_interval_parts(iv))
    c = r.confusion
    t.add_row("TP / FP / TN / FN", f"{c.tp} / {c.fp} / {c.tn} / {c.fn}", "", "")
    if r.best_f1:
        t.add_row("best F1 (threshold)", f"{r.best_f1.f1:.4f} ({r.best_f1.threshold:.4f})", "", "")
    out.append(t)
    reasons = ", ".join(f"{k}: {v}" for k, v in r.not_judged_reasons.items())
    out.append(Text(f"judged / failed / not judged: {r.n_judged} / {r.n_failed} / {r.n_not_judged}" + (f" ({reasons})" if reasons else "")
                    + f"; intervals: Wilson for proportions, bootstrap ({r.bootstrap} resamples, seed {r.seed}) for the others"))
    out.append(Text(f"policy {r.policy}, rules {r.rules}, target {r.target}; score: {r.score}", style="dim"))
    if r.paper:
        p = r.paper
        pt = Table(title="Published script vs each image once")
        for col in ("protocol", "counted", "TP", "FP", "TN", "FN", "accuracy", "precision", "recall"):
            pt.add_column(col, justify="left" if col in ("protocol", "counted") else "right")
        pt.add_row("published script", f"{p.matches} / {p.images} images", *map(str, (p.confusion.tp, p.confusion.fp, p.confusion.tn, p.confusion.fn)),
                   _f(p.metrics.get("accuracy"), ".5f"), _f(p.metrics.get("precision")), _f(p.metrics.get("recall")))
        pi = r.per_image
        pt.add_row("each image once", f"{pi.n} images", *map(str, (pi.confusion.tp, pi.confusion.fp, pi.confusion.tn, pi.confusion.fn)),
                   _f(pi.metrics.get("accuracy"), ".5f"), _f(pi.metrics.get("precision")), _f(pi.metrics.get("recall")))
        out.append(pt)
        out.append(Text(p.difference))
    if r.per_category and len(r.per_category) > 1:
        ct = Table(title=f"Per category, worst {min(categories, len(r.per_category))} of {len(r.per_category)}")
        for col in ("category", "product", "should", "images", "flagged", "accuracy", f"{r.confidence:.0%} interval"):
            ct.add_column(col, justify="right" if col in ("images", "flagged", "accuracy") else "left")
        for row in r.per_category[:categories]:
            ci = f"[{row.accuracy_ci[0]:.4f}, {row.accuracy_ci[1]:.4f}]" if row.accuracy_ci else ""
            ct.add_row(row.category, row.product or "-", "flag" if row.positive else "pass", str(row.n), str(row.flagged), f"{row.accuracy:.4f}", ci)
        out.append(ct)
    out += _notes(r.notes)
    return Group(*out)


def mqa_tables(r: MQAReport) -> RenderableType:
    t = Table(title=f"Moderation Q-A: {r.name}")
    t.add_column("questions", no_wrap=True)
    for col in ("correct", "total", "accuracy", f"{r.confidence:.0%} interval", "invalid answers", "invalid truth"):
        t.add_column(col, justify="right")
    for label, k in (("multiple-choice", r.mc), ("yes/no", r.yes_no), ("all", r.all)):
        ci = f"[{k.accuracy_ci[0]:.4f}, {k.accuracy_ci[1]:.4f}]" if k.accuracy_ci else ""
        t.add_row(label, str(k.correct), str(k.total), _f(k.accuracy), ci, str(k.invalid_answers + k.missing_answers), str(k.invalid_truth))
    return Group(t, *_notes(r.notes))


def meq_tables(r: MEQReport) -> RenderableType:
    out: list[RenderableType] = []
    title = f"Explanation quality: {r.name} ({r.n_items} explanations, {r.mode}" + (f", judge {r.judge_model}" if r.judge_model else "") + ")"
    if r.means:
        t = Table(title=title)
        for col in ("criterion", "mean (missing = 0)", f"{r.confidence:.0%} interval", "mean over scored", "missing"):
            t.add_column(col, justify="left" if col == "criterion" else "right")
        for c in CRITERIA:
            ci = r.means_ci.get(c)
            t.add_row(c, _f(r.means.get(c), ".2f"), f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "", _f(r.means_scored.get(c), ".2f"),
                      str(r.missing.get(c, 0)))
        out.append(t)
        out.append(Text(f"{r.n_complete} fully scored, {r.n_partial} partly, {r.n_failed} failed"))
    else:
        out.append(Text(title, style="bold"))
    if r.offline:
        o = r.offline
        out.append(Text(f"offline metric ({o.metric}{', ' + o.model if o.model else ''}): mean {o.mean:.2f} / 100, "
                        f"ROUGE-L {o.mean_lexical:.4f}" + (f", embedding cosine {o.mean_embedding:.4f}" if o.mean_embedding is not None else "")))
    if r.correlations:
        ct = Table(title="Spearman correlation with the judge")
        ct.add_column("measure")
        for c in CRITERIA:
            ct.add_column(c, justify="right")
        for m in dict.fromkeys(c.measure for c in r.correlations):
            vals = {c.criterion: c for c in r.correlations if c.measure == m}
            ct.add_row(m, *(_f(vals[c].spearman) if c in vals else "-" for c in CRITERIA))
        out.append(ct)
    if r.failures:
        ft = Table(title=f"Failures ({len(r.failures)})")
        ft.add_column("item")
        ft.add_column("error", overflow="fold")
        for f in r.failures[:20]:
            ft.add_row(f.id, f.error)
        out.append(ft)
    out += _notes(r.notes)
    return Group(*out)


def summary_tables(s: EvalSummary) -> RenderableType:
    parts: list[RenderableType] = []
    if s.icm:
        parts.append(icm_tables(s.icm))
    if s.mqa:
        parts.append(mqa_tables(s.mqa))
    if s.meq:
        parts.append(meq_tables(s.meq))
    return Group(*parts)


def compare_table(c: CompareReport) -> Table:
    t = Table(title="Runs compared (best in bold; delta to the first run in brackets)")
    t.add_column("metric")
    for name in c.runs:
        t.add_column(name, justify="right", overflow="fold")
    for row in c.rows:
        cells = []
        for i, v in enumerate(row.values):
            txt = "-" if v is None else format(v, row.fmt)
            d = row.delta[i] if row.delta else None
            if i > 0 and d is not None and v is not None:
                txt += f" ({d:+{row.fmt}})"
            cells.append(f"[bold]{txt}[/bold]" if i in row.best else txt)
        t.add_row(row.title + (" ↑" if row.higher_is_better else " ↓"), *cells)
    return t


def _pct(x: float, ci: tuple[float, float] | None) -> str:
    return f"{x:.1%}" + (f" [{ci[0] * 100:.0f}-{ci[1] * 100:.0f}]" if ci else "")


def _rate(x: float | None, ci: tuple[float, float] | None, k: int, n: int) -> str:
    if x is None:
        return "- (none)"
    return f"{k}/{n} {x:.3f} [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else f"{k}/{n} {x:.3f}"


def calibration_tables(r: CalibrationReport) -> RenderableType:
    """The trade-off tables of ``icm eval calibrate`` and its outcome."""
    out: list[RenderableType] = []
    cols = ("review", "block", "blocked", "reviewed", "allowed", "block precision", "allow miss rate")

    def table(title: str, rows: list, mark: tuple[float, float] | None) -> Table:
        t = Table(title=title)
        for col in cols:
            t.add_column(col, justify="right", overflow="fold")
        for p in rows:
            star = mark is not None and (abs(p.review - mark[0]) < 1e-9 and abs(p.block - mark[1]) < 1e-9)
            cells = [f"{fmt_threshold(p.review)}", f"{fmt_threshold(p.block)}", _pct(p.blocked_fraction, p.blocked_ci),
                     _pct(p.reviewed_fraction, p.reviewed_ci), _pct(p.allowed_fraction, p.allowed_ci),
                     _rate(p.block_precision, p.block_precision_ci, p.blocked_violating, p.blocked),
                     _rate(p.allow_miss, p.allow_miss_ci, p.missed, p.violations)]
            t.add_row(*(f"[bold]{c}[/bold]" for c in cells) if star else cells)
        return t

    fixed = r.chosen or r.current
    mark = (r.chosen.review, r.chosen.block) if r.chosen else None
    out.append(Text(f"Calibrating rule set '{r.rules}' of policy '{r.policy}' on {r.n} labelled images "
                    f"({r.n_violations} violate, {r.n_clean} do not; {r.n_not_judged} not judged: always reviewed). "
                    f"Left out: {r.n_failed} failed, {r.n_unlabelled} unlabelled. Fractions of all {r.n} images; "
                    f"block precision = truly violating / blocked, allow miss rate = allowed / truly violating; "
                    f"[{r.confidence:.0%} Wilson intervals]."))
    out.append(table(f"Block threshold varied (review {fmt_threshold(fixed.review)})", r.block_sweep, mark))
    out.append(table(f"Review threshold varied (block {fmt_threshold(fixed.block)})", r.review_sweep, mark))
    out.append(table("Current thresholds" + (" and chosen thresholds (bold)" if r.chosen else ""),
                     [r.current] + ([r.chosen] if r.chosen else []), mark))
    for t in r.targets:
        out.append(Text(("met: " if t.met else "NOT MET: ") + t.message, style="green" if t.met else "bold red"))
    out += _notes(r.notes)
    return Group(*out)
