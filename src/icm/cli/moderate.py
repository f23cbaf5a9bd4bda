"""`icm moderate`: flags -> :class:`~icm.run.config.ModerateConfig` -> :func:`~icm.run.preflight.preflight`
-> an engine (:mod:`icm.run.local` or :mod:`icm.run.ray`) -> a table or JSON lines."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from icm.cli import backend_options as bo
from icm.cli.common import console, err_console, print_error
from icm.moderation.backends.base import BackendConfigError
from icm.moderation.bundle import BundleModerator, overviews
from icm.moderation.engine import escalation_counts
from icm.moderation.record import ModerationRecord
from icm.policy import PolicyError
from icm.run.config import ModerateConfig
from icm.run.local import build_runner, close_runner, run_job
from icm.run.output import JobSummary
from icm.run.preflight import judgeable, preflight

VERDICT_STYLE = {"allow": "green", "review": "yellow", "block": "red"}
MAX_ROWS = 50


def _fmt(p: float | None) -> str:
    return "-" if p is None else f"{p:.3f}"


def _run_table(summary: JobSummary, rows: int) -> Table:
    """A run's table of ``rows`` rows (the first :data:`MAX_ROWS` shown): its title, the image and verdict columns."""
    title = f"{summary.total} images in {summary.seconds:.1f}s"
    if rows > MAX_ROWS:
        title += f" (first {MAX_ROWS} shown)"
    t = Table(title=title)
    t.add_column("image", overflow="fold")
    t.add_column("verdict")
    return t


def summary_table(summary: JobSummary) -> Table:
    shown = summary.records[:MAX_ROWS]
    t = _run_table(summary, len(summary.records))
    t.add_column("P(term)", justify="right")
    t.add_column("P(violation)", justify="right")
    t.add_column("product / rule", overflow="fold")
    for r in shown:
        if not r.ok:
            t.add_row(escape(r.path), "[red]error[/red]", "-", "-", escape(r.error or ""))
            continue
        style = VERDICT_STYLE.get(r.verdict or "", "white")
        lo, hi = r.p_violation_range or (r.p_violation, r.p_violation)
        pv = _fmt(r.p_violation) if lo == hi else f"{_fmt(lo)}-{_fmt(hi)}"
        if r.product:
            what = f"{r.product} ({r.rule})"
        else:
            judged = [a for a in r.attributes if a not in r.not_judged]
            what = "- (judged: " + ", ".join(["term"] * (r.term is not None and r.term.p_yes is not None) + judged) + ")"
        unread = {k: v.split(":")[0] for k, v in r.unanswered.items() if not v.startswith("cannot-judge")}
        if unread:  # refused / off-format answers: say so, they are why the image is not allowed
            what += " " + ", ".join(f"{k} {why}" for k, why in unread.items())
        if r.stage:
            what += f" [stage: {r.stage}]"
        t.add_row(escape(r.path), f"[{style}]{r.verdict}[/{style}]", _fmt(r.term.p_yes if r.term else None), pv, what)
    return t


def bundle_table(summary: JobSummary, records: list[ModerationRecord]) -> Table:
    """A bundle's run: per image the worst verdict of its policies and the flagged openai categories."""
    rows = overviews(records)
    t = _run_table(summary, len(rows))
    t.add_column("flagged (openai)", overflow="fold")
    t.add_column("policies not allowing", overflow="fold")
    for o in rows[:MAX_ROWS]:
        if not o.ok:
            errs = "; ".join(f"{k}: {v}" for k, v in o.errors.items())
            t.add_row(escape(o.path), "[red]error[/red]", "-", escape(errs))
            continue
        style = VERDICT_STYLE.get(o.verdict or "", "white")
        flagged = ", ".join(o.flagged_categories.get("openai", [])) or "-"
        worse = ", ".join(f"{k} ({v})" for k, v in o.verdicts.items() if v != "allow") or "-"
        t.add_row(escape(o.path), f"[{style}]{o.verdict}[/{style}]", escape(flagged), escape(worse))
    return t


def _shown(name: str) -> str:
    """A run field's default, as the help shows it (the default itself lives in ModerateConfig)."""
    return str(ModerateConfig.model_fields[name].default)


