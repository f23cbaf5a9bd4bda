"""Moderation records as Parquet: an explicit schema, atomic part files, and reading back.

A record is nested (attributes, frame scores, timings), and letting Arrow infer a schema from
it fails in two ways a batch job meets: nested structs that are empty in a batch cannot be
written, and a batch whose ``error`` column is all null is typed ``null`` and then clashes
with the next batch. So the table is *flat*, with a fixed schema: the columns a query needs
(path, sha256, verdict, product, rule, P(violation), error, and who decided) plus the whole
record as JSON in ``record`` (what :func:`read_parquet_records` validates back into a
:class:`~icm.moderation.record.ModerationRecord`).

An output ``out.parquet`` is a *folder* of part files (as Spark, Ray Data and pyarrow's
datasets write; ``pyarrow.parquet.read_table("out.parquet")`` and pandas read it whole). Each
part is written to a hidden temporary name and renamed, so a run killed at any moment leaves
only complete parts behind (and maybe a ``.tmp`` file, which readers ignore and the next run
deletes).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from icm.moderation.record import ModerationRecord

PARQUET_HINT = "Parquet output needs pyarrow: pip install 'icm-assistant[ray]' (or pyarrow)"

# name, Arrow type name; kept as data so the module imports without pyarrow
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("path", "string"),
    ("sha256", "string"),
    ("verdict", "string"),
    ("product", "string"),
    ("rule", "string"),
    ("p_violation", "float64"),
    ("error", "string"),
    ("policy", "string"),
    ("rules", "string"),
    ("backend", "string"),
    ("model", "string"),
    ("record", "string"),
)
COLUMNS: tuple[str, ...] = tuple(name for name, _ in _COLUMNS)


def _pa() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError(PARQUET_HINT) from exc
    return pa


def record_schema() -> Any:
    """The pyarrow schema of a records table (flat columns + the record as JSON)."""
    pa = _pa()
    return pa.schema([pa.field(name, getattr(pa, kind)(), nullable=name != "record") for name, kind in _COLUMNS])


def is_parquet_path(path: str | os.PathLike[str]) -> bool:
    """True for an output named ``*.parquet`` (a folder of parts) or an existing folder of parquet parts."""
    p = Path(path)
    return p.suffix.lower() == ".parquet" or (p.is_dir() and any(p.glob("*.parquet")))


def record_row(r: ModerationRecord) -> dict[str, Any]:
    """One table row of a record."""
    return {
        "path": r.path,
        "sha256": r.sha256,
        "verdict": r.verdict,
        "product": r.product,
        "rule": r.rule,
        "p_violation": r.p_violation,
        "error": r.error,
        "policy": r.policy,
        "rules": r.rules,
        "backend": r.backend,
        "model": r.model,
        "record": r.model_dump_json(),
    }


def records_table(records: Iterable[ModerationRecord]) -> Any:
    """A ``pyarrow.Table`` of records with :func:`record_schema` (types fixed even when a column is all null)."""
    pa = _pa()
    rows = [record_row(r) for r in records]
    return pa.Table.from_pylist(rows, schema=record_schema())


def part_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The complete part files of an output folder, sorted (temporary files excluded)."""
    d = Path(folder)
    if d.is_file():
        return [d]
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.parquet") if not p.name.startswith("."))


def write_part(folder: str | os.PathLike[str], records: Sequence[ModerationRecord], *, prefix: str = "part") -> Path | None:
    """Write records as one new part file of ``folder``, atomically; None when there are none."""
    if not records:
        return None
    pq = _pa().parquet
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{uuid.uuid4().hex}.parquet"
    tmp = d / f".{name}.tmp"
    pq.write_table(records_table(records), tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, d / name)
    return d / name


def clean_temporary(folder: str | os.PathLike[str]) -> int:
    """Delete the temporary parts a killed run left; returns how many."""
    d = Path(folder)
    n = 0
    if d.is_dir():
        for p in d.glob(".*.parquet.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def read_parquet_records(path: str | os.PathLike[str]) -> tuple[list[ModerationRecord], int]:
    """Records of a parquet file or folder of parts, and the number that could not be read.

    A part that is not readable parquet (written by something else, or damaged) counts all
    its rows as one bad item, like a torn JSONL line, rather than stopping the read.
    """
    pq = _pa().parquet
    records: list[ModerationRecord] = []
    bad = 0
    for part in part_files(path):
        try:
            table = pq.read_table(part, columns=["record"])
        except Exception:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError ... for a damaged file
            bad += 1
            continue
        for text in table.column("record").to_pylist():
            try:
                records.append(ModerationRecord.model_validate_json(text))
            except (ValueError, TypeError):
                bad += 1
    return records, bad


def read_any_records(path: str | os.PathLike[str]) -> tuple[list[ModerationRecord], int]:
    """Records of an ``icm moderate`` output, JSONL or parquet (file or folder), and the unreadable count."""
    if is_parquet_path(path):
        return read_parquet_records(path)
    from icm.run.output import read_records

    return read_records(Path(path))


class ParquetRecordWriter:
    """Collects records and writes them as part files of ``folder`` every ``part_size`` records.

    What a killed run loses is at most the records not yet in a part (a resumed run does
    them again); ``close`` writes the rest.
    """

    def __init__(self, folder: str | os.PathLike[str], *, part_size: int = 1000, truncate: bool = True) -> None:
        _pa()
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{self.folder}: parquet output is a folder of part files, and a file of that name exists")
        self.folder.mkdir(parents=True, exist_ok=True)
        clean_temporary(self.folder)
        if truncate:
            for p in part_files(self.folder):
                p.unlink()
        self.part_size = max(1, part_size)
        self._pending: list[ModerationRecord] = []

    def write(self, record: ModerationRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        write_part(self.folder, self._pending)
        self._pending = []

    def close(self) -> None:
        self.flush()


def rewrite_parquet(folder: str | os.PathLike[str], keep: Sequence[ModerationRecord]) -> None:
    """Replace the parts of ``folder`` by one part holding ``keep`` (resume drops retried failures)."""
    d = Path(folder)
    old = part_files(d)
    write_part(d, keep, prefix="kept")
    for p in old:
        p.unlink(missing_ok=True)


def records_json_lines(records: Iterable[ModerationRecord]) -> str:
    """JSONL text of records (what ``icm eval icm`` parses)."""
    return "".join(json.dumps(json.loads(r.model_dump_json())) + "\n" for r in records)
