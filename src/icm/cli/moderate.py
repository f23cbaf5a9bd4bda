"""`icm moderate`: run a policy over images; a thin layer over icm.moderation.job."""

from __future__ import annotations

import sys
from collections import Counter

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from icm.cli import backend_options as bo
from icm.cli.common import console, err_console, print_error
from icm.moderation.backends.base import DEFAULT_MIN_LABEL_MASS, DEFAULT_TEXT_CONFIDENCE, BackendConfigError
from icm.moderation.bundle import BundleModerator, overviews, parse_bundle_ref
from icm.moderation.engine import Moderator, escalation_counts
from icm.moderation.job import JobSummary, ModerateConfig, build_runner, members, run_job
from icm.moderation.record import ModerationRecord
from icm.policy import PolicyError

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


def moderate(
    inputs: list[str] = typer.Argument(None, help="Image files, folders (recursive), glob patterns, or - for a list of paths on stdin."),
    policy: str = typer.Option(
        "icm-sexy", "--policy", "-p",
        help="Built-in policy name or policy YAML file; or a bundle (icm-standard[:RULES], or a bundle YAML file): every member policy.",
    ),
    rules: str | None = typer.Option(None, "--rules", "-r", help="Rule set of the policy (default: the policy's default)."),
    backend: bo.BackendOpt = "detector",
    model: bo.ModelOpt = None,
    adapter: bo.AdapterOpt = None,
    base_url: bo.BaseUrlOpt = None,
    dtype: bo.DtypeOpt = "auto",
    device: bo.DeviceOpt = "auto",
    escalate_backend: bo.EscalateBackendOpt = "hf",
    explain: bool = typer.Option(False, "--explain", help="Ask the model for an explanation (backends that generate text)."),
    batch_size: bo.BatchSizeOpt = 8,
    out: str | None = typer.Option(
        None, "--out", "-o", help="JSONL file, one record per image (per image and policy with a bundle), written as it goes.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Skip images --out already holds for the same policy, rules, backend and model."),
    max_pixels: int | None = typer.Option(None, help="Refuse images above this many pixels (decompression bombs)."),
    max_frames: int = typer.Option(
        16, "--max-frames",
        help=(
            "Frames judged per animated/multi-page image or video (all up to this, evenly spaced beyond; the worst frame "
            "decides)."
        ),
    ),
    null: bool = typer.Option(False, "--null", "-0", help="With -: paths on stdin are separated by NUL bytes (find -print0), not lines."),
    fps: float = typer.Option(1.0, "--fps", help="Video: frames sampled per second, thinned evenly to --max-frames (needs the [video] extra)."),
    json_: bool = typer.Option(False, "--json", help="Print the records as JSON lines instead of a table."),
    allow_unjudged: bool = typer.Option(
        False, "--allow-unjudged",
        help="Run even when the backend can judge nothing of the policy (every image would go to review); without it that is exit 2.",
    ),
    min_label_mass: bo.MinLabelMassOpt = DEFAULT_MIN_LABEL_MASS,
    text_confidence: bo.TextConfidenceOpt = None,
    guided_choice: bo.GuidedChoiceOpt = "off",
    api_key_env: bo.ApiKeyEnvOpt = None,
    timeout: bo.TimeoutOpt = 60.0,
    max_retries: bo.MaxRetriesOpt = 3,
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a Ray Data actor pool; the [ray] extra). Same records either way."),
    address: str | None = typer.Option(None, "--address", help="ray: an existing cluster (auto, ray://host:10001); default: start a local one."),
    num_actors: int = typer.Option(1, "--num-actors", help="ray: actors in the pool, each with its own backend."),
    cpus_per_actor: float | None = typer.Option(
        None, "--cpus-per-actor",
        help="ray: CPUs per actor (default 1, less when that would leave no CPU for reading and writing).",
    ),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", help="ray: GPUs per actor (fractions share a GPU)."),
    threads_per_actor: int | None = typer.Option(
        None, "--threads-per-actor",
        help="ray: model threads per actor (onnxruntime, torch); default: the actor's whole CPUs, at least 1.",
    ),
) -> None:
    """Moderate images with a policy and rule set; one verdict (allow / review / block) per image."""
    if not inputs:
        err_console.print("[red]no input: give image files, folders, patterns, or - to read paths from stdin[/red]")
        raise typer.Exit(2)
    config = ModerateConfig(
        inputs=list(inputs), policy=policy, rules=rules, backend=backend, model=model, adapter=adapter,
        base_url=base_url, dtype=dtype, device=device, escalate_backend=escalate_backend, explain=explain,
        batch_size=batch_size, out=out, resume=resume, max_pixels=max_pixels,
        max_frames=max_frames, fps=fps, null=null, min_label_mass=min_label_mass, guided_choice=guided_choice,
        text_confidence=DEFAULT_TEXT_CONFIDENCE if text_confidence is None else text_confidence,
        api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
    )
    if resume and not out:
        err_console.print("[red]--resume needs --out[/red]")
        raise typer.Exit(2)
    ray_options = None
    ray_errors: tuple[type[Exception], ...] = ()
    if engine == "ray" and parse_bundle_ref(policy, rules) is not None:
        err_console.print("[red]a bundle runs on the local engine (--engine local)[/red]")
        raise typer.Exit(2)
    if engine == "ray":
        from icm.moderation.ray_engine import RayEngineError, RayOptions, RunInfo
        ray_errors = (RayEngineError, ImportError)
        ray_options = RayOptions(address=address, num_actors=num_actors, cpus_per_actor=cpus_per_actor,
                                 gpus_per_actor=gpus_per_actor, threads_per_actor=threads_per_actor)
    elif engine != "local":
        err_console.print(f"[red]unknown --engine {escape(engine)} (local or ray)[/red]")
        raise typer.Exit(2)
    try:
        moderator = build_runner(config) if ray_options is None else RunInfo(config)
    except (PolicyError, KeyError, ValueError, ImportError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print_error(msg)
        raise typer.Exit(2) from None
    checked = members(moderator) if isinstance(moderator, BundleModerator) else [moderator]
    left_out: list[Moderator] = []
    for m in checked:  # said once, up front: what the backend cannot judge
        if getattr(m, "policy", None) is None:
            continue
        from icm.moderation.evidence.plan import judgeability

        unjudged, warnings = judgeability(m.policy, moderator.backend, cascade=moderator.escalate_to is not None)
        if unjudged and not allow_unjudged and isinstance(moderator, BundleModerator):
            # a bundle runs the members the backend can judge; the others are named, not silently passed
            cats = ", ".join(m.policy.standard_categories.get("openai", {})) or "no openai category"
            err_console.print(f"[yellow]note:[/yellow] left out of the bundle: {escape(unjudged)} "
                              f"Its categories ({escape(cats)}) are not judged in this run.", highlight=False)
            left_out.append(m)
            continue
        if unjudged and not allow_unjudged:
            print_error(unjudged)
            moderator.backend.close()
            raise typer.Exit(2)
        for w in warnings + ([unjudged] if unjudged else []):
            err_console.print(f"[yellow]note:[/yellow] {escape(w)}", highlight=False)
    if isinstance(moderator, BundleModerator) and left_out:
        moderator.members = [m for m in moderator.members if m not in left_out]
        if not moderator.members:
            print_error(f"the {moderator.backend_name} backend can judge no policy of the bundle here")
            moderator.backend.close()
            raise typer.Exit(2)

    progress = Progress(
        TextColumn("[bold]moderating[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
    )
    task = None

    per_image = len(moderator.members) if isinstance(moderator, BundleModerator) else 1  # records per image

    def on_start(n: int) -> None:
        nonlocal task
        task = progress.add_task("moderate", total=n * per_image, rate="")

    seen: list[ModerationRecord] = []  # a bundle's table and counts: every record, the ones --resume skipped too

    def on_record(r: ModerationRecord) -> None:
        if isinstance(moderator, BundleModerator):
            seen.append(r)
        if json_:
            sys.stdout.write(r.model_dump_json() + "\n")
            sys.stdout.flush()
        if task is not None:
            t = progress.tasks[0]
            rate = f"{(t.completed + 1) / per_image / t.elapsed:.1f} img/s" if t.elapsed else ""
            progress.update(task, advance=1, rate=rate)

    try:
        with progress:
            if ray_options is None:
                summary = run_job(config, moderator=moderator, stdin=sys.stdin, on_start=on_start, on_record=on_record)
            else:
                from icm.moderation.ray_engine import run_ray_job
                summary = run_ray_job(config, ray_options, stdin=sys.stdin, on_start=on_start, on_record=on_record, info=moderator)
    except ray_errors as exc:  # the ray engine: a pool that cannot run, a table it cannot read, Ray not installed
        print_error(f"stopped: {exc}")
        raise typer.Exit(2) from None
    except BackendConfigError as exc:
        print_error(f"stopped: {exc}" + (f" (the records so far are in {out}; fix this and rerun with --resume)" if out else ""))
        raise typer.Exit(2) from None
    finally:
        moderator.backend.close()
        if moderator.escalate_to is not None:
            moderator.escalate_to.close()
    if not json_ and isinstance(moderator, BundleModerator):
        console.print(bundle_table(summary, seen))
        worst = Counter((o.verdict or "error") for o in overviews(seen))
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(worst.items()))
        console.print(
            f"bundle [bold]{moderator.bundle.name}[/bold] ({len(moderator.members)} policies), rules "
            f"[bold]{moderator.rules or 'each default'}[/bold], backend [bold]{moderator.backend_name}[/bold] "
            f"({moderator.model_id}) | images by worst verdict: {counts or 'none'}, failed records: {summary.errors}"
            + (f", {summary.text_summary()}" if summary.text_records else "")
            + (f", skipped (already in {out}): {summary.skipped}" if summary.skipped else "")
            + (f" | records: {out}" if out else ""),
            highlight=False,
        )
    elif not json_:
        console.print(summary_table(summary))
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary.verdicts.items()))
        extra = f", skipped (already in {out}): {summary.skipped}" if summary.skipped else ""
        escalated, staged = escalation_counts(summary.records)
        if staged:  # the cascade: how many images the first stage could not clear
            extra += f", escalated: {escalated} of {staged} ({escalated / staged:.0%})"
        if summary.text_records:  # one sampled answer each, not a measured probability
            extra += f", {summary.text_summary()}"
        console.print(
            f"policy [bold]{moderator.policy.name}[/bold], rules [bold]{moderator.rule_set.name}[/bold], "
            f"backend [bold]{moderator.backend_name}[/bold] ({moderator.model_id}) | {counts or 'no verdicts'}, "
            f"errors: {summary.errors}{extra}" + (f" | records: {out}" if out else ""),
            highlight=False,
        )
    raise typer.Exit(0 if summary.ok else 1)
