"""`icm eval ...`: ICM accuracy, moderation Q-A, explanation quality, runs, reports."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from icm.cli import backend_options as bo
from icm.cli.common import console, err_console, print_error, print_json
from icm.policy import PolicyError

if TYPE_CHECKING:
    from icm.evaluation.calibrate import CalibrationReport
    from icm.evaluation.labels import LabelResolver
    from icm.evaluation.results import ResultSet
    from icm.evaluation.video_calibrate import VideoCalibrationReport
    from icm.policy import Policy

_Report = TypeVar("_Report", "CalibrationReport", "VideoCalibrationReport")
_In = TypeVar("_In")
_Out = TypeVar("_Out")

app = typer.Typer(help="Evaluate moderation: ICM accuracy, moderation Q-A, explanation quality, reports.", no_args_is_help=True)

JsonOpt = typer.Option(False, "--json", help="Print JSON instead of tables.")
OutOpt = typer.Option(None, "--out", "-o", help="Write the JSON summary here (for `icm eval compare`).")
HtmlOpt = typer.Option(None, "--html", help="Write a self-contained HTML report here.")
NameOpt = typer.Option(None, "--name", help="Name of this run in summaries and comparisons.")
ConfidenceOpt = typer.Option(0.95, "--confidence", help="Confidence level of every interval (Wilson for proportions, bootstrap for AUC).")
BootstrapOpt = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the AUC, average precision, F1 and balanced accuracy intervals (0: none).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the bootstrap.")
LabelsOpt = typer.Option(
    None, "--labels", "-l",
    help=(
        "Truth per image: CSV/JSON/JSONL (image, path, file name or sha256 + label violate/allow, category or product), "
        "or a folder of violate/ and allow/ (or category) sub-folders. Default: categories from the file names."
    ),
)


def _fail(msg: object, code: int = 2) -> NoReturn:
    print_error(msg)
    raise typer.Exit(code)


def _or_fail(read: Callable[[_In], _Out], arg: _In) -> _Out:
    """``read(arg)``, a :class:`ValueError` (a file that is not what it should be) ending the command with its message."""
    try:
        return read(arg)
    except ValueError as exc:
        _fail(exc)


def _emit(summaries: list, *, json_: bool, out: Path | None, html: Path | None) -> None:
    from icm.evaluation.report import write_html
    from icm.evaluation.tables import summary_tables

    if out is not None:
        if len(summaries) == 1:
            summaries[0].save(out)
        else:
            for s in summaries:
                s.save(out.with_name(f"{out.stem}-{s.name}{out.suffix or '.json'}"))
    if html is not None:
        if len(summaries) == 1:
            write_html(summaries[0], html)
        else:
            for s in summaries:
                write_html(s, html.with_name(f"{html.stem}-{s.name}{html.suffix or '.html'}"))
    if json_:
        print_json(summaries[0] if len(summaries) == 1 else summaries)
        return
    for s in summaries:
        console.print(summary_tables(s))
    if out is not None:
        console.print(f"summary: {out}" if len(summaries) == 1 else f"summaries next to {out}", highlight=False)
    if html is not None:
        console.print(f"report: {html}" if len(summaries) == 1 else f"reports next to {html}", highlight=False)


def _load_policy(name: str):
    from icm.policy import load_policy

    try:
        return load_policy(name)
    except (PolicyError, KeyError, ValueError) as exc:
        _fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)


# -- icm eval icm --------------------------------------------------------------------------------


@app.command("icm")
def icm_cmd(
    results: Path = typer.Argument(..., help="Results: JSONL from `icm moderate`, or the paper's JSON (image_name, sexy_score, ...)."),
    labels: Path | None = LabelsOpt,
    policy: str = typer.Option("icm-sexy", "--policy", "-p", help="Policy that resolves categories to products."),
    rules: str | None = typer.Option(None, "--rules", "-r", help="Rule set that labels the products (default: the policy's)."),
    target: str = typer.Option("rules", help="rules: positive when the rule set says violate; term: positive when the product is the term."),
    score: str = typer.Option(
        "auto",
        help=(
            "auto: P(violation) under the rule set (re-decided from the evidence); term: P(term); recorded: P(violation) "
            "as recorded."
        ),
    ),
    threshold: float = typer.Option(0.5, "--threshold", "-t", help="Flag when score >= threshold."),
    protocol: str = typer.Option("image", help="image: each image once (default); paper: the published script's figure, double counting included."),
    sweep_step: float = typer.Option(0.05, help="Step of the threshold sweep."),
    worst: int = typer.Option(20, help="Worst errors kept for the report."),
    confidence: float = ConfidenceOpt,
    bootstrap: int = BootstrapOpt,
    seed: int = SeedOpt,
    name: str | None = NameOpt,
    out: Path | None = OutOpt,
    html: Path | None = HtmlOpt,
    json_: bool = JsonOpt,
) -> None:
    """ICM accuracy, precision, recall, F1, confusion, per category, ROC/PR with AUC and a threshold sweep.

    Failed and not-judged images are counted: coverage is the share judged, strict accuracy counts them wrong.
    Every proportion has a Wilson interval, AUC a bootstrap interval.
    """
    from icm.evaluation.icm_metrics import evaluate_icm
    from icm.evaluation.labels import LabelResolver, read_labels
    from icm.evaluation.results import read_results
    from icm.evaluation.summary import EvalSummary

    if target not in ("rules", "term"):
        _fail("--target must be rules or term")
    if score not in ("auto", "term", "recorded"):
        _fail("--score must be auto, term or recorded")
    if protocol not in ("image", "paper"):
        _fail("--protocol must be image or paper")
    pol = _load_policy(policy)
    try:
        resolver = LabelResolver(pol, rules, target=target, labels=read_labels(labels) if labels else None)  # type: ignore[arg-type]
        rs = read_results(results, term=pol.term.id)
        rep = evaluate_icm(rs, resolver, threshold=threshold, protocol=protocol, score=score, sweep_step=sweep_step,  # type: ignore[arg-type]
                           worst=worst, name=name or results.stem, confidence=confidence, bootstrap=bootstrap, seed=seed)
    except KeyError as exc:
        _fail(exc.args[0] if exc.args else exc)
    except ValueError as exc:
        _fail(exc)
    summary = EvalSummary(name=rep.name, meta={"results": str(results), "labels": str(labels) if labels else "file names",
                                                "policy": pol.name, "rules": rep.rules})
    summary.icm = rep
    _emit([summary], json_=json_, out=out, html=html)


# -- icm eval mqa -------------------------------------------------------------------------------


@app.command("mqa")
def mqa_cmd(
    sources: list[Path] = typer.Argument(None, help="The paper's MQA folder (mc_gt.txt, openqa_gt.txt, eval_mc_data/, eval_qa_data/) or JSONL Q-A records."),
    mc: tuple[Path, Path] | None = typer.Option(None, "--mc", help="Multiple-choice TRUTH and PREDICTION files in the paper's two-line format."),
    yes_no: tuple[Path, Path] | None = typer.Option(None, "--yn", help="Yes/no TRUTH and PREDICTION files in the paper's two-line format."),
    model: str | None = typer.Option(None, "--model", help="Only this model's answers in the paper's folder."),
    confidence: float = ConfidenceOpt,
    name: str | None = NameOpt,
    out: Path | None = OutOpt,
    html: Path | None = HtmlOpt,
    json_: bool = JsonOpt,
) -> None:
    """Moderation Q-A accuracy (first letter of the answer): multiple-choice, yes/no and all."""
    from icm.evaluation.mqa import evaluate_paper_folder, evaluate_records_file, evaluate_two_line
    from icm.evaluation.summary import EvalSummary

    reports = []
    try:
        if mc or yes_no:
            reports.append(evaluate_two_line(mc=mc, yes_no=yes_no, name=name))
        for src in sources or []:
            if src.is_dir():
                reports += evaluate_paper_folder(src, model)
            else:
                reports.append(evaluate_records_file(src, name))
    except ValueError as exc:
        _fail(exc)
    if not reports:
        _fail("nothing to score: give the paper's MQA folder, Q-A records (JSONL), or --mc / --yn TRUTH PREDICTION")
    if not 0.0 < confidence < 1.0:
        _fail(f"the confidence level must be between 0 and 1 (e.g. 0.95), got {confidence}")
    summaries = []
    for r in reports:
        r.with_intervals(confidence)
        s = EvalSummary(name=r.name, meta={"mqa_source": r.source})
        s.mqa = r
        summaries.append(s)
    _emit(summaries, json_=json_, out=out, html=html)


# -- icm eval meq ------------------------------------------------------------------------------


@app.command("meq")
def meq_cmd(
    judgements: Path | None = typer.Option(None, "--judgements", help="Folder of existing judgements (the paper's files): parse and average them."),
    reference: Path | None = typer.Option(None, "--reference", help="Reference explanations: two-line file (image, text) or JSONL (path/image + explanation)."),
    candidate: Path | None = typer.Option(None, "--candidate", help="The model's explanations: two-line file or `icm moderate --explain` records."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Judge with this model on an OpenAI-compatible server."),
    judge_base_url: str | None = typer.Option(
        None, "--judge-base-url",
        help="The judge's API root (default $ICM_JUDGE_BASE_URL, $OPENAI_BASE_URL or OpenAI's).",
    ),
    concurrency: int = typer.Option(8, help="Judge requests in flight at once."),
    timeout: float = typer.Option(120.0, help="Seconds per judge request."),
    retries: int = typer.Option(4, help="Retries of a failed judge request (connection errors, timeouts, 429, 5xx)."),
    cache: Path | None = typer.Option(None, help="SQLite cache of judge replies (default ~/.cache/icm/judge.sqlite)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the judge cache."),
    json_mode: bool = typer.Option(False, "--json-mode", help="Ask the judge server for a JSON object (response_format)."),
    term: str = typer.Option("sexy", help="The moderation term the explanations are about (in the judge prompt)."),
    offline: bool | None = typer.Option(
        None, "--offline/--no-offline",
        help="Compute the offline metric (default: when there is no judge, and with --judgements).",
    ),
    offline_metric: str = typer.Option("combined", help="combined (embedding + ROUGE-L), embedding or lexical (no extra package)."),
    limit: int | None = typer.Option(None, help="Only the first N explanations."),
    confidence: float = ConfidenceOpt,
    name: str | None = NameOpt,
    out: Path | None = OutOpt,
    html: Path | None = HtmlOpt,
    json_: bool = JsonOpt,
) -> None:
    """Explanation quality: parse existing judgements, ask a judge, or score offline (no network)."""
    from icm.evaluation import meq as M
    from icm.evaluation.meq_judge import DEFAULT_CACHE, Judge, JudgeConfig
    from icm.evaluation.summary import EvalSummary

    if offline_metric not in ("combined", "embedding", "lexical"):
        _fail("--offline-metric must be combined, embedding or lexical")
    if judgements is None and (reference is None or candidate is None):
        _fail("give --judgements DIR, or --reference and --candidate explanation files")
    if judgements is not None and (reference or candidate or judge_model):
        _fail("--judgements reads existing judgements: it takes no --reference, --candidate or --judge-model")
    try:
        if judgements is not None:
            js = M.read_judgements_dir(judgements)[: limit or None]
            rep = M.from_judgements(js, name=name or judgements.name, source=str(judgements))
            pairs = M.judgement_pairs(js)
            do_offline = offline is not False
        else:
            pairs, un_ref, un_cand = M.pair_explanations(M.read_explanations(reference), M.read_explanations(candidate))  # type: ignore[arg-type]
            pairs = pairs[: limit or None]
            if not pairs:
                _fail(f"no image has both a reference ({reference}) and a candidate explanation ({candidate})")
            if judge_model:
                cfg = JudgeConfig(model=judge_model, concurrency=concurrency, timeout=timeout, max_retries=retries, term=term,
                                  cache=None if no_cache else (cache or DEFAULT_CACHE), json_mode=json_mode,
                                  **({"base_url": judge_base_url} if judge_base_url else {}))
                judge = Judge(cfg)
                progress = Progress(TextColumn("[bold]judging[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    console=err_console, transient=True, disable=json_ or not sys.stderr.isatty())
                with progress:
                    task = progress.add_task("judge", total=len(pairs))
                    try:
                        results = judge.judge(pairs, on_result=lambda r: progress.advance(task))
                    finally:
                        judge.close()
                rep = M.from_judge_results(results, name=name or candidate.stem, source=str(candidate), judge_model=judge_model)  # type: ignore[union-attr]
                do_offline = bool(offline)
            else:
                rep = M.aggregate([M.MEQItem(id=p.id) for p in pairs], name=name or candidate.stem, source=str(candidate),  # type: ignore[union-attr]
                                  mode="offline", judged=False)
                do_offline = True
                if offline is False:
                    _fail("with no judge and no judgements, only the offline metric is left: drop --no-offline")
            rep.unmatched_reference, rep.unmatched_candidate = un_ref, un_cand
            if un_ref or un_cand:
                rep.notes.append(f"{un_ref} reference(s) and {un_cand} candidate(s) have no partner (paired by image file name)")
        if do_offline and pairs:
            from icm.evaluation.meq_offline import OfflineMetricUnavailable, correlations, score_pairs, summarize

            try:
                scores = score_pairs(pairs, metric=offline_metric)  # type: ignore[arg-type]
            except OfflineMetricUnavailable as exc:
                if judgements is None and not judge_model:
                    _fail(exc)
                rep.notes.append(f"offline metric skipped: {exc}")
            else:
                by_id = dict(zip((p.id for p in pairs), scores, strict=True))
                for it in rep.items:
                    it.offline = by_id.get(it.id)
                rep.offline = summarize(scores, offline_metric)  # type: ignore[arg-type]
                if rep.mode != "offline":
                    rep.correlations = correlations(rep.items)
        M.attach_worst(rep, pairs)
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"the confidence level must be between 0 and 1 (e.g. 0.95), got {confidence}")
        rep.with_intervals(confidence)
    except ValueError as exc:
        _fail(exc)
    s = EvalSummary(name=rep.name, meta={"meq_source": rep.source, **({"judge": judge_model} if judge_model else {})})
    s.meq = rep
    _emit([s], json_=json_, out=out, html=html)
    if rep.mode == "judge" and rep.n_failed == rep.n_items:
        raise typer.Exit(1)


# -- icm eval run ---------------------------------------------------------------------------------


@app.command("run")
@bo.with_backend_options
def run_cmd(
    dataset: Path = typer.Argument(..., help="Evaluation set: a folder of images (truth from names or --labels) or a manifest (JSONL)."),
    out_dir: Path = typer.Option(Path("eval-run"), "--out-dir", "-o", help="Folder for records.jsonl, qa.jsonl, summary.json, report.html."),
    labels: Path | None = typer.Option(None, "--labels", "-l", help="Labels file (image + label, category or product)."),
    policy: str = typer.Option("icm-sexy", "--policy", "-p"),
    rules: str | None = typer.Option(None, "--rules", "-r"),
    target: str = typer.Option("rules", help="rules or term (see `icm eval icm --help`)."),
    backend_options: dict[str, Any] = bo.ALL,
    threshold: float = typer.Option(0.5, "--threshold", "-t"),
    protocol: str = typer.Option("image"),
    confidence: float = ConfidenceOpt,
    bootstrap: int = BootstrapOpt,
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Ask for explanations where the set has reference explanations."),
    qa: bool = typer.Option(True, "--qa/--no-qa", help="Ask the set's moderation questions."),
    offline_metric: str = typer.Option("combined", help="Offline explanation metric: combined, embedding, lexical or none."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Also judge explanations with this model."),
    judge_base_url: str | None = typer.Option(None, "--judge-base-url"),
    name: str | None = NameOpt,
    json_: bool = JsonOpt,
) -> None:
    """Moderate an evaluation set (and answer its questions, and explain), then score it all in one go."""
    from icm.evaluation.meq_judge import JudgeConfig
    from icm.evaluation.meq_offline import OfflineMetricUnavailable
    from icm.evaluation.run import EvalRunConfig, run_evaluation
    from icm.evaluation.tables import summary_tables
    from icm.moderation.spec import BackendSpec

    if offline_metric not in ("combined", "embedding", "lexical", "none"):
        _fail("--offline-metric must be combined, embedding, lexical or none")
    try:
        spec = BackendSpec.build(**backend_options)
        cfg = EvalRunConfig(
            dataset=str(dataset), name=name, out_dir=str(out_dir), labels=str(labels) if labels else None, policy=policy, rules=rules,
            target=target, backend=spec, threshold=threshold, protocol=protocol, confidence=confidence, bootstrap=bootstrap,
            explain=explain, qa=qa, offline_metric=offline_metric,
            judge=JudgeConfig(model=judge_model, **({"base_url": judge_base_url} if judge_base_url else {})) if judge_model else None,
        )
    except ValueError as exc:
        _fail(exc)
    try:
        summary = run_evaluation(cfg, on_stage=lambda s: err_console.print(f"[dim]{s}[/dim]", highlight=False) if not json_ else None)
    except (PolicyError, KeyError, ValueError, ImportError, OfflineMetricUnavailable) as exc:
        _fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    if json_:
        print_json(summary)
    else:
        console.print(summary_tables(summary))
        for n in summary.meta.get("notes", []):
            console.print(Text(f"note: {n}", style="yellow"), highlight=False)
        console.print(f"outputs: {out_dir}/records.jsonl, summary.json" + (", report.html" if cfg.html else ""), highlight=False)
    errors = summary.meta.get("moderation_errors", 0)
    raise typer.Exit(1 if errors else 0)


# -- icm eval calibrate ----------------------------------------------------------------------------


@app.command("calibrate")
def calibrate_cmd(
    results: Path = typer.Argument(..., help="Results: the JSONL that `icm moderate --out` writes."),
    labels: Path | None = LabelsOpt,
    policy: str | None = typer.Option(None, "--policy", "-p", help="Built-in policy or policy YAML file (default: the one the records name)."),
    rules: str | None = typer.Option(None, "--rules", "-r", help="Rule set to calibrate (default: the one the records were decided under)."),
    block_precision: float | None = typer.Option(
        None, "--block-precision",
        help="Target: of the images blocked, at least this share truly violates (e.g. 0.95).",
    ),
    allow_miss: float | None = typer.Option(None, "--allow-miss", help="Target: of the true violations, at most this share is allowed (e.g. 0.01)."),
    by: str = typer.Option("point", "--by", help="point: targets on the point estimates; bound: on the whole Wilson interval (safer with little data)."),
    min_blocked: int = typer.Option(1, "--min-blocked", help="A block threshold must block at least this many images to count for the precision target."),
    confidence: float = ConfidenceOpt,
    step: float = typer.Option(0.05, "--step", help="Step of the threshold tables."),
    video: bool = typer.Option(
        False, "--video",
        help="Choose the rule set's video setting (min_run, window) from labelled video records' frame_scores instead; stills are left out.",
    ),
    recall_loss: float | None = typer.Option(
        None, "--recall-loss",
        help="--video goal (the default, 0.01): block the fewest clean videos while blocking at most this much fewer violating videos than the worst frame.",
    ),
    false_block: float | None = typer.Option(
        None, "--false-block", help="--video goal: block the most violating videos while blocking at most this share of clean videos.",
    ),
    frame_threshold: bool = typer.Option(
        False, "--frame-threshold", help="--video: also search a per-frame block threshold above the one the frames were judged at.",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Policy file to write (default: <policy>-<rules>-calibrated.yaml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the tables; write no policy file."),
    json_: bool = JsonOpt,
) -> None:
    """Choose a rule set's review/block thresholds for the targets you name, from labelled results.

    Prints the trade-off tables (blocked / reviewed / allowed fractions, block precision and allow miss rate with Wilson
    intervals) and writes the policy with the new thresholds, for `icm moderate --policy FILE`. Exit 1 when a target cannot
    be met (nothing written).
    """
    from icm.evaluation.calibrate import calibrate, write_override
    from icm.evaluation.results import read_results
    from icm.evaluation.tables import calibration_tables

    rs = _or_fail(read_results, results)
    names = {it.policy for it in rs.items if it.policy}
    if policy is None:
        if len(names) > 1:
            _fail(f"{results}: records of several policies ({', '.join(sorted(names))}): pass --policy")
        policy = next(iter(names), "icm-sexy")
    pol = _load_policy(policy)
    if rules is None:
        used = {it.rules for it in rs.items if it.rules and not it.error}
        if len(used) > 1:
            _fail(f"{results}: records decided under several rule sets ({', '.join(sorted(used))}): pass --rules")
        rules = next(iter(used), None)
    if video:
        if block_precision is not None or allow_miss is not None:
            _fail("--video chooses the video setting only: calibrate the thresholds (--block-precision, --allow-miss) in another run")
        if by != "point":
            _fail("--video chooses on point estimates only (--by bound is for --block-precision and --allow-miss)")
        _calibrate_video(rs, pol, policy, rules, labels, recall_loss, false_block, frame_threshold, confidence, out, dry_run, json_)
        return
    if recall_loss is not None or false_block is not None or frame_threshold:
        _fail("--recall-loss, --false-block and --frame-threshold are goals of --video")
    def run(resolver: LabelResolver, labels_source: str) -> CalibrationReport:
        return calibrate(rs, resolver, block_precision=block_precision, allow_miss=allow_miss, by=by,  # type: ignore[arg-type]
                         min_blocked=min_blocked, confidence=confidence, step=step, labels_source=labels_source)

    def show(report: CalibrationReport, written: Path | None) -> None:
        console.print(calibration_tables(report))
        if written:
            console.print(f"policy with the new thresholds: {written}  (icm moderate IMAGES --policy {written} --rules {report.rules})", highlight=False)
        elif not report.ok:
            err_console.print("a target cannot be met on this data: no policy file written", highlight=False)

    _calibrate_and_write(pol, rules, labels, out, dry_run, json_, run, lambda r, t: write_override(r, policy, t), show)


def _calibrate_video(rs: ResultSet, pol: Policy, policy: str, rules: str | None, labels: Path | None, recall_loss: float | None,
                     false_block: float | None, frame_threshold: bool, confidence: float, out: Path | None, dry_run: bool,
                     json_: bool) -> None:
    from icm.evaluation.video_calibrate import calibrate_video, video_table, write_video_override

    def run(resolver: LabelResolver, labels_source: str) -> VideoCalibrationReport:
        return calibrate_video(rs, resolver, recall_loss=recall_loss, false_block=false_block, frame_threshold=frame_threshold,
                               confidence=confidence, labels_source=labels_source)

    def show(report: VideoCalibrationReport, written: Path | None) -> None:
        console.print(video_table(report))
        for n in report.notes:
            console.print(Text(f"note: {n}", style="yellow"), highlight=False)
        console.print(report.message, highlight=False)
        if written:
            console.print(f"policy with the new video setting: {written}  (icm moderate VIDEOS --policy {written} --rules {report.rules})",
                          highlight=False)
        elif not report.ok:
            err_console.print("the video goal cannot be met on this data: no policy file written", highlight=False)

    _calibrate_and_write(pol, rules, labels, out, dry_run, json_, run, lambda r, t: write_video_override(r, policy, t), show)


def _calibrate_and_write(pol: Policy, rules: str | None, labels: Path | None, out: Path | None, dry_run: bool, json_: bool,
                         run: Callable[[LabelResolver, str], _Report], write: Callable[[_Report, Path], Path],
                         show: Callable[[_Report, Path | None], None]) -> None:
    """What ``eval calibrate`` and ``eval calibrate --video`` share: label, calibrate (``run``), write the policy when the
    goal is met (unless ``dry_run``), print the report (JSON or ``show``); exit 1 when the goal is not met."""
    from icm.evaluation.calibrate import CalibrationError
    from icm.evaluation.labels import LabelResolver, read_labels

    try:
        resolver = LabelResolver(pol, rules, labels=read_labels(labels) if labels else None)
        report = run(resolver, str(labels) if labels else "file names")
    except KeyError as exc:
        _fail(exc.args[0] if exc.args else exc)
    except (CalibrationError, ValueError) as exc:
        _fail(exc)
    written: Path | None = None
    if report.ok and not dry_run:
        try:
            written = write(report, out or Path(f"{pol.name}-{report.rules}-calibrated.yaml"))
        except (CalibrationError, PolicyError, OSError) as exc:
            _fail(exc)
    if json_:
        data = report.model_dump(mode="json")
        data["written"] = str(written) if written else None
        print_json(data)
    else:
        show(report, written)
    if not report.ok:
        raise typer.Exit(1)


# -- compare and report ---------------------------------------------------------------------------


@app.command("compare")
def compare_cmd(
    summaries: list[Path] = typer.Argument(
        ..., help="JSON summaries written with --out (or summary.json of `icm eval run`); with --published also `icm eval bench --json` output."),
    published: str | None = typer.Option(
        None, "--published",
        help="Put each run beside peers' published figures from this YAML/JSON file ('builtin': the figures icm ships)."),
    benchmark: str | None = typer.Option(None, "--benchmark", help="--published: the benchmark the runs are on, where a file does not say."),
    split: str | None = typer.Option(None, "--split", help="--published: the split the runs are on, where a file does not say."),
    operating_point: str | None = typer.Option(
        None, "--operating-point", help="--published: which of a bench run's operating points to compare (default: its first)."),
    html: Path | None = HtmlOpt,
    json_: bool = JsonOpt,
) -> None:
    """Runs side by side: every metric any of them has, the best of each in bold.

    With --published, each run is put beside peers' published figures; a figure is comparable when
    benchmark, split, metric and category agree, and every other is listed with the reason it is not.
    """
    from icm.evaluation.compare import CompareReport, compare_files
    from icm.evaluation.report import write_html
    from icm.evaluation.summary import EvalSummary
    from icm.evaluation.tables import compare_table

    if published is None and (benchmark or split or operating_point):
        _fail("--benchmark, --split and --operating-point go with --published")
    c: CompareReport | None = None
    peers = None
    try:
        if published is not None:
            from icm.evaluation.peers import compare_files as compare_published_files
            from icm.evaluation.peers import is_summary_file

            peers = compare_published_files(summaries, published, benchmark=benchmark, split=split, operating_point=operating_point)
            if len(summaries) > 1 and all(is_summary_file(p) for p in summaries):
                c = compare_files(summaries)
        else:
            c = compare_files(summaries)
    except ValueError as exc:
        _fail(exc)
    if html is not None:
        name = " vs ".join(c.runs) if c is not None else " vs ".join(p.run for p in peers or [])
        write_html(EvalSummary(name=name), html, compare=c, peers=peers)
    if json_:
        print_json(c if peers is None else {"runs": c, "published": peers})
        return
    if c is not None:
        console.print(compare_table(c))
    if peers is not None:
        from icm.evaluation.peers import peers_tables

        console.print(peers_tables(peers))
    if html is not None:
        console.print(f"report: {html}", highlight=False)


@app.command("report")
def report_cmd(
    summary: Path = typer.Argument(..., help="A JSON summary written with --out."),
    html: Path = typer.Option(..., "--html", help="Where to write the HTML report."),
    json_: bool = JsonOpt,
) -> None:
    """Render the HTML report of a saved summary."""
    from icm.evaluation.report import write_html
    from icm.evaluation.summary import load_summary

    write_html(_or_fail(load_summary, summary), html)
    if json_:
        print_json({"summary": str(summary), "html": str(html)})
    else:
        console.print(f"report: {html}", highlight=False)


from icm.cli.eval_bench import bench_cmd  # noqa: E402 - `icm eval bench` lives in its own module (issue 24)

app.command("bench")(bench_cmd)
