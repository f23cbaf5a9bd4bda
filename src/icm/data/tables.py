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

:func:`find_tables` is the generic layer (blocks of rows with an optional header);
:func:`parse_qa_text` turns a reply into :class:`~icm.data.records.QAPair` objects and a
:class:`RowProblem` for every data row it could not use, with a reason code of
:data:`icm.data.records.REASONS`. Nothing here is specific to one file or one model: the
parser maps columns by the header where the header fits the row, and by what each cell
looks like where it does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
    return [_cell_text(c).lower() for c in cells if c.strip()]


# --------------------------------------------------------------------------- cell text

_EMPH = re.compile(r"(\*\*|__|`)")
_BR = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:\(?\d{1,3}[\.\):]|Q\s*\d{1,3}\s*[\.\):]?|#\d{1,3})\s+", re.IGNORECASE)
_PLACEHOLDERS = {"", "-", "--", "---", "—", "–", ".", "..", "...", "…", "n/a", "na", "?", "tbd", "null"}
_YES_MARKS = "✓✔☑✅🗸"
_NO_MARKS = "✘✗✕×❌❎✖"
_MARKS_RE = re.compile(f"[{_YES_MARKS}{_NO_MARKS}\ufe0f]")


def _cell_text(cell: str) -> str:
    """Cell text without markdown emphasis, line breaks or surrounding space."""
    s = _BR.sub(" ", cell)
    s = _EMPH.sub("", s)
    s = s.replace("\u00a0", " ")
    return " ".join(s.split()).strip()


def _is_placeholder(cell: str) -> bool:
    return _cell_text(cell).lower() in _PLACEHOLDERS


def _strip_numbering(s: str) -> str:
    return _NUMBERING.sub("", s, count=1).strip()


# --------------------------------------------------------------------------- headers

_HEADER_WORDS = ("question", "answer", "type", "choice", "option", "kind", "category", "correct", "format")


def _looks_like_header(cells: list[str]) -> bool:
    """A first row without a separator is a header if it names columns and asks nothing."""
    words = [_cell_text(c).lower() for c in cells]
    if any(w.endswith("?") for w in words):
        return False
    hits = sum(any(h in w for h in _HEADER_WORDS) for w in words)
    return hits >= 2


def _column_role(cell: str, letters_present: set[str]) -> str:
    w = re.sub(r"[^a-z0-9#/ ]", "", _cell_text(cell).lower()).strip()
    m = re.fullmatch(r"(?:option|choice|answer option)?\s*([a-h])", w)
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
        m = re.fullmatch(r"(?:option|choice|answer option)?\s*([a-h])", re.sub(r"[^a-z ]", "", _cell_text(c).lower()).strip())
        if m:
            letters.add(m.group(1))
    return [_column_role(c, letters) for c in header]


# --------------------------------------------------------------------------- options

# "A.", "A)", "(A)", "[A]", "A}" (a typo in the released data), "A:", "A -"
_OPTION_CELL = re.compile(r"^\s*[(\[{]?([A-H])\s*(?:[\.\):\]}]\s*(?=\S)|\s+[-–—:]\s+|[\.\):\]}]\s*$)(.*)$", re.DOTALL)


def _parse_option_cell(cell: str) -> tuple[str, str] | None:
    """``("B", "text")`` for a cell holding one lettered option, else None."""
    m = _OPTION_CELL.match(_cell_text(cell))
    if not m or split_options(cell) is not None:
        return None  # not an option, or several options in one cell
    return m.group(1), m.group(2).strip()


def _option_letter_pattern(letter: str) -> re.Pattern[str]:
    # the letter, preceded by the start, a space, a separator or an opening bracket, and
    # followed by a delimiter: "A.", "A)", "(A)", "A:", "A -"
    return re.compile(
        rf"(?:(?<=^)|(?<=[\s,;/>]))[(\[{{]?{letter}\s*(?:[\.\):\]}}]|\s[-–—:](?=\s))"
    )


def split_options(cell: str) -> list[str] | None:
    """The option texts of a cell holding lettered options in order, or None.

    ``"A. Red B. Blue C. Green D. Black"`` -> ``["Red", "Blue", "Green", "Black"]``.
    Letters must run A, B, C, ... in order, which keeps "A dress" or "Plan B" inside an
    option's text from being taken for a marker.
    """
    s = _BR.sub("\n", cell)
    s = _EMPH.sub("", s).replace("\u00a0", " ")
    starts: list[tuple[int, int]] = []
    pos = 0
    for letter in "ABCDEFGH":
        m = _option_letter_pattern(letter).search(s, pos)
        if not m:
            break
        if letter == "A" and s[: m.start()].strip():
            return None  # text before the first option: not an options cell
        starts.append((m.start(), m.end()))
        pos = m.end()
    if len(starts) < 2:
        return None
    texts = []
    for i, (_, end) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else len(s)
        texts.append(" ".join(s[end:stop].split()).strip(" ,;"))
    if any(not t for t in texts):
        return None
    return texts


