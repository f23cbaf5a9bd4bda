"""``icm eval run``: moderate an evaluation set, answer its questions, explain, and score it all.

An evaluation set is either

* a **folder of images** whose truth comes from their names (``<category>_<number>.jpg``,
  ``sexy_*`` / ``not-sexy_*``) or from a labels file, or
* a **manifest** (JSONL, one :class:`EvalItem` per line, or a JSON list; a folder holding
  ``dataset.jsonl`` counts as one): per image its path (relative to the manifest), its
  truth (``category``, ``product`` or ``label``), optionally a reference explanation and
  moderation questions with their answers (:class:`QAItem`).

The run writes, in its output folder: ``records.jsonl`` (the moderation records, resumable
like ``icm moderate --resume``), ``qa.jsonl`` (one :class:`~icm.evaluation.mqa.QARecord` per
question), ``summary.json`` (:class:`~icm.evaluation.summary.EvalSummary`) and
``report.html``. Parts the backend cannot do (the offline detector answers no free
question and writes no explanation) are skipped with a note, never scored as zero.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from icm.evaluation.icm_metrics import Protocol, ScoreMode, evaluate_icm
from icm.evaluation.labels import LabelResolver, LabelSpec, Target, _parse_label, read_labels_file
from icm.evaluation.meq import MEQItem, aggregate, attach_worst, from_judge_results
from icm.evaluation.meq_judge import ExplanationPair, Judge, JudgeConfig
from icm.evaluation.meq_offline import OfflineMetric, correlations, score_pairs, summarize
from icm.evaluation.mqa import QAKind, QARecord, score_records
from icm.evaluation.results import ResultItem, ResultSet
from icm.evaluation.summary import EvalSummary
from icm.fileio import read_jsonl
from icm.moderation.backends.base import DEFAULT_TEXT_CONFIDENCE
from icm.moderation.spec import BackendSpec, all_flat_fields, fold_flat_settings

MANIFEST_NAMES = ("dataset.jsonl", "dataset.json", "manifest.jsonl")


class QAItem(BaseModel):
    question: str
    options: list[str] = Field(default_factory=list, description="Options of a multiple-choice question, lettered A, B, ...")
    answer: str = Field(description="The true answer: the option letter, or Yes/No")
    kind: QAKind | None = Field(default=None, description="mc or yes_no; inferred from options when absent")

    @property
    def resolved_kind(self) -> QAKind:
        return self.kind or ("mc" if self.options else "yes_no")


class EvalItem(BaseModel):
    image: str
    category: str | None = None
    product: str | None = None
    label: str | bool | int | None = None
    reference_explanation: str | None = None
    qa: list[QAItem] = Field(default_factory=list)


class EvalDataset(BaseModel):
    source: str
    root: str
    items: list[EvalItem]

    def image_path(self, item: EvalItem) -> str:
        p = Path(item.image)
        return str(p if p.is_absolute() else Path(self.root) / p)


def _read_manifest(path: Path) -> EvalDataset:
    text = path.read_text(encoding="utf-8")
    items: list[EvalItem] = []
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        for i, row in enumerate(rows, 1):
            try:
                items.append(EvalItem.model_validate(row))
            except ValueError as exc:
                raise ValueError(f"{path}: item {i}: {exc}") from None
    else:
        items.extend(read_jsonl(path, EvalItem, text=text))
    if not items:
        raise ValueError(f"{path}: the manifest lists no image")
    return EvalDataset(source=str(path), root=str(path.parent), items=items)


def _under(found: str | Path, folder: Path) -> str:
    """``found`` (a path the folder walk gave) relative to ``folder``; an absolute one stays as is."""
    return str(found) if Path(found).is_absolute() else os.path.relpath(found, folder)


def load_dataset(path: str | Path) -> EvalDataset:
    """An evaluation set from a folder of images or a manifest (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        for name in MANIFEST_NAMES:
            if (p / name).is_file():
                return _read_manifest(p / name)
        from icm.moderation.inputs import iter_image_paths

        found = [e.path for e in iter_image_paths([str(p)]) if e.path is not None]
        if not found:
            raise ValueError(f"{p}: no images in the folder")
        # the walk gives paths as the folder was named (relative to the working directory when it was):
        # items are relative to the folder, as a manifest's are to its own (image_path joins them to root)
        return EvalDataset(source=str(p), root=str(p), items=[EvalItem(image=_under(f, p)) for f in found])
    if p.is_file():
        return _read_manifest(p)
    raise ValueError(f"{p}: no such evaluation set (a folder of images or a manifest .jsonl)")


def dataset_labels(ds: EvalDataset) -> dict[str, LabelSpec]:
    out = {}
    for it in ds.items:
        spec = LabelSpec(category=it.category, product=it.product, label=None if it.label is None else _parse_label(it.label))
        if it.label is not None and spec.label is None:
            raise ValueError(f"{ds.source}: label {it.label!r} of {it.image} is not one of violate/allow, 1/0, yes/no, true/false")
        if spec.label is not None or spec.category or spec.product:
            out[ds.image_path(it)] = spec
    return out


class EvalRunConfig(BaseModel):
    dataset: str
    name: str | None = None
    out_dir: str = "eval-run"
    labels: str | None = None
    policy: str = "icm-sexy"
    rules: str | None = None
    target: Target = "rules"
    backend: BackendSpec = Field(default_factory=BackendSpec)
    """The model backend, as every entry point describes it (``icm moderate``'s backend options)."""
    threshold: float = 0.5
    confidence: float = 0.95
    bootstrap: int = 1000
    protocol: Protocol = "image"
    score: ScoreMode = "auto"
    explain: bool = True
    qa: bool = True
    max_new_tokens: int = 16
    offline_metric: OfflineMetric | Literal["none"] = "combined"
    judge: JudgeConfig | None = None
    html: bool = True

    @model_validator(mode="before")
    @classmethod
    def _nest_backend(cls, data: Any) -> Any:
        """The spec under its earlier name (``backend_spec``), or flat backend options
        (``backend="hf", model=...``), become :attr:`backend`; with a warning."""
        if not isinstance(data, dict):
            return data
        folded = fold_flat_settings(data, set(all_flat_fields()) - {"backend"}, old="backend_spec")
        if folded is None:
            return data
        warnings.warn(
            "EvalRunConfig: flat backend options and backend_spec are deprecated; give the spec as backend=BackendSpec.build(...)",
            DeprecationWarning, stacklevel=3,
        )
        return folded


# -- Q-A -------------------------------------------------------------------------------------


def answer_questions(backend: Any, ds: EvalDataset, *, max_new_tokens: int = 16, on_image: Callable[[], None] | None = None) -> list[QARecord]:
    """Ask the backend every question of the set; each answer is recorded with how it was obtained."""
    from icm.moderation.images import ImageLoadError, load_image
    from icm.policy.prompts_format import LETTERS, choice_prompt, yes_no_prompt

    out: list[QARecord] = []
    for it in ds.items:
        if not it.qa:
            continue
        path = ds.image_path(it)
        base = dict(image=path, category=it.category)
        try:
            img = load_image(path).image
        except ImageLoadError as exc:
            out += [QARecord(**base, kind=q.resolved_kind, question=q.question, options=q.options, truth=q.answer, error=str(exc)) for q in it.qa]
            continue
        prompts = [choice_prompt(q.question, q.options) if q.resolved_kind == "mc" else yes_no_prompt(q.question) for q in it.qa]
        answers: list[str | None] = [None] * len(it.qa)
        sources: list[str | None] = [None] * len(it.qa)
        errors: list[str | None] = [None] * len(it.qa)
        try:
            if backend.supports("generate"):
                texts = backend.generate([img] * len(prompts), [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=max_new_tokens)
                for i, t in enumerate(texts):
                    answers[i], sources[i] = (t.strip() if t else None), "generate"
            else:
                for i, q in enumerate(it.qa):
                    if q.resolved_kind == "mc" and backend.supports("choose"):
                        ch = backend.choose([img], q.question, q.options)[0]
                        if ch is not None and ch.probs:
                            answers[i], sources[i] = LETTERS[max(range(len(ch.probs)), key=ch.probs.__getitem__)], "choose"
                    elif q.resolved_kind == "yes_no" and backend.supports("score_yes_no"):
                        ys = backend.score_yes_no([img], [q.question])[0]
                        if ys is not None:
                            answers[i], sources[i] = ("Yes" if ys.p_yes >= 0.5 else "No"), "score_yes_no"
        except Exception as exc:  # noqa: BLE001 - one image's failure is recorded, the run goes on
            errors = [f"{type(exc).__name__}: {exc}"] * len(it.qa)
        for q, a, s, e in zip(it.qa, answers, sources, errors, strict=True):
            out.append(QARecord(**base, kind=q.resolved_kind, question=q.question, options=q.options, truth=q.answer,
                                answer=a, answer_source=s, error=e))
        if on_image:
            on_image()
    return out


# -- the run ---------------------------------------------------------------------------------


def run_evaluation(
    config: EvalRunConfig,
    *,
    moderator: Any = None,
    on_stage: Callable[[str], None] | None = None,
    on_record: Callable[[Any], None] | None = None,
) -> EvalSummary:
    """Moderate, answer, explain and score an evaluation set; write its outputs (see the module docstring)."""
    from icm.moderation.job import ModerateConfig, build_moderator, run_job
    from icm.policy import load_policy
    from icm.run.local import close_runner

    stage = on_stage or (lambda s: None)
    ds = load_dataset(config.dataset)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    want_explain = config.explain and any(it.reference_explanation for it in ds.items)
    mc = ModerateConfig(
        inputs=[ds.image_path(it) for it in ds.items], policy=config.policy, rules=config.rules, explain=want_explain,
        out=str(out_dir / "records.jsonl"), resume=True, backend=config.backend, batch_size=config.backend.batch_size,
    )
    own = moderator is None
    mod = moderator or build_moderator(mc)
    if moderator is not None and want_explain:
        mod.explain = True
    policy = mod.policy if hasattr(mod, "policy") else load_policy(config.policy)
    notes: list[str] = []
    try:
        stage(f"moderating {len(ds.items)} images")
        job = run_job(mc, moderator=mod, on_record=on_record)
        records = _run_records(out_dir / "records.jsonl", set(mc.inputs), mod)
        items = [
            ResultItem(id=r.path, p_term=r.term.p_yes if r.term else None, p_violation=r.p_violation, attributes=r.attributes,
                       policy=r.policy, rules=r.rules, product=r.product, verdict=r.verdict, reason=r.reason,
                       explanation=r.explanation, error=r.error)
            for r in records.values()
        ]
        labels = dataset_labels(ds)
        if config.labels:
            labels.update(read_labels_file(config.labels))
        resolver = LabelResolver(policy, mod.rule_set if hasattr(mod, "rule_set") else config.rules, target=config.target, labels=labels or None)
        name = config.name or f"{Path(config.dataset).name}:{mod.backend_name}"
        summary = EvalSummary(name=name, meta={
            "dataset": config.dataset, "images": len(ds.items), "policy": policy.name, "rules": resolver.rule_set.name,
            "backend": mod.backend_name, "model": mod.model_id, "out_dir": str(out_dir), "moderation_errors": job.errors,
            "seconds": round(job.seconds, 2),
        })
        text = {r.path: r.text_answers() for r in records.values() if r.ok and r.text_answers()}
        summary.meta["records_read_from_text"] = len(text)
        summary.meta["answers_read_from_text"] = sum(len(k) for k in text.values())
        if text:
            text_confidence = config.backend.flat().get("text_confidence", DEFAULT_TEXT_CONFIDENCE)
            notes.append(
                f"{len(text)} of {len(records)} records have answers read from the answer text "
                f"({summary.meta['answers_read_from_text']} answers: the server gave no usable logprobs; one sampled "
                f"answer each, counted at --text-confidence {text_confidence:g}, not a measured probability)"
            )
        stage("scoring moderation")
        rs = ResultSet(source=str(out_dir / "records.jsonl"), format="icm-jsonl", items=items)
        try:
            summary.icm = evaluate_icm(rs, resolver, threshold=config.threshold, protocol=config.protocol, score=config.score, name=name,
                                       confidence=config.confidence, bootstrap=config.bootstrap)
        except ValueError as exc:
            notes.append(f"ICM accuracy not computed: {exc}")

        n_q = sum(len(it.qa) for it in ds.items)
        if config.qa and n_q:
            stage(f"asking {n_q} moderation questions")
            qa = answer_questions(mod.backend, ds, max_new_tokens=config.max_new_tokens)
            with open(out_dir / "qa.jsonl", "w", encoding="utf-8") as fh:
                for r in qa:
                    fh.write(r.model_dump_json() + "\n")
            if all(r.answer is None for r in qa):
                why = {r.error for r in qa if r.error}
                notes.append(f"moderation Q-A not scored: backend {mod.backend_name} answered none of the {n_q} questions"
                             + (f" ({'; '.join(sorted(why))[:300]})" if why else " (it cannot read question text)"))
            else:
                summary.mqa = score_records(qa, name=name, source=str(out_dir / "qa.jsonl"), fmt="icm-jsonl").with_intervals(config.confidence)

        refs = {ds.image_path(it): it.reference_explanation for it in ds.items if it.reference_explanation}
        if refs and config.explain:
            pairs = [ExplanationPair(id=p, reference=ref, candidate=records[p].explanation)
                     for p, ref in refs.items() if p in records and records[p].explanation]
            if not pairs:
                notes.append(f"explanation quality not scored: backend {mod.backend_name} wrote no explanation for the {len(refs)} "
                             "images with a reference")
            else:
                summary.meq = _score_explanations(pairs, config, name, stage).with_intervals(config.confidence)
                if len(pairs) < len(refs):
                    summary.meq.notes.append(f"{len(refs) - len(pairs)} image(s) with a reference got no explanation")
    finally:
        if own:
            close_runner(mod)
    summary.meta["notes"] = notes
    summary.save(out_dir / "summary.json")
    if config.html:
        from icm.evaluation.report import write_html

        write_html(summary, out_dir / "report.html")
    return summary


def _run_records(path: Path, inputs: set[str], mod: Any) -> dict[str, Any]:
    """This run's records by path (a resumed run finds earlier ones in the file; the last wins)."""
    from icm.moderation.job import read_records

    recs, _ = read_records(path)
    key = (mod.policy.name, mod.rule_set.name, mod.backend_name, mod.model_id)
    return {r.path: r for r in recs if r.path in inputs and (r.policy, r.rules, r.backend, r.model) == key}


def _score_explanations(pairs: list[ExplanationPair], config: EvalRunConfig, name: str, stage: Callable[[str], None]):
    offline = None
    if config.offline_metric != "none":
        stage(f"offline explanation metric on {len(pairs)} explanations")
        offline = score_pairs(pairs, metric=config.offline_metric)
    if config.judge is not None:
        stage(f"judging {len(pairs)} explanations with {config.judge.model}")
        judge = Judge(config.judge)
        try:
            results = judge.judge(pairs)
        finally:
            judge.close()
        rep = from_judge_results(results, name=name, source="records.jsonl", judge_model=config.judge.model)
    else:
        rep = aggregate([MEQItem(id=p.id) for p in pairs], name=name, source="records.jsonl", mode="offline", judged=False)
    if offline is not None:
        for it, s in zip(rep.items, offline, strict=True):
            it.offline = s
        rep.offline = summarize(offline, config.offline_metric)  # type: ignore[arg-type]
        if config.judge is not None:
            rep.correlations = correlations(rep.items)
    attach_worst(rep, pairs)
    return rep
