"""`icm moderate`: run a policy over images; a thin layer over icm.moderation.job."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

from icm.cli.common import console, err_console, print_error
from icm.moderation.backends.base import DEFAULT_MIN_LABEL_MASS, BackendConfigError
from icm.moderation.job import JobSummary, ModerateConfig, build_moderator, run_job
from icm.moderation.record import ModerationRecord
from icm.policy import PolicyError

VERDICT_STYLE = {"allow": "green", "review": "yellow", "block": "red"}
MAX_ROWS = 50


def _fmt(p: float | None) -> str:
    return "-" if p is None else f"{p:.3f}"


def summary_table(summary: JobSummary) -> Table:
    shown = summary.records[:MAX_ROWS]
    title = f"{summary.total} images in {summary.seconds:.1f}s"
    if len(summary.records) > MAX_ROWS:
        title += f" (first {MAX_ROWS} shown)"
    t = Table(title=title)
    t.add_column("image", overflow="fold")
    t.add_column("verdict")
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


def moderate(
    inputs: list[str] = typer.Argument(None, help="Image files, folders (recursive), glob patterns, or - for a list of paths on stdin."),
    policy: str = typer.Option("icm-sexy", "--policy", "-p", help="Built-in policy name or policy YAML file."),
    rules: Optional[str] = typer.Option(None, "--rules", "-r", help="Rule set of the policy (default: the policy's default)."),
    backend: str = typer.Option("detector", "--backend", "-b", help="detector (offline default), hf, openai or cascade."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="hf: hub id or local path; openai: served model name."),
    adapter: Optional[str] = typer.Option(None, help="hf: LoRA adapter path."),
    base_url: Optional[str] = typer.Option(None, help="openai: server URL (default $ICM_OPENAI_BASE_URL or $OPENAI_BASE_URL)."),
    dtype: str = typer.Option("auto", help="hf: auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="hf: auto, cpu, cuda, cuda:1, mps ..."),
    escalate_backend: str = typer.Option("hf", help="cascade: the MLLM backend images go to when the detector cannot clear them."),
    explain: bool = typer.Option(False, "--explain", help="Ask the model for an explanation (backends that generate text)."),
    batch_size: int = typer.Option(8, help="Images per batch."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="JSONL file, one record per image, written as it goes."),
    resume: bool = typer.Option(False, "--resume", help="Skip images --out already holds for the same policy, rules, backend and model."),
    max_pixels: Optional[int] = typer.Option(None, help="Refuse images above this many pixels (decompression bombs)."),
    max_frames: int = typer.Option(16, "--max-frames", help="Frames judged per animated/multi-page image or video (all up to this, evenly spaced beyond; the worst frame decides)."),
    null: bool = typer.Option(False, "--null", "-0", help="With -: paths on stdin are separated by NUL bytes (find -print0), not lines."),
    fps: float = typer.Option(1.0, "--fps", help="Video: frames sampled per second, thinned evenly to --max-frames (needs the [video] extra)."),
    json_: bool = typer.Option(False, "--json", help="Print the records as JSON lines instead of a table."),
    min_label_mass: float = typer.Option(
        DEFAULT_MIN_LABEL_MASS, "--min-label-mass",
        help="hf/openai: an answer counts only when the model puts at least this probability on the valid labels "
        "(Yes/No or the option labels); below it the question is not judged (refused or off-format) and the image is never allowed.",
    ),
    guided_choice: str = typer.Option(
        "off", "--guided-choice",
        help="openai: ask the server to constrain answers to the labels: off, structured_outputs (vLLM >= 0.10), "
        "guided_choice (older vLLM) or regex (SGLang). A server that rejects it is asked without it.",
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
    )
    if resume and not out:
        err_console.print("[red]--resume needs --out[/red]")
        raise typer.Exit(2)
    try:
        moderator = build_moderator(config)
    except (PolicyError, KeyError, ValueError, ImportError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print_error(msg)
        raise typer.Exit(2) from None

    progress = Progress(
        TextColumn("[bold]moderating[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
    )
    task = None

    def on_start(n: int) -> None:
        nonlocal task
        task = progress.add_task("moderate", total=n, rate="")

    def on_record(r: ModerationRecord) -> None:
        if json_:
            sys.stdout.write(r.model_dump_json() + "\n")
            sys.stdout.flush()
        if task is not None:
            t = progress.tasks[0]
            rate = f"{(t.completed + 1) / t.elapsed:.1f} img/s" if t.elapsed else ""
            progress.update(task, advance=1, rate=rate)

    try:
        with progress:
            summary = run_job(config, moderator=moderator, stdin=sys.stdin, on_start=on_start, on_record=on_record)
    except BackendConfigError as exc:
        print_error(f"stopped: {exc}" + (f" (the records so far are in {out}; fix this and rerun with --resume)" if out else ""))
        raise typer.Exit(2) from None
    finally:
        moderator.backend.close()
        if moderator.escalate_to is not None:
            moderator.escalate_to.close()
    if not json_:
        console.print(summary_table(summary))
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary.verdicts.items()))
        extra = f", skipped (already in {out}): {summary.skipped}" if summary.skipped else ""
        console.print(
            f"policy [bold]{moderator.policy.name}[/bold], rules [bold]{moderator.rule_set.name}[/bold], "
            f"backend [bold]{moderator.backend_name}[/bold] ({moderator.model_id}) | {counts or 'no verdicts'}, "
            f"errors: {summary.errors}{extra}" + (f" | records: {out}" if out else ""),
            highlight=False,
        )
    raise typer.Exit(0 if summary.ok else 1)