def _parse_spread_options(cells: list[str], start: int = 0) -> tuple[int, int, list[str]] | None:
    """The first run of cells holding options A, B, C, ... in order: (first, end, texts)."""
    for i in range(start, len(cells)):
        first = _parse_option_cell(cells[i])
        if not first or first[0] != "A" or not first[1]:
            continue
        texts = [first[1]]
        j = i + 1
        while j < len(cells):
            opt = _parse_option_cell(cells[j])
            if not opt or opt[0] != "ABCDEFGH"[len(texts)] or not opt[1]:
                break
            texts.append(opt[1])
            j += 1
        if len(texts) >= 2:
            return i, j, texts
    return None


# --------------------------------------------------------------------------- answers

_YES = {"yes", "y", "true", "correct", "yeah", "yep", "affirmative"}
_NO = {"no", "n", "false", "incorrect", "nope", "negative"}
_UNDECIDED = {"maybe", "unclear", "unknown", "possibly", "not sure", "uncertain", "cannot be determined",
              "can't be determined", "cannot tell", "it depends", "partially", "somewhat", "not clear"}
_FIRST_WORD = re.compile(r"^[\W_]*([A-Za-z]+)")


def normalise_yes_no(answer: str) -> str | None:
    """"Yes" / "No" for an answer that is one (✓, "Yes.", "no, she is not", "True"), else None."""
    raw = _cell_text(answer)
    if not raw:
        return None
    if raw[0] in _YES_MARKS or (raw and all(ch in _YES_MARKS + "\ufe0f " for ch in raw)):
        return "Yes"
    if raw[0] in _NO_MARKS or (raw and all(ch in _NO_MARKS + "\ufe0f " for ch in raw)):
        return "No"
    s = _MARKS_RE.sub(" ", raw).strip()
    s = _strip_numbering(s)
    m = _FIRST_WORD.match(s)
    if not m:
        return None
    word = m.group(1).lower()
    rest = s[m.end():].strip(" .!,;:")
    if word in _YES and (not rest or len(word) > 1):
        return "Yes"
    if word in _NO and (not rest or len(word) > 1):
        return "No"
    return None


def _is_undecided_answer(answer: str) -> bool:
    s = _cell_text(answer).lower().strip(" .!")
    return s in _UNDECIDED or any(s.startswith(u + " ") or s.startswith(u + ",") for u in _UNDECIDED)


