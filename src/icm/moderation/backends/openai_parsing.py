"""Reading a chat completion as a moderation answer: pure functions, no I/O.

Probabilities follow the paper's protocol as closely as an HTTP API allows: P(Yes) is the
softmax over the log-probabilities of the "Yes" and "No" variants among the first
token's top candidates (:func:`yes_no_from_logprobs`; option labels likewise,
:func:`choice_from_logprobs`), a label missing from the top-k list imputed at the
largest value the list allows.  That softmax is only an answer when the labels hold at
least ``min_label_mass`` of the first token's probability: a model whose first token is
"I" (of "I'm sorry, but I can't help with that.") has not answered Yes or No, however
the two tiny remaining shares compare.  Otherwise, and for servers that return no
logprobs, the answer text is read: a refusal is ``refused``, a clear answer ("Yes",
"B. Because ...", "The answer is (B).", "Answer: B") is used with ``source="text"``
(``"guided"`` when the server constrained it), anything else is ``off-format``; it is
never guessed at.  One sampled answer is not a probability of 0 or 1: the label it names
gets ``text_confidence`` (default
:data:`~icm.moderation.backends.base.DEFAULT_TEXT_CONFIDENCE`), the other labels share
the rest.  :func:`read_answer` applies all of this to one response.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from icm.moderation.backends.base import (
    DEFAULT_TEXT_CONFIDENCE,
    REFUSAL_FIRST_WORDS,
    UNOFFERED,
    Choice,
    NotJudged,
    YesNoScore,
    unoffered_detail,
)

__all__ = [
    "choice_from_logprobs",
    "first_token_candidates",
    "is_refusal",
    "parse_choice_text",
    "parse_yes_no_text",
    "read_answer",
    "refused_or_off_format",
    "text_distribution",
    "unoffered_label_text",
    "unoffered_letters",
    "yes_no_from_logprobs",
]


# --------------------------------------------------------------------------- logprobs

# Characters a tokenizer or a model may put around an answer token: leading spaces
# (" Yes"), byte-level/sentencepiece space markers, punctuation ("Yes.", "(A").
_TOKEN_STRIP = " \t\r\n.,!?:;\"'`*()[]{}<>_-"


def _norm_token(token: str) -> str:
    token = token.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n")
    return token.strip(_TOKEN_STRIP)


def _logsumexp(values: Sequence[float]) -> float:
    if not values:
        return -math.inf
    m = max(values)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(v - m) for v in values))


def _get(obj: Any, name: str) -> Any:
    """``obj[name]`` for dicts, else the attribute (the SDK's typed models), else an extra field."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    value = getattr(obj, name, None)
    if value is None:
        value = (getattr(obj, "model_extra", None) or {}).get(name)
    return value


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _blank(token: Any) -> bool:
    """A generated token that is whitespace only (" ", "\u0120", "\u2581", a newline)."""
    return isinstance(token, str) and not token.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n").strip()


def first_token_candidates(logprobs: Any) -> list[tuple[str, float]] | None:
    """``(token, logprob)`` candidates for the first generated token, or None.

    Reads the chat format (``logprobs.content[0].top_logprobs``, as vLLM, SGLang and
    OpenAI return it; the SDK's typed ``ChoiceLogprobs`` or a plain dict) and the legacy
    completions format (``logprobs.top_logprobs[0]`` a ``{token: logprob}`` dict).  The
    sampled token is added when the top list lacks it.  A whitespace-only first token
    followed by another is skipped: the server's generation prompt lacks the reply lead
    (:func:`icm.prompting.reply_lead`) and its model writes that first, then the answer.
    """
    if logprobs is None or isinstance(logprobs, (str, int, float, list)):
        return None
    out: list[tuple[str, float]] = []
    content = _get(logprobs, "content")
    legacy_top = _get(logprobs, "top_logprobs")
    if isinstance(content, list) and content:
        first = content[0]
        if len(content) > 1 and _blank(_get(first, "token")):
            first = content[1]  # the reply lead the server's prompt lacks: the answer is the next token
        for entry in _get(first, "top_logprobs") or []:
            tok, lp = _get(entry, "token"), _get(entry, "logprob")
            if isinstance(tok, str) and _num(lp):
                out.append((tok, float(lp)))
        tok, lp = _get(first, "token"), _get(first, "logprob")
        if isinstance(tok, str) and _num(lp) and tok not in {t for t, _ in out}:
            out.append((tok, float(lp)))
    elif isinstance(legacy_top, list) and legacy_top:
        tokens, lps = _get(logprobs, "tokens") or [], _get(logprobs, "token_logprobs") or []
        k = 1 if len(legacy_top) > 1 and tokens and _blank(tokens[0]) else 0
        first_top = legacy_top[k] if isinstance(legacy_top[k], dict) else {}
        out = [(t, float(v)) for t, v in first_top.items() if _num(v)]
        if len(tokens) > k and len(lps) > k and _num(lps[k]) and tokens[k] not in first_top:
            out.append((tokens[k], float(lps[k])))
    return out or None


def _distribution(
    candidates: Sequence[tuple[str, float]], labels: Sequence[str], match: Callable[[str], str | None]
) -> tuple[list[float], dict[str, Any]] | None:
    """Softmax over ``labels`` from first-token candidates; None if no label is present.

    The probability mass of every variant of a label (" Yes", "YES", "Yes.") is summed.
    A label absent from the list was not among the top candidates, so its logprob is at
    most the smallest listed one, and all absent labels together hold at most the mass
    the list leaves over.  Each absent label is given
    ``min(smallest listed logprob, log(unlisted mass / number absent))``: the largest
    value consistent with the list, so the result is never more confident than the
    server's numbers support.
    """
    per_label: dict[str, list[float]] = {label: [] for label in labels}
    for tok, lp in candidates:
        label = match(tok)
        if label is not None and label in per_label:
            per_label[label].append(lp)
    present = {k: _logsumexp(v) for k, v in per_label.items() if v}
    present = {k: v for k, v in present.items() if v > -math.inf}
    if not present:
        return None
    missing = [label for label in labels if label not in present]
    imputed: float | None = None
    if missing:
        listed = [lp for _, lp in candidates]
        leftover = 1.0 - sum(math.exp(lp) for lp in listed)
        leftover_lp = math.log(max(leftover, 1e-300) / len(missing))
        imputed = min(min(listed), leftover_lp)
    logps = [present.get(label, imputed if imputed is not None else -math.inf) for label in labels]
    norm = _logsumexp(logps)
    probs = [math.exp(lp - norm) for lp in logps]
    raw: dict[str, Any] = {
        "logprobs": {k: present[k] for k in labels if k in present},
        "label_mass": math.exp(_logsumexp(list(present.values()))),
    }
    if missing:
        raw["imputed"] = {"labels": missing, "logprob": imputed}
    return probs, raw


def _match_yes_no(token: str) -> str | None:
    t = _norm_token(token).lower()
    return t if t in ("yes", "no") else None


def yes_no_from_logprobs(candidates: Sequence[tuple[str, float]]) -> tuple[float, dict[str, Any]] | None:
    """P(Yes) from first-token ``(token, logprob)`` candidates; None if neither side is listed.

    ``P(Yes) = sum_yes / (sum_yes + sum_no)`` over the case/space/punctuation variants of
    "Yes" and "No" (a two-way softmax on their summed log-probabilities); a side missing
    from the list is imputed as described in :func:`_distribution`.  ``raw["label_mass"]``
    is the probability the listed Yes/No variants hold together: the caller decides
    whether that is enough to be an answer.
    """
    res = _distribution(candidates, ["yes", "no"], _match_yes_no)
    if res is None:
        return None
    probs, raw = res
    return probs[0], raw


def choice_from_logprobs(
    candidates: Sequence[tuple[str, float]], letters: Sequence[str]
) -> tuple[list[float], dict[str, Any]] | None:
    """A distribution over option ``letters`` from first-token candidates; None if none is listed.

    Labels match in upper case only (" B", "B.", "(B"): lower-case single letters are
    more often words or abbreviations ("a", "e.g.") than answers.  ``raw["label_mass"]``
    is the probability the listed labels hold together.
    """

    def match(token: str) -> str | None:
        t = _norm_token(token)
        return t if len(t) == 1 else None

    return _distribution(candidates, list(letters), match)


def unoffered_letters(candidates: Sequence[tuple[str, float]], letters: Sequence[str]) -> dict[str, float]:
    """Probability of each upper-case letter A-Z among the candidates that is not one of ``letters``
    (variants summed: " A", "A.", "(A"); "I" counts as the letter I here."""
    per: dict[str, list[float]] = {}
    for tok, lp in candidates:
        t = _norm_token(tok)
        if len(t) == 1 and "A" <= t <= "Z" and t not in letters:
            per.setdefault(t, []).append(lp)
    return {k: math.exp(_logsumexp(v)) for k, v in per.items()}


# --------------------------------------------------------------------------- answer text

# How models decline. Matched anywhere in the first sentence or two of an answer (case
# and curly apostrophes ignored), so "I'm sorry, but ...", "Sorry, I can't ...", "As an
# AI, I cannot ...", "I cannot assist with that request." and "Unfortunately, I'm unable
# to ..." all count.
_REFUSAL_RE = re.compile(
    r"\b(?:"
    r"i'?m sorry|i am sorry|sorry, (?:but )?i|i apologi[sz]e|my apologies"
    r"|i (?:can ?not|can't|won't|will not|am unable|'m unable|am not able|'m not able|must decline|do not feel comfortable|don't feel comfortable)"
    r"|i'm unable|i'm not able|unable to (?:help|assist|comply|provide|answer|determine|analy[sz]e|evaluate)"
    r"|(?:can't|cannot|can not|won't) (?:help|assist|comply|provide|answer|do that|fulfil)"
    r"|as an ai\b|as a language model|not (?:able|comfortable|permitted|allowed) to"
    r"|against (?:my|the) (?:guidelines|policy|policies)"
    r")",
    re.IGNORECASE,
)


def is_refusal(text: str | None) -> bool:
    """Whether an answer declines to answer ("I'm sorry, but I can't help with that.")."""
    if not text:
        return False
    t = text.replace("\u2019", "'").replace("\u2018", "'")[:300]
    return bool(_REFUSAL_RE.search(t))


def refused_or_off_format(text: str | None, top_token: str | None) -> str:
    """``refused`` when the text (or, with one generated token, that token) declines."""
    if is_refusal(text):
        return "refused"
    words = re.findall(r"[A-Za-z']+", text or "")
    first = (words[0] if words else _norm_token(top_token or "")).lower()
    if len(words) <= 1 and first in REFUSAL_FIRST_WORDS:  # only one token generated: judge by it
        return "refused"
    return "off-format"


# The answer is at the start, or after an "answer is" / "Answer:" lead-in, possibly in
# brackets or bold: "B", "(B)", "**B**", "B. Because ...", "The answer is (B).",
# "Answer: B", "The correct option is B".
_LEAD_IN = r"(?:(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*(?:option\s+)?)?"
_YES_NO_RE = re.compile(r"^[\W_]*" + _LEAD_IN + r"[\W_]*(yes|no)\b", re.IGNORECASE)
_LABEL_RE = re.compile(r"^[\W_]*" + _LEAD_IN + r"[\W_]*([A-Z])(?![A-Za-z0-9'])", re.IGNORECASE)


def parse_yes_no_text(text: str) -> bool | None:
    """True/False for an answer that says yes or no first, else None.

    Reads "Yes", "yes, the image ...", "**No**.", "The answer is yes.", "Answer: No";
    not "None of them", "I'm sorry" or "Not sure".
    """
    m = _YES_NO_RE.match(text or "")
    return None if m is None else m.group(1).lower() == "yes"


_BARE_LABEL_RE = re.compile(r"^[\W_]*" + _LEAD_IN + r"[\W_]*([A-Z])(?:[.):\]*]|\s*$)", re.IGNORECASE)


def unoffered_label_text(text: str | None, letters: Sequence[str]) -> str | None:
    """The letter an answer gives when it is a label the question did not offer, else None.

    Only a letter standing as a label counts ("A", "I.", "(A)", "The answer is A.",
    "I. Buttocks"), not a word ("A cat", "I think"), and only in upper case.
    """
    m = _BARE_LABEL_RE.match((text or "").strip())
    if m is None or not m.group(1).isupper() or m.group(1) in letters:
        return None
    return m.group(1)


def parse_choice_text(text: str, letters: Sequence[str], options: Sequence[str] | None = None) -> int | None:
    """The index of the option an answer names first, else None.

    Reads an upper-case label at the start or after an "answer is" lead-in ("B",
    " (B)", "B. Because ...", "The answer is (B).", "Answer: B"), or, with ``options``,
    an answer that is exactly one option's text ("Partial exposure.").  A label in
    lower case counts only after a lead-in ("answer: b"); a label that is not one of
    ``letters`` is not an answer.
    """
    t = (text or "").strip()
    m = _LABEL_RE.match(t)
    if m is not None:
        label = m.group(1)
        led_in = bool(m.group(0)[: m.start(1)].strip(" \t\r\n*_([{\"'`"))
        if (label.isupper() or led_in) and label.upper() in letters:
            return list(letters).index(label.upper())
    if options:
        bare = re.sub(r"[\W_]+", " ", t).strip().lower()
        hits = [i for i, o in enumerate(options) if re.sub(r"[\W_]+", " ", o).strip().lower() == bare]
        if len(hits) == 1:
            return hits[0]
    return None




def text_distribution(index: int, n: int, confidence: float) -> list[float]:
    """The probabilities one answer read from text gives ``n`` labels: ``confidence`` to the
    label at ``index``, the rest shared evenly by the others (``[c, 1 - c]`` for Yes/No)."""
    if not 0.5 <= confidence <= 1.0:
        raise ValueError(f"text_confidence must be between 0.5 and 1, got {confidence}")
    if n < 2:
        return [1.0]
    rest = (1.0 - confidence) / (n - 1)
    return [confidence if j == index else rest for j in range(n)]


def read_answer(
    text: str | None,
    logprobs: Any,
    *,
    labels: Sequence[str] | None,
    options: Sequence[str] = (),
    guided: bool = False,
    min_label_mass: float,
    logprobs_asked: bool = True,
    text_confidence: float = DEFAULT_TEXT_CONFIDENCE,
) -> tuple[YesNoScore | Choice | NotJudged, bool]:
    """One response read as an answer: ``(answer, read_from_text)``.

    ``labels`` None is a yes/no question, else the option labels (``options`` their
    texts).  ``guided``: the server was asked to constrain the answer to the labels, so
    its text says nothing when the logprobs show the model wanted to say something else.
    ``read_from_text`` is True when the answer came from the text (``source`` ``"text"``,
    or ``"guided"``; counted by callers as a parsed fallback): the label it names gets
    ``text_confidence``, never 1 (see :func:`text_distribution`).
    """
    yes_no = labels is None
    valid = ["Yes", "No"] if yes_no else list(labels or [])
    text = text if isinstance(text, str) else None
    candidates = first_token_candidates(logprobs)
    mass: float | None = None
    top = max(candidates, key=lambda c: c[1])[0] if candidates else None
    if candidates:
        res = yes_no_from_logprobs(candidates) if yes_no else choice_from_logprobs(candidates, valid)
        mass = 0.0 if res is None else float(res[1]["label_mass"])
        if not yes_no and not is_refusal(text):
            present = res[1]["logprobs"] if res is not None else {}
            stray = unoffered_letters(candidates, valid)
            offered = {k: math.exp(present[k]) if k in present else 0.0 for k in valid}
            detail = unoffered_detail(offered, stray, min_label_mass)
            if detail is not None:
                raw_u = {"text": text, "label_mass": mass, "top_token": top, "unoffered": stray}
                return NotJudged("off-format", detail, raw_u), False
        if res is not None and mass >= min_label_mass:
            value, raw = res
            raw = {"text": text, **raw}
            if yes_no:
                return YesNoScore(float(value), source="logprobs", raw=raw), False  # type: ignore[arg-type]
            return Choice(list(value), source="logprobs", raw=raw), False  # type: ignore[arg-type]
    source = "guided" if guided else "text"
    if not (guided and candidates) and not is_refusal(text):
        read: dict[str, Any] = {"text": text, "label_mass": mass, "text_confidence": text_confidence}
        if yes_no:
            answer = parse_yes_no_text(text or "")
            if answer is not None:
                p_yes = text_distribution(0 if answer else 1, 2, text_confidence)[0]
                return YesNoScore(p_yes, source=source, raw=read), True
        else:
            idx = parse_choice_text(text or "", valid, options)
            if idx is not None:
                return Choice(text_distribution(idx, len(valid), text_confidence), source=source, raw=read), True
            letter = unoffered_label_text(text, valid)
            if letter is not None:
                detail = f"{UNOFFERED}: answered {letter!r} ({(text or '').strip()[:40]!r}); offered {', '.join(valid)}"
                return NotJudged("off-format", detail, {"text": text, "label_mass": mass, "top_token": top}), False
    reason = refused_or_off_format(None if (guided and candidates) else text, top)
    shown = (text or "").strip().replace("\n", " ")
    shown = shown[:80] + ("..." if len(shown) > 80 else "")
    detail = f"answered {shown!r}" if shown else "no answer text"
    if mass is not None:
        detail += f"; P(valid labels)={mass:.3g} < {min_label_mass:g}"
    elif logprobs_asked:
        detail += "; no logprobs returned"
    raw_nj: dict[str, Any] = {"text": text, "label_mass": mass, "top_token": top}
    return NotJudged(reason, detail, raw_nj), False  # type: ignore[arg-type]
