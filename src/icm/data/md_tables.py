"""Markdown tables as LLMs write them: blocks of rows, an optional header, cell text.

The generic layer of :mod:`icm.data.tables` (which reads Q-A pairs out of them): text,
headings and code fences around a table, several tables in one reply, blank lines between
rows, rows without the outer pipes, a header repeated mid-table, markdown emphasis and
line breaks in cells, placeholder cells (``|  |``, ``| - |``) and numbering (``1.``, ``Q1:``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Table", "TableRow", "cell_text", "find_tables", "is_placeholder", "split_row", "strip_numbering"]

# --------------------------------------------------------------------------- generic tables


@dataclass
class TableRow:
    cells: list[str]
    line: int
    """1-based line number in the text."""
    raw: str


@dataclass
class Table:
    header: list[str] | None
    rows: list[TableRow]
    line: int
    context: str = ""
    """The nearest non-table line above the table (a heading such as "Yes/No questions")."""


_SEP_CELL = re.compile(r"^:?-{2,}:?$|^:?—+:?$|^=+$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def split_row(line: str) -> list[str]:
    """The cells of one table line: outer pipes removed, ``\\|`` kept as a literal pipe."""
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    cells, cur, i = [], [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s) and s[i + 1] == "|":
            cur.append("|")
            i += 2
            continue
        if ch == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    cells.append("".join(cur).strip())
    return cells


def _is_separator_row(cells: list[str]) -> bool:
    nonempty = [c.replace(" ", "") for c in cells if c.strip()]
    return bool(nonempty) and all(_SEP_CELL.match(c) for c in nonempty)


def _is_table_line(line: str) -> bool:
    s = line.strip()
    if not s or "|" not in s:
        return False
    return s.startswith("|") or s.endswith("|") or s.count("|") >= 2 or _is_separator_row(split_row(s))


def find_tables(text: str) -> list[Table]:
    """Every markdown table in ``text``, with its header when it has one.

    A header is the first row when a separator row (``| --- |``) follows it. Blocks
    separated by blank lines only are one table when the later block has no header of
    its own (models sometimes double-space rows). A header repeated inside a table is
    dropped.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[list[tuple[int, str]]] = []
    contexts: list[str] = []
    cur: list[tuple[int, str]] = []
    last_text = ""
    gap_only_blank = False
    for no, line in enumerate(lines, 1):
        if _FENCE.match(line):
            continue
        if _is_table_line(line):
            if not cur and blocks and gap_only_blank and not _followed_by_separator(line, lines, no):
                cur = blocks.pop()  # continuation of the previous table after blank lines
            elif not cur:
                contexts.append(last_text)
            cur.append((no, line))
            gap_only_blank = False
            continue
        if cur:
            blocks.append(cur)
            cur = []
            gap_only_blank = True
        if line.strip():
            last_text = line.strip()
            gap_only_blank = False
    if cur:
        blocks.append(cur)

    tables = []
    for block, ctx in zip(blocks, contexts, strict=True):
        rows = [TableRow(split_row(raw), no, raw) for no, raw in block]
        header: list[str] | None = None
        data: list[TableRow] = []
        for i, row in enumerate(rows):
            if _is_separator_row(row.cells):
                if i == 1 and header is None:
                    header = rows[0].cells
                    data = []
                continue
            if header is not None and _header_words(row.cells) == _header_words(header):
                continue  # repeated header
            data.append(row)
        if header is None and data and _looks_like_header(data[0].cells):
            header, data = data[0].cells, data[1:]
        tables.append(Table(header=header, rows=data, line=block[0][0], context=ctx))
    return tables


def _followed_by_separator(line: str, lines: list[str], no: int) -> bool:
    nxt = lines[no] if no < len(lines) else ""
    return _is_separator_row(split_row(nxt)) if _is_table_line(nxt) else False


def _header_words(cells: list[str]) -> list[str]:
    return [cell_text(c).lower() for c in cells if c.strip()]


# --------------------------------------------------------------------------- headers

_HEADER_WORDS = ("question", "answer", "type", "choice", "option", "kind", "category", "correct", "format")


def _looks_like_header(cells: list[str]) -> bool:
    """A first row without a separator is a header if it names columns and asks nothing."""
    words = [cell_text(c).lower() for c in cells]
    if any(w.endswith("?") for w in words):
        return False
    hits = sum(any(h in w for h in _HEADER_WORDS) for w in words)
    return hits >= 2


# --------------------------------------------------------------------------- cell text

_EMPH = re.compile(r"(\*\*|__|`)")
_BR = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:\(?\d{1,3}[\.\):]|Q\s*\d{1,3}\s*[\.\):]?|#\d{1,3})\s+", re.IGNORECASE)
_PLACEHOLDERS = {"", "-", "--", "---", "—", "–", ".", "..", "...", "…", "n/a", "na", "?", "tbd", "null"}


def cell_text(cell: str) -> str:
    """Cell text without markdown emphasis, line breaks or surrounding space."""
    s = _BR.sub(" ", cell)
    s = _EMPH.sub("", s)
    s = s.replace("\u00a0", " ")
    return " ".join(s.split()).strip()


def is_placeholder(cell: str) -> bool:
    return cell_text(cell).lower() in _PLACEHOLDERS


def strip_numbering(s: str) -> str:
    return _NUMBERING.sub("", s, count=1).strip()
