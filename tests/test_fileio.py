"""read_jsonl (FILE:LINE errors, torn lines) and atomic_write (all or nothing)."""

from __future__ import annotations

import os
import stat

import pytest
from pydantic import BaseModel

from icm.fileio import JSONLError, atomic_write, read_jsonl


class Row(BaseModel):
    id: str
    n: int


def test_read_jsonl_validates_models_and_names_file_and_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"id": "a", "n": 1}\n\n{"id": "b", "n": "many"}\n{"id": "c", "n": 3}\n')
    with pytest.raises(JSONLError) as exc:
        read_jsonl(f, Row)
    assert str(exc.value).startswith(f"{f}:3: n: ") and exc.value.line == 3
    rows = read_jsonl(f, Row, skip_bad=True)
    assert [r.id for r in rows] == ["a", "c"] and rows.lines == [1, 4]
    assert [e.line for e in rows.errors] == [3]


def test_read_jsonl_plain_objects_bom_and_bad_json(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}\n[1, 2]\n{"a": \n')
    rows = read_jsonl(f, skip_bad=True)
    assert rows == [{"a": 1}]
    assert [str(e) for e in rows.errors] == [f"{f}:2: not a JSON object (a JSON list)", f"{f}:3: not a JSON object (Expecting value at column 7)"]


def test_a_torn_multibyte_character_spoils_only_its_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes('{"id": "a", "n": 1}\n{"id": "é'.encode()[:-1])  # killed inside the é
    rows = read_jsonl(f, Row, skip_bad=True)
    assert [r.id for r in rows] == ["a"] and rows.errors[0].line == 2 and rows.errors[0].reason == "not UTF-8 text"


def test_read_jsonl_missing_file_and_text(tmp_path):
    missing = tmp_path / "none.jsonl"
    assert read_jsonl(missing, missing_ok=True) == []
    with pytest.raises(ValueError, match=f"cannot read {missing}"):
        read_jsonl(missing)
    with pytest.raises(JSONLError, match=r"^pasted:2: "):
        read_jsonl("pasted", Row, text='{"id": "a", "n": 1}\n{"id": "b"}')


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_write(target) as fh:
        fh.write("first\n")
    assert target.read_text() == "first\n"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write("half of the sec")
            raise RuntimeError("killed")
    assert target.read_text() == "first\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temporary file left
    with atomic_write(target, "wb") as fh:
        fh.write(b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"


def test_atomic_write_keeps_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "x.txt") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o644


def test_read_text_names_what_and_the_file(tmp_path):
    from icm.fileio import read_text

    with pytest.raises(ValueError, match=f"^cannot read labels file {tmp_path / 'no.csv'}: No such file"):
        read_text(tmp_path / "no.csv", "labels file")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=f"^cannot read {latin}: not UTF-8 text"):
        read_text(latin)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfimage,label\n")
    assert read_text(bom, encoding="utf-8-sig") == "image,label\n"
