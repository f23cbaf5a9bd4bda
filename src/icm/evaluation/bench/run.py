"""``icm eval bench NAME DATA``: load a benchmark, moderate it with the job of ``icm moderate``, score it.

The images go through :func:`icm.moderation.job.run_job` with ``resume`` on, writing
``OUT_DIR/records.jsonl``: a run that stops is taken up where it stopped, and images a
table holds as bytes are written once under ``OUT_DIR/images/SPLIT/``. Only the reported
split and the tuning split are moderated.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from icm import __version__
from icm.evaluation.bench import get_benchmark
from icm.evaluation.bench.records import BenchDataError, BenchIssue, BenchItem, Benchmark
from icm.evaluation.bench.scoring import OPERATING_POINTS, Judged, MetricValue, OperatingPoint, metric_values, predict
from icm.evaluation.stats import DEFAULT_BOOTSTRAP, DEFAULT_CONFIDENCE, DEFAULT_SEED
from icm.moderation.record import ModerationRecord
from icm.moderation.spec import BackendSpec

TUNE_SPLITS = ("validation", "val", "dev", "train")
Status = Literal["scored", "not_judged", "no_mapping"]


class BenchConfig(BaseModel):
    """Everything ``icm eval bench`` takes; the backend is the nested spec every entry point uses."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data: str
    out_dir: str
    split: str | None = Field(default=None, description="The split reported (default test, or the only one)")
    tune_split: str | None = Field(default=None, description="Where thresholds are chosen: a split, or 'cv' for folds")
    policy: str = "icm-standard"
    rules: str | None = None
    backend: BackendSpec = Field(default_factory=BackendSpec.build, description="The model backend and its settings")
    folds: int = 5
    min_coverage: float = 0.9
    confidence: float = DEFAULT_CONFIDENCE
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED
    limit: int | None = Field(default=None, description="At most this many images per split (a trial run)")


class CategoryResult(BaseModel):
    category: str
    mapped: dict[str, list[str]] = Field(default_factory=dict)
    status: Status
    coverage: float | None = Field(default=None, description="Share of the category's images the backend could judge")
    positives: int = 0
    negatives: int = 0
    mapped_by: list[str] = Field(default_factory=list, description="The member policies that map onto its categories")
    operating_points: list[OperatingPoint] = Field(default_factory=list)
    note: str = ""


class BenchReport(BaseModel):
    """The result of ``icm eval bench`` (its ``--json``)."""

    benchmark: str
    title: str
    source: str
    split: str
    tune_split: str = Field(description="The split thresholds were chosen on, or 'cv-K' (K folds of the reported split)")
    label_rule: str
    policy: str
    rules: str | None
    backend: str = Field(description="The backend the records name (cascade for a cascade)")
    model: str | None = Field(description="The model the records name, its preset included: 'guard (preset llavaguard)'")
    preset: str | None = Field(default=None, description="The guard model's prompt format, when one was used")
    images: dict[str, int] = Field(default_factory=dict, description="Images read per split")
    moderation_errors: int = 0
    issues: list[BenchIssue] = Field(default_factory=list)
    overall: CategoryResult
    categories: list[CategoryResult] = Field(default_factory=list)
    metrics: list[MetricValue] = Field(default_factory=list)
    records: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    icm_version: str = __version__


def load_items(name: str, data: str | Path) -> tuple[Benchmark, list[BenchItem], list[BenchIssue]]:
    """Every item and issue of benchmark ``name`` at ``data`` (BenchDataError when nothing can be read)."""
    info, loader = get_benchmark(name)
    root = Path(data)
    if not root.exists():
        raise BenchDataError(f"{root}: no such folder")
    items: list[BenchItem] = []
    issues: list[BenchIssue] = []
    for x in loader(root):
        (items if isinstance(x, BenchItem) else issues).append(x)  # type: ignore[arg-type]
    return info, items, issues


def _pick_splits(cfg: BenchConfig, splits: list[str]) -> tuple[str, str | None]:
    if cfg.split is not None:
        if cfg.split not in splits:
            raise BenchDataError(f"{cfg.data}: no split {cfg.split!r} (it has {', '.join(splits)})")
        report = cfg.split
    elif "test" in splits or len(splits) == 1:
        report = "test" if "test" in splits else splits[0]
    else:
        raise BenchDataError(f"{cfg.data}: several splits ({', '.join(splits)}) and no test split: name one with --split")
    if cfg.tune_split == "cv":
        return report, None
    if cfg.tune_split is not None:
        if cfg.tune_split == report:
            raise BenchDataError("--tune-split must differ from the reported split: thresholds are never chosen on it")
        if cfg.tune_split not in splits:
            raise BenchDataError(f"{cfg.data}: no split {cfg.tune_split!r} (it has {', '.join(splits)})")
        return report, cfg.tune_split
    return report, next((s for s in TUNE_SPLITS if s in splits and s != report), None)