_LETTER_ANSWER = [
    re.compile(r"^[(\[{]?([A-H])(?:[\.\):\]}]|\s+[-–—:]\s)"),  # "B.", "(B)", "B) text", "B - text"
    re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*[(\[]?([A-H])\b", re.IGNORECASE),
]


def _parse_choice_answer(answer: str, options: list[str]) -> int | None:
    """The index of the option an answer names; -1 for a letter beyond the options."""
    s = _strip_numbering(_MARKS_RE.sub(" ", _cell_text(answer)).strip())
    if not s:
        return None

    def by_letter(letter: str) -> int:
        idx = "ABCDEFGH".index(letter.upper())
        return idx if idx < len(options) else -1

    if re.fullmatch(r"[(\[{]?[a-hA-H][\.\)\]}]?", s):  # "B", "b.", "(B)"
        return by_letter(s.strip("([{.)]}"))
    key = _comparable_text(s)
    exact = [i for i, opt in enumerate(options) if _comparable_text(opt) == key]
    if len(exact) == 1:  # the option's text: "A dress" is option B's text, not the letter A
        return exact[0]
    for pat in _LETTER_ANSWER:
        m = pat.match(s)
        if m:
            return by_letter(m.group(1))
    m = re.match(r"^([A-H])\s+(.+)$", s)  # "B Gray leggings"
    if m and "ABCDEFGH".index(m.group(1)) < len(options) and _comparable_text(options["ABCDEFGH".index(m.group(1))]) == _comparable_text(m.group(2)):
        return by_letter(m.group(1))
    starts = [i for i, opt in enumerate(options) if _comparable_text(opt) and key.startswith(_comparable_text(opt))]
    if len(starts) == 1:
        return starts[0]
    return None


def _comparable_text(s: str) -> str:
    return re.sub(r"[\W_]+", " ", s.lower()).strip()


def _unmark_options(options: list[str]) -> tuple[list[str], int | None]:
    """Options without ✓/✘ marks, and the index of the one marked correct (if exactly one)."""
    correct = [i for i, o in enumerate(options) if any(m in o for m in _YES_MARKS) or "(correct)" in o.lower()]
    cleaned = [re.sub(r"\s*\((?:in)?correct\)", "", _MARKS_RE.sub("", o), flags=re.IGNORECASE).strip() for o in options]
    return cleaned, (correct[0] if len(correct) == 1 else None)


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
    w = re.sub(r"[^a-z0-9/ -]", "", _cell_text(cell).lower()).strip()
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
    m = _FIRST_WORD.match(s)
    return m.group(1).lower() if m else ""


def _parse_row_fields(cells: list[str], roles: list[str] | None) -> _RowFields:
    """Which cell is the type, the question, the options and the answer.

    Where the row has as many cells as the header and no spread options, the header
    says. Otherwise the options (a run of cells A, B, C, ... or one cell holding them)
    split the row: the type and question come before, the answer after; without
    options, the cell that asks (ends with "?") is the question and the answer follows.
    """
    f = _RowFields()
    run = _parse_spread_options(cells)
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
            f.stray = [c for c in after[:at] if not _is_placeholder(c)]
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
        if not _is_placeholder(cell):
            return i
    return len(after) - 1


def _split_at_question(cells: list[str], roles: list[str] | None, f: _RowFields) -> tuple[list[str], list[str]]:
    for i, cell in enumerate(cells):  # choices in one cell
        if split_options(cell) is not None:
            f.options_cell = cell
            return cells[:i], cells[i + 1:]
    for i, cell in enumerate(cells):  # the cell that asks
        if _cell_text(cell).endswith("?"):
            return cells[: i + 1], cells[i + 1:]
    if roles and "question" in roles and roles.index("question") < len(cells) - 1:
        qi = roles.index("question")
        return cells[: qi + 1], cells[qi + 1:]
    for i, cell in enumerate(cells[:-1]):
        if _first_word_lower(_cell_text(cell)) in _AUX | _WH and len(_cell_text(cell).split()) > 2:
            return cells[: i + 1], cells[i + 1:]
    return cells[:-1], cells[-1:]


def _parse_type_and_question(before: list[str]) -> tuple[str | None, str]:
    type_cell: str | None = None
    texts: list[str] = []
    for cell in before:
        c = _cell_text(cell)
        if not c or _is_placeholder(c) or re.fullmatch(r"#?\d{1,3}\.?", c):
            continue  # empty or a numbering column
        if type_cell is None and not texts and len(c.split()) <= 3 and not c.endswith("?") and _kind_of_type_cell(c):
            type_cell = c
            continue
        texts.append(c)
    asking = [t for t in texts if t.endswith("?")]
    return type_cell, (asking[0] if asking else (texts[-1] if texts else ""))


def _qa_pair_of_row(fields: _RowFields, hint: QAKind | None) -> QAPair | tuple[str, str]:
    """A Q-A pair, or ``(reason, detail)``."""
    question = _strip_numbering(_cell_text(fields.question))
    answer_raw = fields.answer
    answer = _strip_numbering(_cell_text(answer_raw or ""))
    declared = _kind_of_type_cell(fields.type) or hint

    options = fields.options
    if options is None and fields.options_cell is not None and not _is_placeholder(fields.options_cell):
        options = split_options(fields.options_cell)
        if options is None:
            return "bad_choices", f"the choices cell has no lettered options A, B, ...: {_cell_text(fields.options_cell)[:80]!r}"
    if not question or _is_placeholder(question):
        return "no_question", "the question cell is empty"
    if options and fields.stray:
        return "bad_choices", f"cells between the options and the answer: {', '.join(repr(_cell_text(c)[:40]) for c in fields.stray)}"
    if options:
        options = [_cell_text(o) for o in options]
        options, marked = _unmark_options(options)
        if any(not o for o in options):
            return "bad_choices", "an option is empty"
        idx: int | None
        if answer and not _is_placeholder(answer):
            idx = _parse_choice_answer(answer, options)
            if (idx is None or idx < 0) and marked is not None and not answer.strip(_YES_MARKS + "\ufe0f "):
                idx = marked
        else:
            idx = marked
            if idx is None:
                return "no_answer", "the multiple-choice question has no answer"
        if idx is None:
            return "bad_choice_answer", f"the answer {answer!r} names none of the {len(options)} options"
        if idx < 0:
            return "bad_choice_answer", f"the answer {answer!r} names a letter beyond the {len(options)} options"
        letter = "ABCDEFGH"[idx]
        return QAPair(kind="choice", question=question, answer=letter, choices=options, answer_index=idx)

    if declared == "choice":
        return "bad_choices", "a multiple-choice question without options"
    if answer_raw is None or _is_placeholder(answer):
        if not answer and answer_raw is not None and any(m in answer_raw for m in _YES_MARKS + _NO_MARKS):
            pass
        else:
            return "no_answer", "the answer cell is missing or empty"
    yn = normalise_yes_no(answer_raw or "")
    qkey, akey = _comparable_text(question), _comparable_text(answer)
    if qkey and (qkey == akey or (normalise_yes_no(question) is not None and len(qkey.split()) <= 2)):
        return "no_question", f"the question cell repeats the answer ({question[:60]!r})"
    first_word = _first_word_lower(question)
    if declared == "yes_no" or (declared is None and yn is not None):
        if yn is not None:
            return QAPair(kind="yes_no", question=question, answer=yn)
        if _is_undecided_answer(answer):
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
        data_rows = [r for r in table.rows if any(_cell_text(c) for c in r.cells)]
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
