"""Quality control of generated text: verdict extraction and the paper's filters.

The ICM-Assistant paper drops generated explanations that refuse, speak in the first
person, or whose verdict is missing or contradicts the image's rule-derived label. This
module implements those filters, plus a few every generation run meets (empty, cut off,
too short, both verdicts at once), each with a reason code of
:data:`icm.data.records.REASONS`.

Verdict extraction reads what a text says about the term ("The image is not sexy
because ...") and is deliberately conservative: a statement about the image itself
("the image / this picture / it ... is (not) <term>") is strong evidence; other mentions
("a sexy atmosphere", "rather than sexy") are weak and only decide when no strong
statement exists and all of them agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ALL_FILTERS",
    "DEFAULT_FILTERS",
    "Finding",
    "Verdict",
    "check_description",
    "check_explanation",
    "extract_verdict",
    "first_person",
    "is_refusal",
    "statement_verdict",
]

ALL_FILTERS: tuple[str, ...] = (
    "empty", "refusal", "first_person", "no_verdict", "contradiction", "mixed_verdict", "truncated", "too_short",
)
DEFAULT_FILTERS: tuple[str, ...] = ALL_FILTERS


@dataclass(frozen=True)
class Finding:
    reason: str
    detail: str


@dataclass(frozen=True)
class Verdict:
    """What a text says about the term: True (it is), False (it is not), None (no say)."""

    label: bool | None
    evidence: str | None = None
    strong: bool = False
    mixed: bool = False
    """Statements of both kinds at the deciding level."""


# --------------------------------------------------------------------------- refusals

_REFUSAL = re.compile(
    r"\b(?:I(?:'m| am)\s+(?:sorry|unable|not able)|I\s+(?:cannot|can(?:no|')t|won't|will not)\s+"
    r"(?:help|assist|provide|describe|answer|comply|fulfil|fulfill|view|see|analy[sz]e|determine|make|do|identify|comment|judge)"
    r"|I\s+apologi[sz]e|as an AI\b|as a language model|I(?:'d| would) be (?:happy|glad) to help"
    r"|what (?:are|is) your questions?\b|(?:cannot|can't|unable to) (?:view|see|access|open) (?:the |this |any )?images?"
    r"|no image (?:was |has been )?(?:provided|attached|uploaded)|(?:I'm|I am) not comfortable"
    r"|not (?:able|allowed|permitted) to (?:help|assist|provide|describe|answer|comply)"
    r"|against (?:my|the) (?:guidelines|policy|policies)|(?:cannot|can't) (?:assist|help) with (?:that|this))",
    re.IGNORECASE,
)


def is_refusal(text: str) -> str | None:
    """The refusing phrase, if the text refuses or does not answer."""
    m = _REFUSAL.search(text or "")
    return m.group(0) if m else None


# --------------------------------------------------------------------------- first person

_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|‘[^’]*’|«[^»]*»|「[^」]*」|(?<!\w)'[^'\n]{1,200}'(?!\w)")
# Singular only: the model speaking as itself ("I think", "my analysis"). The generic
# "giving us a view of her back" is common in good descriptions and is not filtered.
_FIRST_PERSON = re.compile(r"\b(?:I|I'm|I've|I'd|I'll|me|my|mine|myself)\b", re.IGNORECASE)
# "mine" is the pronoun after these words only ("a view of mine", "the choice is mine")
_MINE_POSSESSIVE = frozenset({"of", "is", "was", "are", "were", "be"})


def first_person(text: str) -> str | None:
    """The first-person singular word the text uses outside quotations (text shown in an
    image is often quoted), or None. "I" is matched in upper case only."""
    bare = _QUOTED.sub(" ", text or "")
    for m in _FIRST_PERSON.finditer(bare):
        word = m.group(0)
        if word.lower() in ("i", "i'm", "i've", "i'd", "i'll") and not word.startswith("I"):
            continue
        if word.lower() == "mine" and (bare[: m.start()].split()[-1:] or [""])[0].lower() not in _MINE_POSSESSIVE:
            continue  # the noun: "a land mine", "a bomb or mine", "the coal mine"
        if word == "I" and bare[m.end(): m.end() + 1] == "." and bare[max(0, m.start() - 1): m.start()] in (" ", ""):
            # "World War I." / "Part I." read as numerals only when capitalised words precede
            prev = bare[: m.start()].split()[-1:] or [""]
            if prev[0][:1].isupper():
                continue
        return word
    return None


# --------------------------------------------------------------------------- verdicts

_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|$)")
_CLAUSE_SPLIT = re.compile(r"[;,:]|\s(?:but|while|whereas|although|though|however|yet|and)\s", re.IGNORECASE)
_SUBJECT = re.compile(
    r"\b(?:the|this|that)\s+(?:(?:whole|overall|entire|given)\s+)?(?:image|picture|photo|photograph|scene|content|pic|frame|shot|artwork)\b"
    r"|^\s*(?:it|this)\b",
    re.IGNORECASE,
)
_NEGATION = re.compile(
    r"\b(?:not|no|never|neither|nor|hardly|barely|cannot|lacks?|lacking|without|isn't|aren't|wasn't|doesn't|don't|"
    r"didn't|can't|couldn't|wouldn't|shouldn't|won't|rather than|instead of|far from|free of|devoid of|absence of|"
    r"nothing|none|prevents?|preventing|unlikely|less likely|inappropriate to|difficult to|hard to|challenging to|"
    r"lack of|free from|absent|avoids?)\b|n't\b",
    re.IGNORECASE,
)


# Between the subject and the term, these words mean the term describes something else
# ("the image shows a sexy pose", "the image of a woman who is sexy").
_NOT_ABOUT_IMAGE = re.compile(
    r"\b(?:who|which|where|whose|with|by|in|on|of|has|have|had|shows?|showing|contains?|features?|depicts?|"
    r"portrays?|displays?|captures?|includes?|presents?)\b",
    re.IGNORECASE,
)


def _term_pattern(term: str, aliases: Iterable[str] = ()) -> re.Pattern[str]:
    words = [term, *aliases]
    alts = "|".join(re.escape(w.replace("_", " ").replace("-", " ")).replace(r"\ ", r"[\s_-]+") for w in words if w)
    return re.compile(rf"(?<![\w-])(non[\s-]+)?(?:{alts})(?![\w-])", re.IGNORECASE)


def _clauses(sentence: str) -> list[str]:
    parts, pos = [], 0
    for m in _CLAUSE_SPLIT.finditer(sentence):
        parts.append(sentence[pos: m.start()])
        pos = m.end()
    parts.append(sentence[pos:])
    return [p for p in parts if p.strip()]


def extract_verdict(text: str, term: str, *, aliases: Sequence[str] = ()) -> Verdict:
    """Whether ``text`` says the image is ``term`` (see the module docstring)."""
    pat = _term_pattern(term, aliases)
    strong: list[tuple[bool, str]] = []
    weak: list[tuple[bool, str]] = []
    for sm in _SENTENCE.finditer(text or ""):
        sentence = sm.group(0).strip()
        if not pat.search(sentence):
            continue
        for clause in _clauses(sentence):
            for m in pat.finditer(clause):
                before = clause[: m.start()]
                subj = next(reversed(list(_SUBJECT.finditer(before))), None)  # the last subject before the term
                gap = before[subj.end():] if subj is not None else None
                if gap is not None and len(gap.split()) <= 8 and not _NOT_ABOUT_IMAGE.search(gap):
                    # "not" between the subject and the term, or before the subject in the
                    # same clause ("nothing makes the image sexy", "prevents the image from")
                    negated = bool(m.group(1)) or bool(_NEGATION.search(before))
                    strong.append((not negated, sentence))
                else:
                    negated = bool(m.group(1)) or bool(_NEGATION.search(before))
                    weak.append((not negated, sentence))
                break  # one reading per clause
    for level, is_strong in ((strong, True), (weak, False)):
        if not level:
            continue
        labels = {label for label, _ in level}
        if len(labels) == 1:
            return Verdict(level[0][0], level[0][1], strong=is_strong)
        if is_strong:
            return Verdict(level[0][0], level[0][1], strong=True, mixed=True)
        return Verdict(None, level[0][1], strong=False, mixed=True)
    return Verdict(None)


def statement_verdict(text: str, positive: str, negative: str) -> Verdict:
    """The verdict of a text that opens with one of the term's verdict statements
    (:attr:`icm.policy.model.Term.positive_statement` / ``negative_statement``), as the
    generation prompts ask: "The image shows a weapon, because ..." says yes although the
    term's id ("weapons") is never written. Case and spacing are ignored; the statement
    must end at a word boundary ("... a weapon" does not open "... a weaponless room")."""
    t = " ".join((text or "").split()).lstrip("*_ ").lower()
    for label, statement in ((False, negative), (True, positive)):
        s = " ".join(statement.split()).rstrip(". ").lower()
        if s and t.startswith(s) and (len(t) == len(s) or not (t[len(s)].isalnum() or t[len(s)] in "-_")):
            first = next(iter(_SENTENCE.findall(text.strip())), text.strip())
            return Verdict(label, first.strip(), strong=True)
    return Verdict(None)


# --------------------------------------------------------------------------- filters

_TERMINAL = re.compile(r"[.!?…)\]\"'”’*]\s*$")


def _basic(text: str, *, min_words: int) -> list[Finding]:
    t = (text or "").strip()
    if not t:
        return [Finding("empty", "the model returned no text")]
    out: list[Finding] = []
    phrase = is_refusal(t)
    if phrase:
        out.append(Finding("refusal", f"refuses or does not answer: {phrase!r}"))
    fp = first_person(t)
    if fp and not phrase:
        out.append(Finding("first_person", f"speaks in the first person ({fp!r})"))
    n = len(t.split())
    if n < min_words:
        out.append(Finding("too_short", f"{n} words (fewer than {min_words})"))
    if not _TERMINAL.search(t):
        out.append(Finding("truncated", f"stops mid-sentence: ...{t[-40:]!r}"))
    return out


def check_description(text: str, *, min_words: int = 8, filters: Iterable[str] = DEFAULT_FILTERS) -> list[Finding]:
    """Findings for an explicit or implicit description (no verdict is expected)."""
    wanted = set(filters)
    return [f for f in _basic(text, min_words=min_words) if f.reason in wanted]


def check_explanation(
    text: str,
    term: str,
    expected: bool | None,
    *,
    aliases: Sequence[str] = (),
    statements: tuple[str, str] | None = None,
    min_words: int = 12,
    filters: Iterable[str] = DEFAULT_FILTERS,
) -> tuple[Verdict, list[Finding]]:
    """The explanation's verdict and its findings: the basic ones, a missing verdict, a
    verdict contradicting ``expected`` (the product's truth) and a mixed one.

    ``statements`` (the term's positive and negative statements): when the term's word
    gives no verdict, an explanation that opens with one of them has that verdict
    (:func:`statement_verdict`)."""
    wanted = set(filters)
    findings = _basic(text, min_words=min_words)
    verdict = extract_verdict(text, term, aliases=aliases)
    if verdict.label is None and not verdict.mixed and statements is not None:
        verdict = statement_verdict(text, *statements)
    refused = any(f.reason in ("refusal", "empty") for f in findings)
    if not refused:
        if verdict.label is None:
            if verdict.mixed:
                findings.append(Finding("mixed_verdict", f"says both that the image is and is not {term}"))
            else:
                findings.append(Finding("no_verdict", f"never says whether the image is {term}"))
        else:
            if verdict.mixed:
                findings.append(Finding("mixed_verdict", f"says both that the image is and is not {term}; first: {verdict.evidence!r}"))
            if expected is not None and verdict.label != expected:
                said = term if verdict.label else f"not {term}"
                truth = term if expected else f"not {term}"
                findings.append(Finding("contradiction", f"says the image is {said}, its product is {truth}: {verdict.evidence!r}"))
    return verdict, [f for f in findings if f.reason in wanted]
