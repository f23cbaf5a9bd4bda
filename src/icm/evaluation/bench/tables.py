"""Reading benchmark tables as their publishers ship them, row by row.

* a local copy of a Hugging Face dataset repository: its parquet files
  (``data/train-00000-of-00001.parquet``, ``test-*.parquet``; the split is the file name's
  first part, or the folder's name);
* a ``datasets`` ``save_to_disk`` folder: ``dataset_dict.json`` and one folder per split of
  Arrow stream files (``data-00000-of-00001.arrow``), or one split's folder
  (``state.json`` names the split);
* CSV and JSON files.

An image column of the ``datasets`` ``Image`` feature is a struct of ``bytes`` and ``path``:
:func:`image_of` gives either. pyarrow is needed for the first two (``pip install pyarrow``;
the ``ray`` extra has it): without it the error says so.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from icm.evaluation.bench.records import BenchDataError, BenchIssue

SPLIT_NAMES = ("train", "validation", "val", "dev", "test")
ROWS_PER_BATCH = 64


class TableFile:
    """One table file of a split: its rows come as dicts, its columns are known before reading them."""

    def __init__(self, path: Path, split: str, kind: str) -> None:
        self.path, self.split, self.kind = path, split, kind

    def columns(self) -> list[str]:
        pa, pq = _pyarrow()
        if self.kind == "parquet":
            return list(pq.ParquetFile(self.path).schema_arrow.names)
        with pa.memory_map(str(self.path)) as src:
            return list(pa.ipc.open_stream(src).schema.names)

    def rows(self) -> Iterator[dict[str, Any]]:
        pa, pq = _pyarrow()
        if self.kind == "parquet":
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=ROWS_PER_BATCH):
                yield from batch.to_pylist()
            return
        with pa.memory_map(str(self.path)) as src:
            for batch in pa.ipc.open_stream(src):
                yield from batch.to_pylist()


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchDataError(
            "reading a Hugging Face dataset (parquet or save_to_disk) needs pyarrow: pip install pyarrow"
        ) from None
    return pa, pq


def _split_of(path: Path, root: Path) -> str:
    first = path.name.split("-")[0].split(".")[0].lower()
    if first in SPLIT_NAMES:
        return first
    for parent in path.relative_to(root).parents:
        if parent.name.lower() in SPLIT_NAMES:
            return parent.name.lower()
    return first or "train"


def hf_tables(root: Path) -> list[TableFile]:
    """The table files of a Hugging Face dataset copy at ``root`` (parquet files or a save_to_disk folder)."""
    if not root.is_dir():
        raise BenchDataError(f"{root}: not a folder (expected a local copy of the Hugging Face dataset)")
    dd = root / "dataset_dict.json"
    if dd.is_file():
        try:
            splits = json.loads(dd.read_text(encoding="utf-8")).get("splits") or []
        except (OSError, ValueError, AttributeError) as exc:
            raise BenchDataError(f"{dd}: not a save_to_disk dataset_dict.json ({exc})") from None
        out = [TableFile(p, str(s), "arrow") for s in splits for p in sorted((root / str(s)).glob("*.arrow"))]
        if not out:
            raise BenchDataError(f"{dd}: names splits {splits} but their folders hold no .arrow file")
        return out
    arrows = sorted(root.glob("data-*.arrow"))
    if arrows and (root / "state.json").is_file():
        try:
            split = json.loads((root / "state.json").read_text(encoding="utf-8")).get("_split") or root.name
        except (OSError, ValueError, AttributeError):
            split = root.name
        return [TableFile(p, str(split), "arrow") for p in arrows]
    parquet = sorted(p for p in root.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not parquet:
        raise BenchDataError(
            f"{root}: no parquet file and no save_to_disk folder (dataset_dict.json) in it: "
            "expected a local copy of the Hugging Face dataset"
        )
    return [TableFile(p, _split_of(p, root), "parquet") for p in parquet]


def missing_columns(columns: Sequence[str], required: Iterable[str]) -> list[str]:
    have = set(columns)
    return [c for c in required if c not in have]


def column_issue(path: Path, columns: Sequence[str], missing: Sequence[str]) -> BenchIssue:
    return BenchIssue(
        file=str(path),
        problem=f"missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
        f"(it has {', '.join(columns) or 'none'}); its rows are left out",
    )


def image_of(value: Any) -> tuple[bytes | None, str | None]:
    """The bytes and/or path of a ``datasets`` Image value (a struct, raw bytes or a path string)."""
    if isinstance(value, dict):
        raw, path = value.get("bytes"), value.get("path")
        return (bytes(raw) if raw else None), (str(path) if path else None)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str) and value:
        return None, value
    return None, None


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV file (BenchDataError naming it when it cannot be read)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            return [c or "" for c in (reader.fieldnames or [])], rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BenchDataError(f"{path}: cannot read it as CSV ({exc})") from None


def read_json_list(path: Path) -> list[Any]:
    """A JSON file holding a list (BenchDataError naming it otherwise)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BenchDataError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, list):
        raise BenchDataError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data
