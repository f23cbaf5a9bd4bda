"""The local engine of ``icm moderate``: inputs in, records out, in this process.

Records go through the run's :class:`~icm.run.output.RecordSink` (JSONL appended and flushed
one by one, so a killed run loses nothing already done, or parquet parts), and ``resume``
skips images the output already holds for the same policy, rule set, backend and model
(failed ones, e.g. a request that got HTTP 503 after its retries, are tried again). A
:class:`~icm.moderation.backends.base.BackendConfigError` (a rejected API key, an unknown
model) propagates out of :func:`run_job`: the records written so far stay, and no error
record is written for the image it stopped on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from icm.moderation.backends.base import Backend
from icm.moderation.bundle import BundleModerator
from icm.moderation.engine import Moderator
from icm.moderation.inputs import iter_image_paths
from icm.moderation.record import ModerationRecord
from icm.moderation.spec import create_backends
from icm.run.config import ModerateConfig
from icm.run.output import JobSummary, RecordSink, RunIdentity, record_key, sha256_file
from icm.run.preflight import Checked, check_policy, check_settings


def _backends(c: ModerateConfig) -> tuple[Backend, Backend | None]:
    check_settings(c)
    return create_backends(c.backend)


def build_moderator(c: ModerateConfig, checked: Checked | None = None) -> Moderator:
    """The engine for a one-policy config. Raises ValueError/KeyError/PolicyError on bad settings."""
    checked = checked or check_policy(c)
    if checked.policy is None:
        raise ValueError(f"{c.policy} is a bundle: run it with build_runner")
    first, escalate = _backends(c)
    return Moderator(first, policy=checked.policy, rules=c.rules, explain=c.explain, escalate_to=escalate)


def build_runner(c: ModerateConfig, checked: Checked | None = None) -> Moderator | BundleModerator:
    """A :class:`BundleModerator` when ``c.policy`` names a bundle (``icm-standard[:RULES]``), else :func:`build_moderator`.

    The policy side is checked (or taken from ``checked``, see :func:`icm.run.preflight.preflight`)
    before a model loads.
    """
    checked = checked or check_policy(c)
    if checked.bundle is None:
        return build_moderator(c, checked)
    first, escalate = _backends(c)
    return BundleModerator(first, bundle=checked.bundle, rules=checked.bundle_rules, explain=c.explain, escalate_to=escalate)


def members(mod: Moderator | BundleModerator) -> list[Moderator]:
    """The moderators a run's records come from: the bundle's members, or the one moderator."""
    return mod.members if isinstance(mod, BundleModerator) else [mod]


def close_runner(mod: Moderator | BundleModerator) -> None:
    """Close the backends a runner holds (both stages of a cascade)."""
    mod.backend.close()
    if mod.escalate_to is not None:
        mod.escalate_to.close()


def run_job(
    c: ModerateConfig,
    *,
    moderator: Moderator | BundleModerator | None = None,
    stdin: TextIO | None = None,
    on_start: Callable[[int], None] | None = None,
    on_record: Callable[[ModerationRecord], None] | None = None,
) -> JobSummary:
    """Run a moderation batch; records go to ``c.out`` (JSONL or ``*.parquet``) and to ``on_record``.

    With a bundle (``c.policy`` names one, or ``moderator`` is a :class:`BundleModerator`)
    each image gives one record per member policy; ``total`` and ``skipped`` count images,
    ``verdicts`` and ``errors`` records. A ``moderator`` given is left open; one built here is closed.
    """
    t0 = time.perf_counter()
    mod = moderator or build_runner(c)
    mods = members(mod)
    entries = list(iter_image_paths(c.inputs, stdin=stdin, null=c.null))
    if on_start:
        on_start(len(entries))
    sink: RecordSink | None = None
    try:
        sink = RecordSink(c.out, [RunIdentity.of(m) for m in mods], resume=c.resume, on_record=on_record)
        summary = sink.summary
        pending: list[str] = []

        def flush_batch() -> None:
            for r in _moderate_paths(mod, pending, c):
                sink.emit(r)
            pending.clear()

        for e in entries:
            summary.total += 1
            if not e.ok or e.path is None:
                for m in mods:
                    sink.emit(m.error_record(e.source, e.error or "no image"))
                continue
            path = str(e.path)
            keys = [record_key(path, m.policy.name, m.rule_set.name) for m in mods]
            if all(k in sink.index.done for k in keys):
                sha = sha256_file(e.path)
                finished = [p for p in (sink.index.finished(k, sha) for k in keys) if p is not None]
                if len(finished) == len(mods):
                    sink.skip(finished)
                    continue
            pending.append(path)
            if len(pending) >= c.batch_size:
                flush_batch()
        if pending:
            flush_batch()
    finally:
        if sink is not None:
            sink.close()
        if moderator is None:
            close_runner(mod)
    summary.seconds = time.perf_counter() - t0
    return summary


def _moderate_paths(mod: Moderator | BundleModerator, paths: list[str], c: ModerateConfig) -> list[ModerationRecord]:
    """One batch's records: per image, one per member policy."""
    if isinstance(mod, BundleModerator):
        per_image = mod.moderate_paths(paths, max_pixels=c.max_pixels, max_frames=c.max_frames, fps=c.fps)
        return [r for records in per_image for r in records]
    return mod.moderate_paths(paths, max_pixels=c.max_pixels, max_frames=c.max_frames, fps=c.fps)
