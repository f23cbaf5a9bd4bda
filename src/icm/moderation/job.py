"""The batch job behind ``icm moderate``: inputs in, a JSONL file of records out.

Records are appended and flushed one by one, so a killed run loses nothing already done,
and ``resume=True`` skips images the output already holds for the same policy, rule set,
backend and model (failed ones, e.g. a request that got HTTP 503 after its retries, are
tried again). A :class:`~icm.moderation.backends.base.BackendConfigError` (a rejected
API key, an unknown model) propagates out of :func:`run_job`: the records written so far
stay, and no error record is written for the image it stopped on.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from icm.fileio import atomic_write, read_jsonl
from icm.moderation.backends.base import DEFAULT_MIN_LABEL_MASS, DEFAULT_TEXT_CONFIDENCE, Backend
from icm.moderation.bundle import BundleModerator, parse_bundle_ref
from icm.moderation.engine import Moderator
from icm.moderation.images import ImageLoadError, open_regular_file
from icm.moderation.inputs import iter_image_paths
from icm.moderation.record import ModerationRecord
from icm.moderation.spec import BACKEND_NAMES, BackendSpec, create_backends
from icm.policy.bundle import bundle_members


@dataclass
class ModerateConfig:
    """Everything ``icm moderate`` takes; the CLI maps one option to each field."""

    inputs: list[str] = field(default_factory=list)
    policy: str = "icm-sexy"
    rules: str | None = None
    backend: str = "detector"
    model: str | None = None
    adapter: str | None = None
    base_url: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    escalate_backend: str = "hf"
    explain: bool = False
    batch_size: int = 8
    out: str | None = None
    resume: bool = False
    max_pixels: int | None = None
    min_label_mass: float = DEFAULT_MIN_LABEL_MASS
    """hf/openai: the least probability the valid labels must hold for an answer to count."""
    text_confidence: float = DEFAULT_TEXT_CONFIDENCE
    """openai: the probability an answer read from text gives the label it names (never 0 or 1)."""
    guided_choice: str = "off"
    """openai: constrain answers to the labels (off, structured_outputs, guided_choice, regex)."""
    max_frames: int = 16
    """Frames judged per multi-frame image or video (evenly spaced beyond that, first and last included)."""
    fps: float = 1.0
    """Video: frames sampled per second (thinned evenly to ``max_frames``)."""
    null: bool = False
    """``-`` reads NUL-separated paths (``find -print0``) instead of one per line."""
    api_key_env: str | None = None
    """openai: the environment variable holding the API key (default $ICM_OPENAI_API_KEY / $OPENAI_API_KEY)."""
    timeout: float = 60.0
    """openai: seconds per HTTP request."""
    max_retries: int = 3
    """openai: extra attempts of a transient failure."""

    def backend_spec(self) -> BackendSpec:
        """The backend fields of this config as the :class:`BackendSpec` every entry point shares."""
        return BackendSpec.build(**{name: getattr(self, name) for name in BackendSpec.model_fields})


def build_moderator(c: ModerateConfig) -> Moderator:
    """The engine for a config. Raises ValueError/KeyError/PolicyError on bad settings."""
    from icm.policy import load_policy

    policy = load_policy(c.policy)
    policy.rule_set(c.rules)  # fail early on an unknown rule set, before loading a model
    first, escalate = _backends(c)
    return Moderator(first, policy=policy, rules=c.rules, explain=c.explain, escalate_to=escalate)


def build_runner(c: ModerateConfig) -> Moderator | BundleModerator:
    """A :class:`BundleModerator` when ``c.policy`` names a bundle (``icm-standard[:RULES]``), else :func:`build_moderator`."""
    parsed = parse_bundle_ref(c.policy, c.rules)
    if parsed is None:
        return build_moderator(c)
    bundle, rules = parsed
    bundle_members(bundle, rules)  # fail early on a missing member or rule set, before loading a model
    first, escalate = _backends(c)
    return BundleModerator(first, bundle=bundle, rules=rules, explain=c.explain, escalate_to=escalate)


def _backends(c: ModerateConfig) -> tuple[Backend, Backend | None]:
    if c.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if not 0.0 <= c.min_label_mass <= 1.0:
        raise ValueError(f"--min-label-mass must be between 0 and 1, got {c.min_label_mass}")
    if c.max_frames < 1:
        raise ValueError("--max-frames must be at least 1")
    if not (c.fps > 0 and c.fps < float("inf")):
        raise ValueError("--fps must be a positive number")
    if c.backend == "cascade" and c.escalate_backend not in ("hf", "openai"):
        raise ValueError("the cascade escalates to an MLLM backend: --escalate-backend hf or openai")
    if c.backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {c.backend!r} (choose from {', '.join(BACKEND_NAMES)})")
    return create_backends(c.backend_spec())


def members(mod: Moderator | BundleModerator) -> list[Moderator]:
    """The moderators a run's records come from: the bundle's members, or the one moderator."""
    return mod.members if isinstance(mod, BundleModerator) else [mod]


def _record_key(path: str, r: ModerationRecord | Moderator) -> str:
    """What resume matches a finished record by: the file, and the policy and rule set that judged it."""
    if isinstance(r, Moderator):
        return f"{path}\0{r.policy.name}\0{r.rule_set.name}"
    return f"{path}\0{r.policy}\0{r.rules}"


def _sha256(path: Path) -> str | None:
    """The file's sha256; None when it cannot be read or is not a regular file (never opens a FIFO)."""
    h = hashlib.sha256()
    try:
        fd, _ = open_regular_file(path, str(path))
        with os.fdopen(fd, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except (OSError, ImageLoadError):
        return None
    return h.hexdigest()


def _resolved(path: str | os.PathLike[str]) -> str:
    """The key resume matches a file by (with its sha256): the resolved path, not its spelling."""
    return os.path.normcase(os.path.realpath(path))


def read_records(path: Path) -> tuple[list[ModerationRecord], int]:
    """Records of a JSONL file and the number of unreadable lines (a run killed mid-write)."""
    rows = read_jsonl(path, ModerationRecord, skip_bad=True, missing_ok=True)
    return list(rows), len(rows.errors)


@dataclass
class JobSummary:
    total: int = 0
    skipped: int = 0
    verdicts: Counter = field(default_factory=Counter)
    errors: int = 0
    seconds: float = 0.0
    records: list[ModerationRecord] = field(default_factory=list)
    text_records: int = 0
    """Records with at least one answer read from the answer text (no usable logprobs)."""
    text_answers: int = 0
    """Answers (queries) read from the answer text, over all records."""

    def count_text(self, r: ModerationRecord) -> None:
        keys = r.text_answers()
        if keys:
            self.text_records += 1
            self.text_answers += len(keys)

    def text_summary(self) -> str:
        """``read from text: N records (M answers)``, or "" when none was."""
        if not self.text_records:
            return ""
        return f"read from text: {self.text_records} records ({self.text_answers} answers, no usable logprobs)"

    @property
    def ok(self) -> bool:
        return self.errors == 0


def _prepare_output(c: ModerateConfig, mods: list[Moderator]) -> tuple[TextIO | None, dict[str, ModerationRecord]]:
    """Open the output; with resume, keep finished records and return them by :func:`_record_key`."""
    if not c.out:
        return None, {}
    out = Path(c.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, ModerationRecord] = {}
    mine = {(m.policy.name, m.policy_digest, m.rule_set.name, m.backend_name, m.model_id) for m in mods}

    def same(r: ModerationRecord) -> bool:
        return (r.policy, r.policy_digest, r.rules, r.backend, r.model) in mine

    def key(r: ModerationRecord) -> str:
        return _record_key(_resolved(r.local_path()), r)

    from icm.moderation.parquet import is_parquet_path, open_parquet_output

    if is_parquet_path(out):  # *.parquet: a folder of part files (icm.moderation.parquet)
        return open_parquet_output(out, resume=c.resume, same=same, key=key)  # type: ignore[return-value]
    if c.resume and out.exists():
        records, _ = read_records(out)
        keep = [r for r in records if r.ok or not same(r)]
        done = {key(r): r for r in keep if r.ok and same(r)}
        with atomic_write(out) as fh:  # drops retried failures and a half-written last line
            for r in keep:
                fh.write(r.model_dump_json() + "\n")
        return open(out, "a", encoding="utf-8"), done
    return open(out, "w", encoding="utf-8"), done


def run_job(
    c: ModerateConfig,
    *,
    moderator: Moderator | BundleModerator | None = None,
    stdin: TextIO | None = None,
    on_start: Callable[[int], None] | None = None,
    on_record: Callable[[ModerationRecord], None] | None = None,
) -> JobSummary:
    """Run a moderation batch; records go to ``c.out`` (JSONL) and to ``on_record``.

    With a bundle (``c.policy`` names one, or ``moderator`` is a :class:`BundleModerator`)
    each image gives one record per member policy; ``total`` and ``skipped`` count images,
    ``verdicts`` and ``errors`` records.
    """
    t0 = time.perf_counter()
    mod = moderator or build_runner(c)
    mods = members(mod)
    summary = JobSummary()
    entries = list(iter_image_paths(c.inputs, stdin=stdin, null=c.null))
    if on_start:
        on_start(len(entries))
    fh, done = _prepare_output(c, mods)

    def emit(r: ModerationRecord) -> None:
        summary.records.append(r)
        if r.ok:
            summary.verdicts[r.verdict or "none"] += 1
            summary.count_text(r)
        else:
            summary.errors += 1
        if fh is not None:
            fh.write(r.model_dump_json() + "\n")
            fh.flush()
        if on_record:
            on_record(r)

    try:
        pending: list[str] = []

        def flush_batch() -> None:
            for r in _moderate_paths(mod, pending, c):
                emit(r)
            pending.clear()

        for e in entries:
            summary.total += 1
            if not e.ok or e.path is None:
                for m in mods:
                    emit(m.error_record(e.source, e.error or "no image"))
                continue
            path = str(e.path)
            prevs = [done.get(_record_key(_resolved(e.path), m)) for m in mods]
            if all(p is not None for p in prevs):
                sha = _sha256(e.path)
                finished = [p for p in prevs if p is not None and p.sha256 == sha]
                if len(finished) == len(mods):
                    summary.skipped += 1
                    for prev in finished:
                        summary.verdicts[prev.verdict or "none"] += 1
                        summary.count_text(prev)
                        if on_record:
                            on_record(prev)
                    continue
            pending.append(path)
            if len(pending) >= c.batch_size:
                flush_batch()
        if pending:
            flush_batch()
    finally:
        if fh is not None:
            fh.close()
        if moderator is None:
            mod.backend.close()
            if mod.escalate_to is not None:
                mod.escalate_to.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _moderate_paths(mod: Moderator | BundleModerator, paths: list[str], c: ModerateConfig) -> list[ModerationRecord]:
    """One batch's records: per image, one per member policy."""
    if isinstance(mod, BundleModerator):
        per_image = mod.moderate_paths(paths, max_pixels=c.max_pixels, max_frames=c.max_frames, fps=c.fps)
        return [r for records in per_image for r in records]
    return mod.moderate_paths(paths, max_pixels=c.max_pixels, max_frames=c.max_frames, fps=c.fps)