def _suffix(raw: bytes) -> str:
    from PIL import Image

    try:
        fmt = (Image.open(io.BytesIO(raw)).format or "img").lower()
    except Exception:  # noqa: BLE001 - the moderation reports an unreadable image; its name only needs a suffix
        fmt = "img"
    return ".jpg" if fmt == "jpeg" else f".{fmt}"


def _materialize(items: list[BenchItem], folder: Path) -> dict[str, BenchItem]:
    """Each item by the resolved path of its image file (images held as bytes are written under ``folder``)."""
    out: dict[str, BenchItem] = {}
    for it in items:
        if it.image_bytes is not None:
            path = folder / it.split / (re.sub(r"[^A-Za-z0-9_.-]", "_", it.id) + _suffix(it.image_bytes))
            if not (path.is_file() and path.stat().st_size == len(it.image_bytes)):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(it.image_bytes)
            it.image_path, it.image_bytes = str(path), None  # on disk now: not held twice
        if it.image_path is not None:
            out.setdefault(os.path.realpath(it.image_path), it)
    return out


def moderate(cfg: BenchConfig, paths: list[str], on_record: Callable[[ModerationRecord], None]) -> tuple[str, str | None]:
    """The job of ``icm moderate`` over ``paths``, resumable, records to ``OUT_DIR/records.jsonl``; the
    backend and the model that ran (with its preset: ``guard (preset llavaguard)``, as the records name it)."""
    from icm.run.config import ModerateConfig
    from icm.run.local import build_runner, close_runner, run_job

    mc = ModerateConfig(inputs=paths, policy=cfg.policy, rules=cfg.rules, out=str(Path(cfg.out_dir) / "records.jsonl"),
                        resume=True, backend=cfg.backend, batch_size=cfg.backend.batch_size)
    runner = build_runner(mc)
    try:
        run_job(mc, moderator=runner, on_record=on_record)
        model = runner.backend.model_id  # the whole backend, not one member policy's sources (the detector)
        if runner.escalate_to is not None:
            model += f" -> {runner.escalate_to.model_id}"
        return runner.backend_name, model
    finally:
        close_runner(runner)


def policy_feeders(policy: str, rules: str | None) -> dict[tuple[str, str], set[str]]:
    """Per (scheme, category), the policies of ``policy`` (a policy or a bundle) that map products onto it."""
    from icm.moderation.bundle import parse_bundle_ref
    from icm.policy import load_policy
    from icm.policy.bundle import bundle_members

    parsed = parse_bundle_ref(policy, rules)
    pols = [p for p, _ in bundle_members(*parsed)] if parsed else [load_policy(policy)]
    out: dict[tuple[str, str], set[str]] = {}
    for p in pols:
        for scheme, cats in p.standard_categories.items():
            for cat in cats:
                out.setdefault((scheme, cat), set()).add(p.name)
    return out


def _judge(item: BenchItem, recs: list[ModerationRecord], mapped: dict[str, list[str]] | None,
           feeders: set[str]) -> Judged:
    """The image for one category's mapped taxonomy categories (``mapped``), or overall (None)."""
    ok = [r for r in recs if r.ok]
    unsafe = item.label == "unsafe"
    if mapped is None:
        return Judged(unsafe=unsafe, score=max((r.p_violation or 0.0 for r in ok), default=0.0),
                      blocked=any(r.verdict == "block" for r in ok), review=any(r.verdict == "review" for r in ok),
                      judged=any(r.basis not in (None, "none") for r in ok))
    mine = [r for r in ok if r.policy in feeders]
    scores = [r.category_scores[s][c] for r in mine for s, cats in mapped.items() for c in cats if c in r.category_scores.get(s, {})]
    return Judged(unsafe=unsafe, score=max(scores, default=0.0), blocked=any(r.verdict == "block" for r in mine),
                  review=any(r.verdict == "review" for r in mine), judged=bool(scores))