@bo.with_backend_options
def moderate(
    inputs: list[str] = typer.Argument(None, help="Image files, folders (recursive), glob patterns, or - for a list of paths on stdin."),
    policy: str | None = typer.Option(
        None, "--policy", "-p", show_default=_shown("policy"),
        help="Built-in policy name or policy YAML file; or a bundle (icm-standard[:RULES], or a bundle YAML file): every member policy.",
    ),
    rules: str | None = typer.Option(None, "--rules", "-r", help="Rule set of the policy (default: the policy's default)."),
    backend_options: dict[str, Any] = bo.ALL,
    explain: bool = typer.Option(False, "--explain", help="Ask the model for an explanation (backends that generate text)."),
    out: str | None = typer.Option(
        None, "--out", "-o", help="JSONL file, one record per image (per image and policy with a bundle), written as it goes.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Skip images --out already holds for the same policy, rules, backend and model."),
    max_pixels: int | None = typer.Option(None, help="Refuse images above this many pixels (decompression bombs)."),
    max_frames: int | None = typer.Option(
        None, "--max-frames", show_default=_shown("max_frames"),
        help=(
            "Frames judged per animated/multi-page image or video (all up to this, evenly spaced beyond; the worst frame "
            "decides)."
        ),
    ),
    null: bool = typer.Option(False, "--null", "-0", help="With -: paths on stdin are separated by NUL bytes (find -print0), not lines."),
    fps: float | None = typer.Option(
        None, "--fps", show_default=_shown("fps"),
        help="Video: frames sampled per second, thinned evenly to --max-frames (needs the [video] extra).",
    ),
    json_: bool = typer.Option(False, "--json", help="Print the records as JSON lines instead of a table."),
    allow_unjudged: bool = typer.Option(
        False, "--allow-unjudged",
        help="Run even when the backend can judge nothing of the policy (every image would go to review); without it that is exit 2.",
    ),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a Ray Data actor pool; the [ray] extra). Same records either way."),
    address: str | None = typer.Option(None, "--address", help="ray: an existing cluster (auto, ray://host:10001); default: start a local one."),
    num_actors: int | None = typer.Option(None, "--num-actors", show_default="1", help="ray: actors in the pool, each with its own backend."),
    cpus_per_actor: float | None = typer.Option(
        None, "--cpus-per-actor",
        help="ray: CPUs per actor (default 1, less when that would leave no CPU for reading and writing).",
    ),
    gpus_per_actor: float | None = typer.Option(
        None, "--gpus-per-actor", show_default="0.0", help="ray: GPUs per actor (fractions share a GPU).",
    ),
    threads_per_actor: int | None = typer.Option(
        None, "--threads-per-actor",
        help="ray: model threads per actor (onnxruntime, torch); default: the actor's whole CPUs, at least 1.",
    ),
) -> None:
    """Moderate images with a policy and rule set; one verdict (allow / review / block) per image."""
    ray_flags: dict[str, Any] = {"address": address, "num_actors": num_actors, "cpus_per_actor": cpus_per_actor,
                 "gpus_per_actor": gpus_per_actor, "threads_per_actor": threads_per_actor}
    ray_options = None
    stopping: tuple[type[Exception], ...] = ()  # the ray engine: a pool that cannot run, a table it cannot read, no Ray
    try:  # flags -> config -> preflight -> engine (its backends built, or Ray's driver-side view)
        config = ModerateConfig.from_options(
            inputs=list(inputs or []), policy=policy, rules=rules, explain=explain or None, out=out,
            resume=resume or None, max_pixels=max_pixels, max_frames=max_frames, fps=fps, null=null or None, **backend_options,
        )
        checked = preflight(config, engine=engine)
        if engine == "ray":
            from icm.run.ray import RayEngineError, RayOptions, RunInfo

            ray_options = RayOptions(**{k: v for k, v in ray_flags.items() if v is not None})
            stopping = (RayEngineError, ImportError)
            runner: Any = RunInfo(config, checked)
        else:
            runner = build_runner(config, checked)
    except (PolicyError, KeyError, ValueError, ImportError) as exc:
        print_error(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        raise typer.Exit(2) from None
    try:
        summary, seen = _run(config, runner, ray_options, json_=json_, allow_unjudged=allow_unjudged)
    except stopping as exc:
        print_error(f"stopped: {exc}")
        raise typer.Exit(2) from None
    except BackendConfigError as exc:
        print_error(f"stopped: {exc}" + (f" (the records so far are in {out}; fix this and rerun with --resume)" if out else ""))
        raise typer.Exit(2) from None
    finally:
        close_runner(runner)
    _render(summary, runner, seen, out=config.out, json_=json_)
    raise typer.Exit(0 if summary.ok else 1)


def _run(
    config: ModerateConfig, runner: Any, ray_options: Any, *, json_: bool, allow_unjudged: bool,
) -> tuple[JobSummary, list[ModerationRecord]]:
    """Say up front what the backend cannot judge, then run the engine with a progress bar (and --json lines)."""
    error, notes, left_out = judgeable(runner, allow_unjudged=allow_unjudged)
    for note in notes:
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    if error:
        print_error(error)
        raise typer.Exit(2)
    bundle = isinstance(runner, BundleModerator)
    if bundle and left_out:
        runner.members = [m for m in runner.members if m not in left_out]
    progress = Progress(
        TextColumn("[bold]moderating[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
    )
    task = None
    per_image = len(runner.members) if bundle else 1  # records per image

    def on_start(n: int) -> None:
        nonlocal task
        task = progress.add_task("moderate", total=n * per_image, rate="")

    seen: list[ModerationRecord] = []  # a bundle's table and counts: every record, the ones --resume skipped too

    def on_record(r: ModerationRecord) -> None:
        if bundle:
            seen.append(r)
        if json_:
            sys.stdout.write(r.model_dump_json() + "\n")
            sys.stdout.flush()
        if task is not None:
            t = progress.tasks[0]
            rate = f"{(t.completed + 1) / per_image / t.elapsed:.1f} img/s" if t.elapsed else ""
            progress.update(task, advance=1, rate=rate)

    with progress:
        if ray_options is not None:
            from icm.run.ray import run_ray_job

            return run_ray_job(config, ray_options, stdin=sys.stdin, on_start=on_start, on_record=on_record, info=runner), seen
        return run_job(config, moderator=runner, stdin=sys.stdin, on_start=on_start, on_record=on_record), seen


def _render(summary: JobSummary, runner: Any, seen: list[ModerationRecord], *, out: str | None, json_: bool) -> None:
    """The run's table and one-line summary (nothing more with --json: the records were the output)."""
    if json_:
        return
    if isinstance(runner, BundleModerator):
        console.print(bundle_table(summary, seen))
        worst = Counter((o.verdict or "error") for o in overviews(seen))
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(worst.items()))
        console.print(
            f"bundle [bold]{runner.bundle.name}[/bold] ({len(runner.members)} policies), rules "
            f"[bold]{runner.rules or 'each default'}[/bold], backend [bold]{runner.backend_name}[/bold] "
            f"({runner.model_id}) | images by worst verdict: {counts or 'none'}, failed records: {summary.errors}"
            + (f", {summary.text_summary()}" if summary.text_records else "")
            + (f", skipped (already in {out}): {summary.skipped}" if summary.skipped else "")
            + (f" | records: {out}" if out else ""),
            highlight=False,
        )
        return
    console.print(summary_table(summary))
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary.verdicts.items()))
    extra = f", skipped (already in {out}): {summary.skipped}" if summary.skipped else ""
    escalated, staged = escalation_counts(summary.records)
    if staged:  # the cascade: how many images the first stage could not clear
        extra += f", escalated: {escalated} of {staged} ({escalated / staged:.0%})"
    if summary.text_records:  # one sampled answer each, not a measured probability
        extra += f", {summary.text_summary()}"
    console.print(
        f"policy [bold]{runner.policy.name}[/bold], rules [bold]{runner.rule_set.name}[/bold], "
        f"backend [bold]{runner.backend_name}[/bold] ({runner.model_id}) | {counts or 'no verdicts'}, "
        f"errors: {summary.errors}{extra}" + (f" | records: {out}" if out else ""),
        highlight=False,
    )
