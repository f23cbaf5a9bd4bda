"""`icm data ...`: generate, import, export and mix ICM-Instruct data; thin over icm.data."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TypeVar

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from icm.cli.common import console, err_console, print_json
from icm.cli.serve import export_reviews as _export_reviews
from icm.policy import PolicyError

app = typer.Typer(help="ICM-Instruct data: generate with your models, import the released data, export for trainers.",
                  no_args_is_help=True)

JsonOpt = typer.Option(False, "--json", help="Print JSON instead of tables.")


def _fail(msg: object, code: int = 2) -> typer.Exit:
    err_console.print(f"[red]{escape(str(msg))}[/red]", highlight=False, soft_wrap=True)
    return typer.Exit(code)


_Choice = TypeVar("_Choice", bound=str)


def _one_of(value: str, allowed: tuple[_Choice, ...], what: str) -> _Choice:
    """``value`` as the allowed choice it names (typed as the choices' Literal), else a usage error."""
    for choice in allowed:
        if value == choice:
            return choice
    raise _fail(f"unknown {what} {value!r} (choose from {', '.join(allowed)})")


def _split_list(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


# --------------------------------------------------------------------------- generate


@app.command()
def generate(
    inputs: list[str] = typer.Argument(None, help="CSV (image,product) or JSONL files, or folders with one sub-folder per product."),
    out: str = typer.Option("icm-instruct", "--out", "-o", help="Output folder: records.jsonl, rejected.jsonl, summary.json, cache.sqlite."),
    policy: str = typer.Option("icm-sexy", "--policy", "-p", help="Built-in policy name or policy YAML file."),
    mllm_model: str | None = typer.Option(None, help="The MLLM's served model name (image stages)."),
    mllm_base_url: str | None = typer.Option(None, help="The MLLM server, e.g. http://127.0.0.1:8000/v1 (default $ICM_OPENAI_BASE_URL or $OPENAI_BASE_URL)."),
    mllm_api_key: str | None = typer.Option(
        None, envvar="ICM_MLLM_API_KEY", show_default=False,
        help="Default $ICM_MLLM_API_KEY, $ICM_OPENAI_API_KEY or $OPENAI_API_KEY.",
    ),
    llm_model: str | None = typer.Option(None, help="The text LLM for Q-A generation (default: the MLLM)."),
    llm_base_url: str | None = typer.Option(None, help="The LLM server (default: the MLLM's)."),
    llm_api_key: str | None = typer.Option(None, envvar="ICM_LLM_API_KEY", show_default=False, help="Default $ICM_LLM_API_KEY, else the MLLM's key."),
    mode: str = typer.Option("combined", help="combined: one multi-question call per image (as the paper); separate: one call per stage."),
    qa: bool = typer.Option(True, "--qa/--no-qa", help="Generate Q-A pairs from the explanation."),
    n_yes_no: int = typer.Option(4, "--yes-no", help="Yes/no questions per image."),
    n_choice: int = typer.Option(5, "--choice", help="4-choice questions per image."),
    n_what: int = typer.Option(3, "--what", help="'What' questions per image."),
    n_how: int = typer.Option(3, "--how", help="'How' questions per image."),
    concurrency: int = typer.Option(8, help="Images (and requests) in flight at once."),
    timeout: float = typer.Option(120.0, help="Seconds per HTTP request."),
    max_retries: int = typer.Option(3, "--retries", help="Retries of 408/429/5xx, timeouts and connection errors."),
    backoff: float = typer.Option(0.5, help="Base of the exponential retry backoff, seconds."),
    max_tokens: int = typer.Option(1024, help="Token limit of the MLLM's replies."),
    qa_max_tokens: int = typer.Option(1024, help="Token limit of the LLM's Q-A tables."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    seed: int | None = typer.Option(None, help="Sampling seed sent to the servers (part of the cache key)."),
    max_image_side: int = typer.Option(1024, help="Downscale images so the longer side is at most this (0: never)."),
    cache: str | None = typer.Option(None, help="SQLite response cache (default OUT/cache.sqlite)."),
    filters: list[str] | None = typer.Option(
        None, "--filters",
        help=(
            "Quality filters, comma-separated (default: all): empty, refusal, first_person, no_verdict, contradiction, "
            "mixed_verdict, truncated, too_short. 'none' disables."
        ),
    ),
    min_qa: int = typer.Option(1, help="Fewest usable Q-A pairs for an image to be kept."),
    limit: int | None = typer.Option(None, help="Only the first N images."),
    retry_rejected: bool = typer.Option(False, "--retry-rejected", help="Try images rejected by an earlier run again (with a new --seed or --temperature)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the prompts and the plan; send nothing."),
    json_: bool = JsonOpt,
) -> None:
    """Generate ICM-Instruct data (descriptions, explanations, Q-A pairs) for your images.

    Resumable: run the same command again after an interruption; finished images are
    skipped and every model response already received is read from the cache.
    """
    from icm.data.generate import GenerateConfig, ItemOutcome
    from icm.data.generate import generate as run_generate
    from icm.data.generate_config import MODES
    from icm.data.quality import DEFAULT_FILTERS

    if not inputs:
        raise _fail("no input: give CSV/JSONL files (image,product) or folders with one sub-folder per product")
    chosen = _split_list(filters)
    if chosen == ["none"]:
        chosen = []
    elif not filters:
        chosen = list(DEFAULT_FILTERS)
    config = GenerateConfig(
        inputs=list(inputs), out=out, policy=policy, mllm_model=mllm_model, mllm_base_url=mllm_base_url,
        mllm_api_key=mllm_api_key, llm_model=llm_model, llm_base_url=llm_base_url, llm_api_key=llm_api_key,
        mode=_one_of(mode, MODES, "mode"), qa=qa, n_yes_no=n_yes_no, n_choice=n_choice, n_what=n_what, n_how=n_how,
        concurrency=concurrency, timeout=timeout, max_retries=max_retries, backoff=backoff, max_tokens=max_tokens,
        qa_max_tokens=qa_max_tokens, temperature=temperature, seed=seed, max_image_side=max_image_side or None,
        cache=cache, filters=chosen, min_qa=min_qa, limit=limit, retry_rejected=retry_rejected, dry_run=dry_run,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise _fail(exc) from None
    if dry_run:
        _dry_run(config, json_)
        return

    progress = Progress(
        TextColumn("[bold]generating[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=False,
        disable=json_ and not err_console.is_terminal,
    )
    counts = {"written": 0, "rejected": 0, "failed": 0, "skipped": 0}
    task = None

    def on_start(n: int) -> None:
        nonlocal task
        task = progress.add_task("generate", total=n, info="")

    def on_item(o: ItemOutcome) -> None:
        key = o.status if o.status in counts else ("skipped" if o.status == "duplicate" else "failed")
        counts[key] += 1
        if task is None:
            return
        t = progress.tasks[0]
        fresh = counts["written"] + counts["rejected"] + counts["failed"]
        rate = f"{fresh / t.elapsed:.2f} img/s" if t.elapsed and fresh else ""
        info = f"ok {counts['written']} rejected {counts['rejected']} failed {counts['failed']} skipped {counts['skipped']} {rate}"
        progress.update(task, advance=1, info=info)

    quiet = logging.getLogger("icm.moderation.backends.openai_compat")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # failures are counted and listed in the summary instead
    try:
        with progress:
            summary = run_generate(config, on_start=on_start, on_item=on_item)
    except (PolicyError, KeyError, ValueError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise _fail(msg) from None
    except KeyboardInterrupt:
        done = counts["written"] + counts["rejected"]
        raise _fail(f"interrupted after {done} images this run; run the same command again to resume "
                    "(finished images are kept, received responses are cached)", 130) from None
    finally:
        quiet.setLevel(level)
    if json_:
        data = summary.model_dump(mode="json")
        data["total_tokens"] = summary.total_tokens
        print_json(data)
    else:
        _print_generate_summary(summary)
    raise typer.Exit(0 if summary.ok else 1)


def _dry_run(config, json_: bool) -> None:
    from icm.data.generate import plan_prompts

    try:
        plan = plan_prompts(config)
    except (PolicyError, KeyError, ValueError) as exc:
        raise _fail(exc) from None
    if json_:
        print_json(plan)
        return
    for s in plan.stages:
        console.rule(f"product {s.product} ({plan.products[s.product]} images)")
        stages = ("combined",) if plan.mode == "combined" else ("explicit", "implicit", "explanation")
        for stage in stages:
            console.print(f"[bold]{stage}[/bold] (MLLM, with the image)\n{getattr(s, stage)}\n", highlight=False, soft_wrap=True)
    if plan.qa_prompt:
        console.rule("Q-A generation (text LLM, once per image)")
        console.print(plan.qa_prompt, highlight=False, soft_wrap=True)
    for e in plan.input_errors:
        err_console.print(f"[yellow]{escape(e['origin'])}: {escape(e['error'])}[/yellow]", highlight=False, soft_wrap=True)
    console.print(
        f"dry run: {plan.inputs} images, {len(plan.products)} products, {plan.requests_per_image} requests per image "
        f"(at most {plan.inputs * plan.requests_per_image}, fewer with the cache); nothing was sent.",
        highlight=False, soft_wrap=True,
    )
    if plan.input_errors:
        raise typer.Exit(1)


def _print_generate_summary(s) -> None:
    t = Table(title=f"icm data generate -> {escape(s.out)}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    rows = [
        ("images", s.inputs), ("written", s.written), ("rejected (quarantined)", s.rejected),
        ("Q-A rows rejected", s.rejected_rows), ("already done (skipped)", s.skipped), ("duplicates", s.duplicates),
        ("failed (retried next run)", s.failed), ("input errors", len(s.input_errors)),
        ("requests (with retries)", s.requests), ("retries", s.retries), ("cache hits", s.cache_hits),
        ("prompt tokens", s.prompt_tokens), ("completion tokens", s.completion_tokens), ("total tokens", s.total_tokens),
        ("seconds", f"{s.seconds:.1f}"), ("records in records.jsonl", s.records_total),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)
    if s.rejected_by_reason:
        console.print("rejected by reason: " + ", ".join(f"{k} {v}" for k, v in s.rejected_by_reason.items()), highlight=False, soft_wrap=True)
    for f in s.failures[:20]:
        err_console.print(f"[red]failed[/red] {escape(f.image)} ({f.stage}): {escape(f.error)}", highlight=False, soft_wrap=True)
    if len(s.failures) > 20:
        err_console.print(f"... and {len(s.failures) - 20} more (see {s.out}/summary.json)")
    for e in s.input_errors[:20]:
        err_console.print(f"[yellow]input[/yellow] {escape(e['origin'])}: {escape(e['error'])}", highlight=False, soft_wrap=True)
    if s.repaired_bytes:
        err_console.print(f"resumed: cut a half-written last line ({s.repaired_bytes} bytes) left by an interrupted run")


# --------------------------------------------------------------------------- import-icm


def _say(text: str) -> None:
    console.print(escape(text), highlight=False, soft_wrap=True)


def _pct(n: int, d: int) -> str:
    return f"{n} / {d} ({100.0 * n / d:.2f}%)" if d else f"{n} / 0 (-)"


@app.command("import-icm")
def import_icm_cmd(
    folder: Path = typer.Argument(..., help="The released ICM-Instruct folder (mc/, qa/, reason/N/)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write records.jsonl, rejected.jsonl (every failure with its reason) and report.json here."),
    policy: str = typer.Option("icm-sexy", "--policy", "-p", help="The policy whose products the categories resolve to."),
    filters: list[str] | None = typer.Option(
        None, "--filter",
        help="Quarantine images whose explanation fails these quality filters (comma-separated), instead of only flagging them.",
    ),
    json_: bool = JsonOpt,
) -> None:
    """Read the released ICM-Instruct text into records; print how much of it parsed."""
    from icm.data.import_icm import import_icm
    from icm.data.quality import ALL_FILTERS

    chosen = _split_list(filters)
    unknown = sorted(set(chosen) - set(ALL_FILTERS))
    if unknown:
        raise _fail(f"unknown filters {unknown} (known: {', '.join(ALL_FILTERS)})")
    try:
        res = import_icm(folder, policy=policy, filters=chosen)
    except (FileNotFoundError, PolicyError) as exc:
        raise _fail(exc) from None
    st = res.stats
    report = {
        **st.model_dump(mode="json"),
        "qa_rows": st.qa_rows, "qa_rows_parsed": st.qa_rows_parsed, "qa_share": st.qa_share,
        "explanation_share": st.explanation_share, "failures": len(res.rejected),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "records.jsonl", "w", encoding="utf-8") as fh:
            for r in res.records:
                fh.write(r.model_dump_json() + "\n")
        with open(out / "rejected.jsonl", "w", encoding="utf-8") as fh:
            for rej in res.rejected:
                fh.write(rej.model_dump_json() + "\n")
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if json_:
        print_json(report)
        return
    _say(f"{folder}: {st.images} images, {st.records} records")
    _say(f"Q-A rows parsed:      {_pct(st.qa_rows_parsed, st.qa_rows)}")
    for k in st.rows:
        _say(f"  {k + '/':<19} {_pct(st.rows_parsed[k], st.rows[k])}")
    _say(f"explanations parsed:  {_pct(st.explanations_parsed, st.explanations)}"
                  + (f"; {st.empty_explanations} empty file(s)" if st.empty_explanations else ""))
    said = st.verdicts.get("agree", 0) + st.verdicts.get("contradict", 0)
    n_first = sum(st.verdicts.values())
    _say(f"  verdict stated:     {_pct(said, n_first)}, agreeing with the category: {_pct(st.verdicts.get('agree', 0), said)}")
    header_only = sum(st.header_only_tables.values())
    if header_only:
        _say(f"tables with a header and no rows: {header_only} ("
                      + ", ".join(f"{k} {v}" for k, v in st.header_only_tables.items() if v) + ")")
    if st.flags:
        _say("explanation quality flags: " + ", ".join(f"{k} {v}" for k, v in st.flags.items()))
    if st.quarantined:
        _say(f"quarantined by --filter: {st.quarantined} images")
    _say(f"failures: {len(res.rejected)} (" + ", ".join(f"{k} {v}" for k, v in st.failures_by_reason.items()) + ")")
    if out is not None:
        _say(f"wrote {out / 'records.jsonl'}, {out / 'rejected.jsonl'} (every failure with its reason), {out / 'report.json'}")
    else:
        for rej in res.rejected[:10]:
            _say(f"  {rej.reason}: {rej.detail}")
        if len(res.rejected) > 10:
            _say(f"  ... {len(res.rejected) - 10} more; --out OUT writes them all with their reasons")


# --------------------------------------------------------------------------- export


@app.command()
def export(
    records: list[Path] = typer.Argument(..., help="records.jsonl files (or folders holding one), from generate or import-icm."),
    fmt: str = typer.Option(..., "--format", "-f", help="llava, sharegpt (LLaMA-Factory, with dataset_info.json), qwen-vl, hf (save_to_disk) or parquet."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    val_ratio: float = typer.Option(0.05, help="Share of images in the validation split (by image, deterministic)."),
    seed: int = typer.Option(0, help="Seed of the split and of the instruction wording."),
    image_root: str | None = typer.Option(None, help="Write image paths relative to this folder (LLaVA's --image_folder)."),
    conversation: str = typer.Option("multi", help="multi: one conversation per image; single: one sample per question."),
    tasks: list[str] | None = typer.Option(None, "--tasks", help="Turns to include, comma-separated (default: term, explain, explicit, implicit, qa)."),
    instructions: Path | None = typer.Option(None, help="YAML/JSON file of extra instruction paraphrases per pool (and per term)."),
    keep_flagged: bool = typer.Option(False, "--keep-flagged", help="Also export explanations with quality flags (refusal, contradiction, cut off ...)."),
    embed_images: bool = typer.Option(False, "--embed-images", help="hf/parquet: store the image bytes (datasets.Image) instead of paths."),
    json_: bool = JsonOpt,
) -> None:
    """Export records for a trainer: LLaVA, ShareGPT + dataset_info.json, Qwen-VL, HF datasets, parquet."""
    from icm.data.export import CONVERSATIONS, DEFAULT_EXCLUDE_FLAGS, EXPORT_FORMATS, TASKS, export_records
    from icm.data.instructions import InstructionPools
    from icm.data.outputs import read_records

    format_ = _one_of(fmt, EXPORT_FORMATS, "format")
    conversation_ = _one_of(conversation, CONVERSATIONS, "conversation")
    chosen_tasks = _split_list(tasks) or list(TASKS)
    bad = sorted(set(chosen_tasks) - set(TASKS))
    if bad:
        raise _fail(f"unknown tasks {bad} (known: {', '.join(TASKS)})")
    try:
        recs = [r for path in records for r in read_records(path)]
        pools = InstructionPools.from_file(instructions, seed=seed) if instructions else InstructionPools(seed=seed)
        res = export_records(
            recs, format_, out, pools=pools, tasks=chosen_tasks, conversation=conversation_,
            val_ratio=val_ratio, seed=seed, image_root=image_root,
            exclude_flags=() if keep_flagged else DEFAULT_EXCLUDE_FLAGS, embed_images=embed_images,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise _fail(exc) from None
    if json_:
        print_json(res.as_dict())
        return
    t = Table(title=f"{res.records} records -> {res.format} in {res.out}")
    for col in ("split", "samples", "images"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for split, n in res.samples.items():
        t.add_row(split, str(n), str(res.images.get(split, 0)))
    console.print(t)
    console.print(f"{res.turns} question-answer turns; files: " + ", ".join(res.files), highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- synth


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output folder: train/images + train/inputs.csv, test/images + test/labels.csv."),
    policy: str = typer.Option("synth-shapes", "--policy", "-p", help="synth-shapes, or a policy file with its attributes (other rule sets)."),
    train: int = typer.Option(540, help="Training images (every product equally often)."),
    test: int = typer.Option(270, help="Held-out test images."),
    general: int = typer.Option(0, help="Also write OUT/general.json: N text-only general instructions (for MSFT mixing)."),
    size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Seed of the drawings."),
    generate: bool = typer.Option(
        False, "--generate",
        help="Then run the `icm data generate` pipeline on the train images against the scripted teacher (into OUT/instruct).",
    ),
    serve: bool = typer.Option(
        False, "--serve",
        help="Draw nothing: serve the scripted teacher (OpenAI chat API on 127.0.0.1) until Ctrl-C or --idle-timeout.",
    ),
    port: int = typer.Option(0, help="--serve: port (0: any free one)."),
    idle_timeout: float | None = typer.Option(None, help="--serve: stop after this many seconds without a request."),
    json_: bool = JsonOpt,
) -> None:
    """A synthetic moderation task for a CPU: drawn figures whose attributes are visible, and a scripted teacher.

    Region and exposure are the place and colour of a marked part of the figure, the
    action a glyph beside it (policy synth-shapes). The teacher reads them from the pixels
    and answers `icm data generate`'s prompts over the OpenAI protocol.
    """
    from icm.demo.synth import make_synth_dataset
    from icm.demo.teacher import TeacherServer

    if serve:
        try:
            teacher = TeacherServer(policy, port=port)
        except (PolicyError, ValueError, OSError) as exc:
            raise _fail(exc) from None
        console.print(f"scripted teacher on {teacher.base_url} (model {teacher.model}); Ctrl-C stops it", highlight=False)
        try:
            teacher.serve_until_idle(idle_timeout)
        except KeyboardInterrupt:
            pass
        console.print(f"served {teacher.requests} requests", highlight=False)
        return
    try:
        res = make_synth_dataset(out, policy=policy, n_train=train, n_test=test, size=size, seed=seed, n_general=general)
    except (PolicyError, ValueError, OSError) as exc:
        raise _fail(exc) from None
    report: dict = res.as_dict()
    code = 0
    if generate:
        from icm.data.generate import GenerateConfig
        from icm.data.generate import generate as run_generate

        with TeacherServer(policy) as teacher:
            cfg = GenerateConfig(inputs=[res.train_csv], out=str(Path(out) / "instruct"), policy=policy,
                                 mllm_model=teacher.model, mllm_base_url=teacher.base_url)
            summary = run_generate(cfg)
        report["generate"] = {k: getattr(summary, k) for k in ("written", "rejected", "failed", "requests", "seconds", "out")}
        code = 0 if summary.ok else 1
    if json_:
        print_json(report)
    else:
        _say(f"{res.out}: {res.train} train images ({res.train_csv}), {res.test} test images ({res.test_labels}), "
             f"{len(res.products)} products of {res.policy}, {res.seconds:.1f}s"
             + (f"; {res.n_general} general instructions in {res.general}" if res.general else ""))
        if generate:
            g = report["generate"]
            _say(f"icm data generate against the scripted teacher: {g['written']} records, {g['rejected']} rejected, "
                 f"{g['failed']} failed, {g['requests']} requests, {g['seconds']:.1f}s -> {g['out']}")
    raise typer.Exit(code)


# --------------------------------------------------------------------------- mix


@app.command()
def mix(
    ours: Path = typer.Argument(..., help="Our exported samples (a llava or sharegpt JSON/JSONL file)."),
    general: Path = typer.Argument(..., help="A general instruction dataset (LLaVA conversations or messages layout)."),
    out: Path = typer.Option(..., "--out", "-o", help="The mixed file (.json list, or .jsonl)."),
    ratio: str = typer.Option("1:1", help="OURS:GENERAL (1:3 = three general samples per one of ours), or the share of ours (0.25)."),
    seed: int = typer.Option(0, help="Seed of the sampling and the shuffle."),
    json_: bool = JsonOpt,
) -> None:
    """Mix ours with general instruction data at a ratio, for mixed SFT (the paper's MSFT)."""
    from icm.data.mix import mix_datasets

    try:
        res = mix_datasets(ours, general, out, ratio=ratio, seed=seed)
    except (OSError, ValueError) as exc:
        raise _fail(exc) from None
    if json_:
        print_json(res.as_dict())
        return
    console.print(
        f"{res.out}: {res.total} samples = {res.ours} ours + {res.general} general "
        f"({res.general_per_ours:.2f} general per ours; asked {res.asked_general_per_ours:.2f}), layout {res.layout}",
        highlight=False,
    )
    if res.general < round(res.ours * res.asked_general_per_ours):
        err_console.print(f"[yellow]the general dataset has only {res.general_available} samples: all of them were used[/yellow]")


# Reviewers' decisions from `icm serve` become training records for continued tuning (CSFT).
app.command("export-reviews")(_export_reviews)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
