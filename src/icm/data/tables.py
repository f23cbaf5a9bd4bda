"""Robust parsing of the markdown tables LLMs write, and of Q-A tables in particular.

Real model output is messy, and the released ICM-Instruct tables show most of it:

* text, headings and code fences around the table, several tables in one reply, blank
  lines between rows, rows without the outer pipes, a header repeated mid-table;
* choices in one cell (``A. x B. y C. z D. w``, ``(A) x, (B) y``, ``A) x<br>B) y``) or
  spread over four cells although the header names one ``Choices`` column, option
  letters written ``A.``, ``A)``, ``A:``, ``A -``, ``(A)`` or ``A.text``; placeholder
  cells (``|  |``, ``| - |``) before the answer;
* answers as ``B.``, ``(B)``, ``Option B``, ``B. the option text``, the option text alone,
  a ✓ on the correct option; yes/no answers as ``Yes.``, ``✓``, ``✘``, ``Y``, ``True``;
* missing cells and missing answers (``| . |``), a question cell that repeats the answer,
  yes/no-typed questions that are really open questions ("Is it in colour or black and
  white?" -> "Color."), numbering (``1.``, ``Q1:``) and markdown emphasis in cells.

:func:`find_tables` is the generic layer (blocks of rows with an optional header,
:mod:`icm.data.md_tables`); the option and answer cells are read by :mod:`icm.data.qa_options`
(whose :data:`~icm.data.qa_options.OPTION_LETTERS` are the only option letters); here
:func:`parse_qa_text` turns a reply into :class:`~icm.data.records.QAPair` objects and a
:class:`RowProblem` for every data row it could not use, with a reason code of
:data:`icm.data.records.REASONS`. Nothing here is specific to one file or one model: the
parser maps columns by the header where the header fits the row, and by what each cell
looks like where it does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from icm.data.md_tables import Table, TableRow, cell_text, find_tables, is_placeholder, split_row, strip_numbering
from icm.data.qa_options import (
    FIRST_WORD,
    NO_MARKS,
    OPTION_HEADER,
    OPTION_LETTERS,
    YES_MARKS,
    comparable_text,
    is_undecided_answer,
    normalise_yes_no,
    parse_choice_answer,
    parse_spread_options,
    split_options,
    unmark_options,
)
from icm.data.records import QAKind, QAPair

__all__ = [
    "QAParse",
    "RowProblem",
    "Table",
    "TableRow",
    "find_tables",
    "normalise_yes_no",
    "parse_qa_text",
    "split_options",
    "split_row",
]

# --------------------------------------------------------------------------- headers


def _column_role(cell: str, letters_present: set[str]) -> str:
    w = re.sub(r"[^a-z0-9#/ ]", "", cell_text(cell).lower()).strip()
    m = OPTION_HEADER.fullmatch(w)
    if m and m.group(1) in letters_present and len(letters_present) >= 2:
        return f"option:{m.group(1).upper()}"
    if any(k in w for k in ("type", "kind", "format")) or w in ("category", "qtype"):
        return "type"
    if "choice" in w or "option" in w:
        return "choices"
    if "question" in w or w in ("q", "query", "prompt"):
        return "question"
    if any(k in w for k in ("answer", "correct", "solution", "response")) or w in ("a", "ans"):
        return "answer"
    if w in ("#", "no", "n", "number", "id", "index", "idx", "num", ""):
        return "id"
    return "other"


def _header_roles(header: list[str]) -> list[str]:
    letters = set()
    for c in header:
        m = OPTION_HEADER.fullmatch(re.sub(r"[^a-z ]", "", cell_text(c).lower()).strip())
        if m:
            letters.add(m.group(1))
    return [_column_role(c, letters) for c in header]


# --------------------------------------------------------------------------- Q-A rows


@dataclass
class RowProblem:
    """A data row that gave no Q-A pair, and why (a reason code of ``REASONS``)."""

    line: int
    raw: str
    reason: str
    detail: str


@dataclass
class QAParse:
    """What :func:`parse_qa_text` found in one reply."""

    pairs: list[QAPair] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    """The line of each pair."""
    problems: list[RowProblem] = field(default_factory=list)
    tables: int = 0
    rows: int = 0
    """Data rows seen (header, separator and blank rows excluded)."""
    header_only: int = 0
    """Tables with a header and no data rows."""

    @property
    def share(self) -> float:
        return len(self.pairs) / self.rows if self.rows else 0.0


def _kind_of_type_cell(cell: str | None) -> QAKind | None:
    if not cell:
        return None
    w = re.sub(r"[^a-z0-9/ -]", "", cell_text(cell).lower()).strip()
    if not w:
        return None
    compact = w.replace(" ", "").replace("-", "/")
    if compact in ("yes/no", "yesno", "y/n", "yn", "boolean", "binary", "true/false", "yes/noquestion", "closed") or w.startswith(
        ("yes/no", "yes or no", "yes-no", "boolean", "true/false")
    ):
        return "yes_no"
    if "choice" in w or w in ("mc", "mcq", "multiple", "4-choice", "abcd", "multiplechoice") or "option" in w:
        return "choice"
    if w.startswith("what"):
        return "what"
    if w.startswith("how"):
        return "how"
    if w.startswith(("open", "why", "where", "who", "which", "when", "describe", "short", "free", "wh")):
        return "open"
    return None


def _kind_of_heading(context: str) -> QAKind | None:
    """The question type a heading above a table names ("### Yes/No questions"), if one."""
    w = context.lower().strip("#*: ")
    if len(w.split()) > 8:
        return None  # a sentence, not a heading
    found = set()
    if re.search(r"yes\s*[/-]\s*no|yes or no|true\s*/\s*false", w):
        found.add("yes_no")
    if "choice" in w:
        found.add("choice")
    if re.search(r"\bwhat\b", w):
        found.add("what")
    if re.search(r"\bhow\b", w):
        found.add("how")
    return found.pop() if len(found) == 1 else None  # type: ignore[return-value]


def _kind_of_open_question(question: str) -> QAKind:
    word = _first_word_lower(question)
    return "what" if word == "what" else "how" if word == "how" else "open"


_AUX = {"is", "are", "does", "do", "did", "can", "could", "will", "would", "has", "have", "had", "was", "were",
        "should", "may", "might", "must", "shall", "am"}


_WH = {"what", "how", "why", "where", "who", "whom", "whose", "which", "when"}


@dataclass
class _RowFields:
    type: str | None = None
    question: str = ""
    options: list[str] | None = None
    options_cell: str | None = None
    answer: str | None = None
    stray: list[str] = field(default_factory=list)
    """Cells with content between the options and the answer (a broken option row)."""


def _first_word_lower(s: str) -> str:
    m = FIRST_WORD.match(s)
    return m.group(1).lower() if m else ""


def _parse_row_fields(cells: list[str], roles: list[str] | None) -> _RowFields:
    """Which cell is the type, the question, the options and the answer.

    Where the row has as many cells as the header and no spread options, the header
    says. Otherwise the options (a run of cells A, B, C, ... or one cell holding them)
    split the row: the type and question come before, the answer after; without
    options, the cell that asks (ends with "?") is the question and the answer follows.
    """
    f = _RowFields()
    run = parse_spread_options(cells)
    if roles and len(roles) == len(cells) and run is None:
        opts: dict[str, str] = {}
        for role, cell in zip(roles, cells, strict=True):
            if role == "type":
                f.type = cell
            elif role == "question":
                f.question = cell
            elif role == "choices":
                f.options_cell = cell
            elif role == "answer":
                f.answer = cell
            elif role.startswith("option:"):
                opts[role[-1]] = cell
        if opts:
            f.options = [opts[k] for k in sorted(opts)]
        if f.question or f.answer is not None:
            return f
        f = _RowFields()

    if run is not None:
        first, end, f.options = run
        before, after = cells[:first], cells[end:]
    else:
        before, after = _split_at_question(cells, roles, f)
    f.type, f.question = _parse_type_and_question(before)
    at = _answer_cell_index(after, roles)
    if at is not None:
        f.answer = after[at]
        if f.options is not None or f.options_cell is not None:
            f.stray = [c for c in after[:at] if not is_placeholder(c)]
    return f


def _answer_cell_index(after: list[str], roles: list[str] | None) -> int | None:
    """Which of the cells after the options (or the question) is the answer.

    With a header, its distance from the row's end is the header's (so an
    "explanation" column after the answer is skipped); without one, the first cell
    that is not a placeholder.
    """
    if not after:
        return None
    if roles and "answer" in roles:
        dist = len(roles) - 1 - roles.index("answer")
        if dist < len(after):
            return len(after) - 1 - dist
    for i, cell in enumerate(after):
        if not is_placeholder(cell):
            return i
    return len(after) - 1


def _split_at_question(cells: list[str], roles: list[str] | None, f: _RowFields) -> tuple[list[str], list[str]]:
    for i, cell in enumerate(cells):  # choices in one cell
        if split_options(cell) is not None:
            f.options_cell = cell
            return cells[:i], cells[i + 1:]
    for i, cell in enumerate(cells):  # the cell that asks
        if cell_text(cell).endswith("?"):
            return cells[: i + 1], cells[i + 1:]
    if roles and "question" in roles and roles.index("question") < len(cells) - 1:
        qi = roles.index("question")
        return cells[: qi + 1], cells[qi + 1:]
    for i, cell in enumerate(cells[:-1]):
        if _first_word_lower(cell_text(cell)) in _AUX | _WH and len(cell_text(cell).split()) > 2:
            return cells[: i + 1], cells[i + 1:]
    return cells[:-1], cells[-1:]


def _parse_type_and_question(before: list[str]) -> tuple[str | None, str]:
    type_cell: str | None = None
    texts: list[str] = []
    for cell in before:
        c = cell_text(cell)
        if not c or is_placeholder(c) or re.fullmatch(r"#?\d{1,3}\.?", c):
            continue  # empty or a numbering column
        if type_cell is None and not texts and len(c.split()) <= 3 and not c.endswith("?") and _kind_of_type_cell(c):
            type_cell = c
            continue
        texts.append(c)
    asking = [t for t in texts if t.endswith("?")]
    return type_cell, (asking[0] if asking else (texts[-1] if texts else ""))


def _qa_pair_of_row(fields: _RowFields, hint: QAKind | None) -> QAPair | tuple[str, str]:
    """A Q-A pair, or ``(reason, detail)``."""
    question = strip_numbering(cell_text(fields.question))
    answer_raw = fields.answer
    answer = strip_numbering(cell_text(answer_raw or ""))
    declared = _kind_of_type_cell(fields.type) or hint

    options = fields.options
    if options is None and fields.options_cell is not None and not is_placeholder(fields.options_cell):
        options = split_options(fields.options_cell)
        if options is None:
            return "bad_choices", f"the choices cell has no lettered options A, B, ...: {cell_text(fields.options_cell)[:80]!r}"
    if not question or is_placeholder(question):
        return "no_question", "the question cell is empty"
    if options and fields.stray:
        return "bad_choices", f"cells between the options and the answer: {', '.join(repr(cell_text(c)[:40]) for c in fields.stray)}"
    if options:
        options = [cell_text(o) for o in options]
        options, marked = unmark_options(options)
        if any(not o for o in options):
            return "bad_choices", "an option is empty"
        idx: int | None
        if answer and not is_placeholder(answer):
            idx = parse_choice_answer(answer, options)
            if (idx is None or idx < 0) and marked is not None and not answer.strip(YES_MARKS + "\ufe0f "):
                idx = marked
        else:
            idx = marked
            if idx is None:
                return "no_answer", "the multiple-choice question has no answer"
        if idx is None:
            return "bad_choice_answer", f"the answer {answer!r} names none of the {len(options)} options"
        if idx < 0:
            return "bad_choice_answer", f"the answer {answer!r} names a letter beyond the {len(options)} options"
        letter = OPTION_LETTERS[idx]
        return QAPair(kind="choice", question=question, answer=letter, choices=options, answer_index=idx)

    if declared == "choice":
        return "bad_choices", "a multiple-choice question without options"
    if answer_raw is None or is_placeholder(answer):
        if not answer and answer_raw is not None and any(m in answer_raw for m in YES_MARKS + NO_MARKS):
            pass
        else:
            return "no_answer", "the answer cell is missing or empty"
    yn = normalise_yes_no(answer_raw or "")
    qkey, akey = comparable_text(question), comparable_text(answer)
    if qkey and (qkey == akey or (normalise_yes_no(question) is not None and len(qkey.split()) <= 2)):
        return "no_question", f"the question cell repeats the answer ({question[:60]!r})"
    first_word = _first_word_lower(question)
    if declared == "yes_no" or (declared is None and yn is not None):
        if yn is not None:
            return QAPair(kind="yes_no", question=question, answer=yn)
        if is_undecided_answer(answer):
            return "bad_yes_no", f"a yes/no question answered {answer!r}"
        if declared == "yes_no" and (first_word in _WH or (first_word in _AUX and " or " in question.lower())):
            # typed yes/no but open: "Why is she ...?", "Is it in colour or black and white?"
            return QAPair(kind=_kind_of_open_question(question), question=question, answer=answer)
        if declared == "yes_no":
            return "bad_yes_no", f"a yes/no question answered {answer[:60]!r}"
    kind: QAKind = declared if declared in ("what", "how", "open") else _kind_of_open_question(question)
    if yn is not None and first_word in _AUX:
        return QAPair(kind="yes_no", question=question, answer=yn)
    return QAPair(kind=kind, question=question, answer=answer)


def parse_qa_text(text: str, *, default_kind: QAKind | None = None) -> QAParse:
    """The Q-A pairs of every markdown table in an LLM reply, and a problem for every row
    that gave none.

    ``default_kind`` is the question type of tables that do not say it (the released
    ``mc/`` tables are all multiple-choice). A heading above a table ("Yes/No questions")
    also sets its type.
    """
    out = QAParse()
    for table in find_tables(text):
        out.tables += 1
        roles = _header_roles(table.header) if table.header else None
        if roles is not None and not ({"question", "answer"} & set(roles)):
            roles = None
        hint = _kind_of_heading(table.context) or default_kind
        data_rows = [r for r in table.rows if any(cell_text(c) for c in r.cells)]
        if not data_rows:
            out.header_only += 1
            continue
        for row in data_rows:
            out.rows += 1
            cells = list(row.cells)
            if roles and len(cells) > len(roles):
                while len(cells) > len(roles) and not cells[-1].strip():
                    cells.pop()
            try:
                res = _qa_pair_of_row(_parse_row_fields(cells, roles), hint)
            except Exception as exc:  # noqa: BLE001 - one odd row never stops a table
                res = ("unreadable", f"{type(exc).__name__}: {exc}")
            if isinstance(res, QAPair):
                out.pairs.append(res)
                out.lines.append(row.line)
            else:
                out.problems.append(RowProblem(row.line, row.raw, res[0], res[1]))
    return out
