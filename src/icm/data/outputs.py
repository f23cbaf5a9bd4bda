"""Append-only JSONL outputs that survive being killed at any moment.

A generation run writes ``records.jsonl`` (one :class:`~icm.data.records.InstructRecord`
per finished image) and ``rejected.jsonl`` (one :class:`~icm.data.records.Rejected` per
quarantined thing). Each line is written and flushed as soon as it is known, so a killed
run loses at most the line being written; on the next start :func:`repair_jsonl` cuts
that half-written line off, and :class:`OutputStore` knows which images are done (a
record, or a whole-item rejection) and which rejections are already there, so a resumed
run writes each of them exactly once.

Order of writes for one image: its row-level rejections first, then its record. A kill
between the two leaves the image undone (it is redone from the response cache), and its
rejections, keyed, are not written twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from icm.data.records import InstructRecord, Rejected
from icm.fileio import JSONLError, atomic_write, read_jsonl

__all__ = ["OutputStore", "read_records", "read_rejected", "repair_jsonl"]


def repair_jsonl(path: str | os.PathLike[str]) -> int:
    """Cut a half-written last line off ``path``; the number of bytes removed."""
    p = Path(path)
    if not p.exists():
        return 0
    size = p.stat().st_size
    if size == 0:
        return 0
    with open(p, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return 0
        # find the last newline, reading backwards in blocks
        pos = size
        keep = 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            block = fh.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = pos + i + 1
                break
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def read_records(path: str | os.PathLike[str]) -> list[InstructRecord]:
    """The records of a ``records.jsonl`` file (or of a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "records.jsonl"
    return list(read_jsonl(p, InstructRecord, missing_ok=True))


def read_rejected(path: str | os.PathLike[str]) -> list[Rejected]:
    p = Path(path)
    if p.is_dir():
        p = p / "rejected.jsonl"
    return list(read_jsonl(p, Rejected, skip_bad=True, missing_ok=True))


class OutputStore:
    """``records.jsonl`` and ``rejected.jsonl`` in one folder, opened for appending."""

    def __init__(self, folder: str | os.PathLike[str], *, retry_rejected: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records_path = self.folder / "records.jsonl"
        self.rejected_path = self.folder / "rejected.jsonl"
        self.repaired_bytes = repair_jsonl(self.records_path) + repair_jsonl(self.rejected_path)
        try:
            records = read_jsonl(self.records_path, InstructRecord, missing_ok=True)
        except JSONLError as exc:
            raise ValueError(f"{exc} (not a record); fix or move the file before resuming") from None
        rejected = list(read_jsonl(self.rejected_path, Rejected, skip_bad=True, missing_ok=True))
        if retry_rejected and any(r.item for r in rejected):
            rejected = [r for r in rejected if not r.item]
            self._rewrite(self.rejected_path, rejected)
        self.done: set[str] = {r.id for r in records}
        self.rejected_items: set[str] = {r.id for r in rejected if r.item}
        self.rejected_keys: set[str] = {r.key for r in rejected}
        self.records_before = len(self.done)
        self._records: TextIO = open(self.records_path, "a", encoding="utf-8")
        self._rejected: TextIO = open(self.rejected_path, "a", encoding="utf-8")

    @staticmethod
    def _rewrite(path: Path, items: list[Rejected]) -> None:
        with atomic_write(path) as fh:
            for it in items:
                fh.write(it.model_dump_json() + "\n")

    def is_done(self, item_id: str) -> bool:
        return item_id in self.done or item_id in self.rejected_items

    def write_record(self, record: InstructRecord) -> bool:
        """Append a record unless its id is there already; True when written."""
        if record.id in self.done:
            return False
        self._records.write(record.model_dump_json() + "\n")
        self._records.flush()
        self.done.add(record.id)
        return True

    def write_rejected(self, rejected: Rejected) -> bool:
        if rejected.key in self.rejected_keys:
            return False
        self._rejected.write(rejected.model_dump_json() + "\n")
        self._rejected.flush()
        self.rejected_keys.add(rejected.key)
        if rejected.item:
            self.rejected_items.add(rejected.id)
        return True

    def close(self) -> None:
        for fh in (self._records, self._rejected):
            try:
                fh.flush()
                os.fsync(fh.fileno())
            except (OSError, ValueError):
                pass
            fh.close()

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iter_records(self) -> Iterator[InstructRecord]:
        yield from read_jsonl(self.records_path, InstructRecord, skip_bad=True, missing_ok=True)