class _Scorer:
    def __init__(self, cfg: BenchConfig, info: Benchmark, report: str, tune: str | None,
                 recs: dict[str, list[ModerationRecord]], feeders: dict[tuple[str, str], set[str]]) -> None:
        self.cfg, self.info, self.report, self.tune, self.recs, self.feeders = cfg, info, report, tune, recs, feeders
        self.metrics: list[MetricValue] = []

    def _members(self, items: list[BenchItem], category: str | None) -> list[BenchItem]:
        if category is None:
            return items
        return [it for it in items if it.category == category and (it.label == "unsafe" or self.info.safe_items_have_categories)] + (
            [] if self.info.safe_items_have_categories else [it for it in items if it.label == "safe"])

    def result(self, category: str | None, report_items: list[BenchItem], tune_items: list[BenchItem]) -> CategoryResult:
        name = category or "overall"
        mapped = self.info.mapping(category) if category is not None else None
        feeders = set().union(*(self.feeders.get((s, c), set()) for s, cats in (mapped or {}).items() for c in cats))
        rep = [_judge(it, self.recs.get(it.image_path or "", []), mapped, feeders) for it in self._members(report_items, category)]
        res = CategoryResult(category=name, mapped=mapped or {}, status="scored", mapped_by=sorted(feeders),
                             positives=sum(j.unsafe for j in rep), negatives=sum(not j.unsafe for j in rep))
        if category is not None and not mapped:
            note = next((c.note for c in self.info.categories if c.native == category), "") or "not a category of the benchmark's card"
            res.status, res.note = "no_mapping", f"no taxonomy category: {note}"
            return res
        if category is not None and not feeders:
            res.status, res.note = "not_judged", f"no policy of {self.cfg.policy} maps {_names(mapped or {})}"
            res.coverage = 0.0
            return res
        res.coverage = sum(j.judged for j in rep) / len(rep) if rep else None
        if category is not None and (res.coverage or 0.0) < self.cfg.min_coverage:
            res.status = "not_judged"
            res.note = f"the backend judged {res.coverage or 0.0:.0%} of its images (scored from {self.cfg.min_coverage:.0%})"
            return res
        if category is not None:
            rep = [j for j in rep if j.judged]
        tune = None
        if self.tune is not None:
            tune = [_judge(it, self.recs.get(it.image_path or "", []), mapped, feeders) for it in self._members(tune_items, category)]
            tune = tune if category is None else [j for j in tune if j.judged]
        y = np.array([j.unsafe for j in rep], dtype=bool)
        for point in OPERATING_POINTS:
            pred, op = predict(point, rep, tune, folds=self.cfg.folds, seed=self.cfg.seed)
            res.operating_points.append(op)
            if pred is not None and y.size:
                self.metrics += metric_values(y, pred, op, benchmark=self.info.name, split=self.report, category=name,
                                              confidence=self.cfg.confidence, bootstrap=self.cfg.bootstrap, seed=self.cfg.seed)
        return res


def _names(mapped: dict[str, list[str]]) -> str:
    return ", ".join(f"{s}:{c}" for s, cats in mapped.items() for c in cats)


def run_bench(cfg: BenchConfig, *, on_stage: Callable[[str], None] | None = None) -> BenchReport:
    """Load, moderate and score benchmark ``cfg.name`` at ``cfg.data``."""
    say = on_stage or (lambda _s: None)
    info, items, issues = load_items(cfg.name, cfg.data)
    splits = sorted({it.split for it in items})
    if not items:
        raise BenchDataError(f"{cfg.data}: no usable image in it" + "".join(f"\n  {i.text()}" for i in issues))
    report, tune = _pick_splits(cfg, splits)
    counts = {s: sum(1 for it in items if it.split == s) for s in splits}
    wanted = [s for s in (report, tune) if s is not None]
    chosen = [it for s in wanted for it in [x for x in items if x.split == s][: cfg.limit]]
    items = []  # the other splits' images (bytes, for a Hugging Face copy) are not held while moderating
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_path = _materialize(chosen, out / "images")
    recs: dict[str, list[ModerationRecord]] = {p: [] for p in by_path}
    say(f"moderating {len(by_path)} images of {info.name} ({', '.join(wanted)}) with {cfg.backend.backend}")
    backend, model = moderate(cfg, list(by_path), lambda r: recs.setdefault(os.path.realpath(r.local_path()), []).append(r))
    for it in chosen:  # each item finds its records by its own resolved path
        it.image_path = os.path.realpath(it.image_path or "")
    errors = [it for it in chosen if not any(r.ok for r in recs.get(it.image_path or "", []))]
    err_ids = {id(it) for it in errors}
    usable = [it for it in chosen if id(it) not in err_ids]
    rep_items = [it for it in usable if it.split == report]
    tune_items = [it for it in usable if it.split == tune]
    scorer = _Scorer(cfg, info, report, tune, recs, policy_feeders(cfg.policy, cfg.rules))
    overall = scorer.result(None, rep_items, tune_items)
    cats = sorted({it.category for it in rep_items if it.category is not None and it.label == "unsafe"} |
                  ({it.category for it in rep_items if it.category is not None} if info.safe_items_have_categories else set()))
    categories = [scorer.result(c, rep_items, tune_items) for c in cats]
    for it in errors:
        first = next((r.error for r in recs.get(it.image_path or "", []) if r.error), "no record")
        issues.append(BenchIssue(file=it.image_path or it.source_file, where=f"item {it.id}", problem=f"moderation failed: {first}"))
    return BenchReport(
        benchmark=info.name, title=info.title, source=info.source, split=report,
        tune_split=tune or f"cv-{cfg.folds}", label_rule=info.label_rule, policy=cfg.policy, rules=cfg.rules,
        backend=backend, model=model, preset=cfg.backend.flat().get("preset"), images=counts,
        moderation_errors=len(errors), issues=issues, overall=overall, categories=categories, metrics=scorer.metrics,
        records=str(out / "records.jsonl"),
    )
