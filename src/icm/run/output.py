"""The one output of ``icm moderate``, for the local and the Ray engine alike.

* **identity**: :class:`RunIdentity` (policy, its digest, rule set, backend, model) is what a
  record shares with the run that wrote it; ``--resume`` keeps a record only for a run of the
  same identity, whichever engine wrote it.
* **keys**: :func:`record_key` names an input under one policy and rule set: the resolved
  local path (so ``./a.png`` and ``a.png`` and a link to it are one file), or a URI or
  ``<bytes ...>`` name as given.
* **the sink**: :class:`RecordSink` opens the output (JSONL appended and flushed record by
  record, or a ``*.parquet`` folder of atomic part files, see :mod:`icm.moderation.parquet`),
  with ``resume`` reads it first into a :class:`ResumeIndex` and drops this run's failed
  records (tried again) and a torn last line, then counts every record into the
  :class:`JobSummary`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from icm.fileio import atomic_write, read_jsonl
from icm.moderation.images import ImageLoadError, open_regular_file
from icm.moderation.record import ModerationRecord

# --------------------------------------------------------------------------- identity and keys


class RunIdentity(NamedTuple):
    """What a record must share with a run to count as done by it."""

    policy: str
    policy_digest: str | None
    rules: str
    backend: str
    model: str | None

    @classmethod
    def of(cls, mod: Any) -> RunIdentity:
        """The identity of a :class:`~icm.moderation.engine.Moderator` (one policy, one rule set)."""
        return cls(mod.policy.name, mod.policy_digest, mod.rule_set.name, mod.backend_name, mod.model_id)

    @classmethod
    def of_record(cls, r: ModerationRecord) -> RunIdentity:
        return cls(r.policy, r.policy_digest, r.rules, r.backend, r.model)

    def error_record(self, source: str, why: str) -> ModerationRecord:
        """The record of an input that gave no image (a missing file, an unreadable listing)."""
        return ModerationRecord(path=source, policy=self.policy, policy_digest=self.policy_digest, rules=self.rules,
                                backend=self.backend, model=self.model, error=why)


def is_uri(name: str) -> bool:
    """``s3://...``, ``gs://...``, ``https://...``, ``file://...``: a name with a scheme."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", name) is not None


def resolved(path: str | os.PathLike[str]) -> str:
    """A local file as resume matches it (with its sha256): the resolved path, not its spelling."""
    return os.path.normcase(os.path.realpath(path))


def input_key(name: str) -> str:
    """An input as resume matches it: a resolved local path, or a URI or ``<bytes ...>`` name as given."""
    return name if is_uri(name) or name.startswith("<") else resolved(name)


def record_key(name: str, policy: str, rules: str | None) -> str:
    """The key of one input under one policy and rule set (a bundle gives one per member)."""
    return f"{input_key(name)}\0{policy}\0{rules}"


def sha256_file(path: Path) -> str | None:
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


def read_records(path: Path) -> tuple[list[ModerationRecord], int]:
    """Records of a JSONL file and the number of unreadable lines (a run killed mid-write)."""
    rows = read_jsonl(path, ModerationRecord, skip_bad=True, missing_ok=True)
    return list(rows), len(rows.errors)


# --------------------------------------------------------------------------- resume


@dataclass
class ResumeIndex:
    """A run's finished records of an earlier output, by :func:`record_key`."""

    done: dict[str, ModerationRecord] = field(default_factory=dict)

    def finished(self, key: str, sha256: str | None) -> ModerationRecord | None:
        """The record under ``key`` when the input's content (``sha256``) is unchanged, else None."""
        prev = self.done.get(key)
        return prev if prev is not None and prev.sha256 is not None and prev.sha256 == sha256 else None

    def hashes(self) -> dict[str, str]:
        """key -> sha256 of the finished records (what a Ray actor needs to skip an input)."""
        return {k: r.sha256 for k, r in self.done.items() if r.sha256}


def _read_output(out: Path, identities: set[RunIdentity], parquet: bool) -> ResumeIndex:
    """With resume: the finished records of these identities; failed ones and torn lines are dropped from ``out``."""
    from icm.moderation import parquet as pq

    if not out.exists():
        return ResumeIndex()
    records, bad = pq.read_parquet_records(out) if parquet else read_records(out)
    keep = [r for r in records if r.ok or RunIdentity.of_record(r) not in identities]
    if len(keep) != len(records) or bad:
        if parquet:
            pq.rewrite_parquet(out, keep)
        else:
            with atomic_write(out) as fh:
                for r in keep:
                    fh.write(r.model_dump_json() + "\n")
    return ResumeIndex({record_key(r.local_path(), r.policy, r.rules): r
                        for r in keep if r.ok and RunIdentity.of_record(r) in identities})


# --------------------------------------------------------------------------- the summary and the sink


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


class RecordSink:
    """The output of one run and its summary: every record of either engine goes through :meth:`emit`
    (or :meth:`skip`, for what ``resume`` found done).

    ``out`` None writes nothing (records still reach ``on_record`` and the summary); ``keep``
    bounds the records the summary holds (None: all).
    """

    def __init__(
        self,
        out: str | os.PathLike[str] | None,
        identities: Iterable[RunIdentity],
        *,
        resume: bool = False,
        part_size: int = 1000,
        keep: int | None = None,
        on_record: Callable[[ModerationRecord], None] | None = None,
    ) -> None:
        from icm.moderation.parquet import ParquetRecordWriter, is_parquet_path

        self.summary = JobSummary()
        self.keep = keep
        self.on_record = on_record
        self.index = ResumeIndex()
        self._fh: TextIO | None = None
        self._pq: ParquetRecordWriter | None = None
        if out is None:
            return
        path = Path(out)
        parquet = is_parquet_path(path)
        if resume:
            self.index = _read_output(path, set(identities), parquet)
        if parquet:
            self._pq = ParquetRecordWriter(path, part_size=part_size, truncate=not resume)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a" if resume else "w", encoding="utf-8")

    def emit(self, r: ModerationRecord) -> None:
        """A new record: counted, written (JSONL: flushed at once), passed on."""
        s = self.summary
        if self.keep is None or len(s.records) < self.keep:  # a backlog's records are in the output, not in memory
            s.records.append(r)
        if r.ok:
            s.verdicts[r.verdict or "none"] += 1
            s.count_text(r)
        else:
            s.errors += 1
        if self._fh is not None:
            self._fh.write(r.model_dump_json() + "\n")
            self._fh.flush()
        elif self._pq is not None:
            self._pq.write(r)
        if self.on_record:
            self.on_record(r)

    def skip(self, done: list[ModerationRecord]) -> None:
        """An input ``resume`` found done (its records, one per policy): counted, not written again."""
        self.summary.skipped += 1
        for prev in done:
            self.summary.verdicts[prev.verdict or "none"] += 1
            self.summary.count_text(prev)
            if self.on_record:
                self.on_record(prev)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._pq is not None:
            self._pq.close()
