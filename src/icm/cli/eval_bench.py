"""``icm eval bench NAME DATA``: a public image-safety benchmark, from the publisher's layout to figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from icm.cli import backend_options as bo
from icm.cli.common import err_console, print_error, print_json
from icm.policy import PolicyError


@bo.with_backend_options
def bench_cmd(
    name: str = typer.Argument(..., help="unsafebench, llavaguard, vlguard, smid or safeeditbench (docs/benchmarks.md)."),
    data: Path = typer.Argument(..., help="The benchmark as published: the Hugging Face dataset copy (parquet or "
                                "save_to_disk), or its JSON/CSV files and image folder."),
    split: str | None = typer.Option(None, "--split", help="The split reported (default: test, or the only one)."),
    tune_split: str | None = typer.Option(
        None, "--tune-split", help="Where the FPR 5% and recall 95% thresholds are chosen: a split other than the "
        "reported one, or 'cv' for folds of the reported split (default: validation or train when present, else cv)."),
    out_dir: Path | None = typer.Option(None, "--out-dir", "-o", help="Records (resumable) and extracted images "
                                        "(default bench-NAME)."),
    policy: str = typer.Option("icm-standard", "--policy", "-p", help="A policy or bundle (BUNDLE[:RULES])."),
    rules: str | None = typer.Option(None, "--rules", "-r"),
    backend_options: dict[str, Any] = bo.ALL,
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds when there is no tuning split."),
    min_coverage: float = typer.Option(0.9, "--min-coverage", help="A category is scored when the backend judged at "
                                       "least this share of its images; below, it is reported as not judged."),
    limit: int | None = typer.Option(None, "--limit", help="At most this many images per split (a trial run)."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence level of every interval."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the F1 and balanced accuracy intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and of the folds."),
    out: Path | None = typer.Option(None, "--out", help="Write the JSON report here."),
    html: Path | None = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
    json_: bool = typer.Option(False, "--json", help="Print the JSON report instead of tables."),
) -> None:
    """Moderate a public benchmark (resumable: the job of `icm moderate`) and report precision, recall, F1, FPR and
    balanced accuracy with intervals, per category and overall, at three operating points."""
    from icm.evaluation.bench.present import print_tables, write_html
    from icm.evaluation.bench.records import BenchDataError
    from icm.evaluation.bench.run import BenchConfig, run_bench
    from icm.fileio import atomic_write
    from icm.moderation.spec import BackendSpec

    try:
        cfg = BenchConfig(name=name, data=str(data), out_dir=str(out_dir or Path(f"bench-{name}")), split=split,
                          tune_split=tune_split, policy=policy, rules=rules, folds=folds, min_coverage=min_coverage,
                          confidence=confidence, bootstrap=bootstrap, seed=seed, limit=limit,
                          backend=BackendSpec.build(**backend_options))
    except ValueError as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    try:
        report = run_bench(cfg, on_stage=None if json_ else lambda s: err_console.print(f"[dim]{s}[/dim]", highlight=False))
    except (BenchDataError, PolicyError, KeyError, ValueError, ImportError) as exc:
        print_error(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        raise typer.Exit(2) from None
    for issue in report.issues:
        err_console.print(Text(("note: " if issue.kind == "note" else "left out: ") + issue.text(),
                               style="yellow" if issue.kind == "note" else "red"), highlight=False, soft_wrap=True)
    if out is not None:
        with atomic_write(out) as fh:
            fh.write(report.model_dump_json(indent=2) + "\n")
    if html is not None:
        write_html(report, html)
    if json_:
        print_json(report)
    else:
        print_tables(report)
    bad = report.moderation_errors or any(i.kind == "error" for i in report.issues)
    raise typer.Exit(1 if bad else 0)
