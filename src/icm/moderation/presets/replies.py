"""Reading the guard models' replies: what they rated, which categories, and why.

A reply that cannot be read is never taken as "safe": :func:`read_llavaguard` and
:func:`read_llama_guard` return a :class:`GuardReply` with ``problem`` set
(``off-format`` for malformed JSON or an unknown rating or category, ``refused`` for a
refusal), and the preset turns that into an unanswered term query (the image goes to
review, every category the policy maps is flagged).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from icm.moderation.backends.base import REFUSAL_FIRST_WORDS, NotJudgedReason

__all__ = ["GuardReply", "read_llama_guard", "read_llavaguard"]


@dataclass
class GuardReply:
    """One guard verdict about one image, read from the model's text.

    ``unsafe`` is None when the reply could not be read (``problem`` says why).
    ``categories`` are the category codes the model named (``O3``, ``S1``), in its order;
    empty for an unsafe reply that named none (then every category the policy maps counts).
    """

    text: str
    unsafe: bool | None = None
    categories: list[str] = field(default_factory=list)
    rationale: str | None = None
    problem: NotJudgedReason | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None and self.unsafe is not None


def _is_refusal(text: str) -> bool:
    first = re.split(r"[\s,.!]+", text.strip().lower(), maxsplit=1)[0] if text.strip() else ""
    return first in REFUSAL_FIRST_WORDS


def _bad(text: str, detail: str, reason: NotJudgedReason = "off-format") -> GuardReply:
    return GuardReply(text=text, problem="refused" if _is_refusal(text) else reason, detail=detail)


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_CODE = re.compile(r"^\s*([A-Z]{1,2}\d{1,2})\b")


def _json_object(text: str) -> dict | None:
    body = _FENCE.sub("", text.strip())
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        return None
    raw = body[start : end + 1]
    for candidate in (raw, _TRAILING_COMMA.sub(r"\1", raw)):  # LlavaGuard's own template ends "str,\n}"
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        return obj if isinstance(obj, dict) else None
    return None


def read_llavaguard(text: str, offered: list[str]) -> GuardReply:
    """A LlavaGuard / QwenGuard JSON reply: ``{"rating": "Unsafe", "category": "O3: Sexual
    Content", "rationale": "..."}``. ``offered`` are the category codes the prompt offered;
    a category outside them (or a rating other than Safe/Unsafe) is off-format, ``NA`` or a
    missing category on an unsafe rating leaves ``categories`` empty."""
    obj = _json_object(text)
    if obj is None:
        return _bad(text, "the reply is not a JSON object")
    rating = str(obj.get("rating", "")).strip().lower()
    if rating not in ("safe", "unsafe"):
        return _bad(text, f"rating {obj.get('rating')!r} is neither Safe nor Unsafe")
    rationale = obj.get("rationale")
    reply = GuardReply(text=text, unsafe=rating == "unsafe", rationale=str(rationale).strip() if rationale else None)
    cat = obj.get("category", obj.get("image-category"))
    if cat is None or not str(cat).strip():
        return reply
    m = _CODE.match(str(cat))
    code = m.group(1) if m else str(cat).strip()
    if code.upper().startswith("NA"):
        return reply
    if code not in offered:
        return _bad(text, f"category {cat!r} is not one the prompt offered ({', '.join(offered)})")
    reply.categories = [code]
    return reply


Verdict = Literal["safe", "unsafe"]


def read_llama_guard(text: str) -> GuardReply:
    """A Llama Guard reply: ``safe``, or ``unsafe`` and on the next line ``S1,S10``."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return _bad(text, "empty reply")
    first = lines[0].lower().rstrip(".")
    if first == "safe":
        return GuardReply(text=text, unsafe=False)
    if first != "unsafe":
        return _bad(text, f"first line {lines[0][:40]!r} is neither safe nor unsafe")
    reply = GuardReply(text=text, unsafe=True)
    if len(lines) > 1:
        codes = [c.strip().upper() for c in re.split(r"[,\s]+", lines[1]) if c.strip()]
        bad = [c for c in codes if not re.fullmatch(r"S\d{1,2}", c)]
        if bad:
            return _bad(text, f"categories line {lines[1][:40]!r} holds no S-code list")
        reply.categories = list(dict.fromkeys(codes))
    return reply
