"""Options and answers in Q-A table cells: lettered choices, letter or text answers, yes/no.

Choices in one cell (``A. x B. y C. z D. w``, ``(A) x, (B) y``, ``A) x<br>B) y``) or one
per cell, option letters written ``A.``, ``A)``, ``A:``, ``A -``, ``(A)`` or ``A.text``;
answers as ``B.``, ``(B)``, ``Option B``, ``B. the option text``, the option text alone,
a ✓ on the correct option; yes/no answers as ``Yes.``, ``✓``, ``✘``, ``Y``, ``True``. The
letters an option may carry are :data:`OPTION_LETTERS`, here only.
"""

from __future__ import annotations

import re

from icm.data.md_tables import _BR, _EMPH, cell_text, strip_numbering

__all__ = [
    "FIRST_WORD", "NO_MARKS", "OPTION_HEADER", "OPTION_LETTERS", "YES_MARKS", "comparable_text", "is_undecided_answer",
    "normalise_yes_no", "parse_choice_answer", "parse_spread_options", "split_options", "unmark_options",
]

OPTION_LETTERS = "ABCDEFGH"
"""The letters of a question's options, in order (the released tables use A-D; some models write more)."""
_LETTER = f"[{OPTION_LETTERS[0]}-{OPTION_LETTERS[-1]}]"  # one option letter in a pattern: [A-H]
_LETTER_ANY_CASE = f"[{OPTION_LETTERS[0]}-{OPTION_LETTERS[-1]}{OPTION_LETTERS[0].lower()}-{OPTION_LETTERS[-1].lower()}]"
OPTION_HEADER = re.compile(r"(?:option|choice|answer option)?\s*(" + _LETTER.lower() + ")")
"""A header cell that names one option's column ("B", "option b"), lower-cased: its letter."""

YES_MARKS = "✓✔☑✅🗸"
NO_MARKS = "✘✗✕×❌❎✖"
MARKS_RE = re.compile(f"[{YES_MARKS}{NO_MARKS}\ufe0f]")


# --------------------------------------------------------------------------- options

# "A.", "A)", "(A)", "[A]", "A}" (a typo in the released data), "A:", "A -"
_OPTION_CELL = re.compile(r"^\s*[(\[{]?(" + _LETTER + r")\s*(?:[\.\):\]}]\s*(?=\S)|\s+[-–—:]\s+|[\.\):\]}]\s*$)(.*)$", re.DOTALL)


def parse_option_cell(cell: str) -> tuple[str, str] | None:
    """``("B", "text")`` for a cell holding one lettered option, else None."""
    m = _OPTION_CELL.match(cell_text(cell))
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
    for letter in OPTION_LETTERS:
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


def parse_spread_options(cells: list[str], start: int = 0) -> tuple[int, int, list[str]] | None:
    """The first run of cells holding options A, B, C, ... in order: (first, end, texts)."""
    for i in range(start, len(cells)):
        first = parse_option_cell(cells[i])
        if not first or first[0] != "A" or not first[1]:
            continue
        texts = [first[1]]
        j = i + 1
        while j < len(cells):
            opt = parse_option_cell(cells[j])
            if not opt or opt[0] != OPTION_LETTERS[len(texts)] or not opt[1]:
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
FIRST_WORD = re.compile(r"^[\W_]*([A-Za-z]+)")


def normalise_yes_no(answer: str) -> str | None:
    """"Yes" / "No" for an answer that is one (✓, "Yes.", "no, she is not", "True"), else None."""
    raw = cell_text(answer)
    if not raw:
        return None
    if raw[0] in YES_MARKS or (raw and all(ch in YES_MARKS + "\ufe0f " for ch in raw)):
        return "Yes"
    if raw[0] in NO_MARKS or (raw and all(ch in NO_MARKS + "\ufe0f " for ch in raw)):
        return "No"
    s = MARKS_RE.sub(" ", raw).strip()
    s = strip_numbering(s)
    m = FIRST_WORD.match(s)
    if not m:
        return None
    word = m.group(1).lower()
    rest = s[m.end():].strip(" .!,;:")
    if word in _YES and (not rest or len(word) > 1):
        return "Yes"
    if word in _NO and (not rest or len(word) > 1):
        return "No"
    return None


def is_undecided_answer(answer: str) -> bool:
    s = cell_text(answer).lower().strip(" .!")
    return s in _UNDECIDED or any(s.startswith(u + " ") or s.startswith(u + ",") for u in _UNDECIDED)


_LETTER_ANSWER = [
    re.compile(r"^[(\[{]?(" + _LETTER + r")(?:[\.\):\]}]|\s+[-–—:]\s)"),  # "B.", "(B)", "B) text", "B - text"
    re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*[(\[]?(" + _LETTER + r")\b", re.IGNORECASE),
]


def parse_choice_answer(answer: str, options: list[str]) -> int | None:
    """The index of the option an answer names; -1 for a letter beyond the options."""
    s = strip_numbering(MARKS_RE.sub(" ", cell_text(answer)).strip())
    if not s:
        return None

    def by_letter(letter: str) -> int:
        idx = OPTION_LETTERS.index(letter.upper())
        return idx if idx < len(options) else -1

    if re.fullmatch(r"[(\[{]?" + _LETTER_ANY_CASE + r"[\.\)\]}]?", s):  # "B", "b.", "(B)"
        return by_letter(s.strip("([{.)]}"))
    key = comparable_text(s)
    exact = [i for i, opt in enumerate(options) if comparable_text(opt) == key]
    if len(exact) == 1:  # the option's text: "A dress" is option B's text, not the letter A
        return exact[0]
    for pat in _LETTER_ANSWER:
        m = pat.match(s)
        if m:
            return by_letter(m.group(1))
    m = re.match(r"^(" + _LETTER + r")\s+(.+)$", s)  # "B Gray leggings"
    if m and OPTION_LETTERS.index(m.group(1)) < len(options) and comparable_text(options[OPTION_LETTERS.index(m.group(1))]) == comparable_text(m.group(2)):
        return by_letter(m.group(1))
    starts = [i for i, opt in enumerate(options) if comparable_text(opt) and key.startswith(comparable_text(opt))]
    if len(starts) == 1:
        return starts[0]
    return None


def comparable_text(s: str) -> str:
    return re.sub(r"[\W_]+", " ", s.lower()).strip()


def unmark_options(options: list[str]) -> tuple[list[str], int | None]:
    """Options without ✓/✘ marks, and the index of the one marked correct (if exactly one)."""
    correct = [i for i, o in enumerate(options) if any(m in o for m in YES_MARKS) or "(correct)" in o.lower()]
    cleaned = [re.sub(r"\s*\((?:in)?correct\)", "", MARKS_RE.sub("", o), flags=re.IGNORECASE).strip() for o in options]
    return cleaned, (correct[0] if len(correct) == 1 else None)
