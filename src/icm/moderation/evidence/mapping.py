"""From what the sources saw to the decision model's answers (pure functions).

The rules (docs/offline-evidence.md states them with an example):

* **An item fires** when its score is at least its ``min_score`` (and above 0). Its score
  is the summed probability of its ``labels`` (a classifier), the best box score among
  its ``labels`` (a detector), or the best confidence among the OCR lines holding one of
  its ``keywords``. Its evidence is ``e = strength * score``.
* **The term**: ``P(term) = 1 - (1 - silent) * prod(1 - e_i)`` over the items that fire
  (a noisy-OR whose leak is ``silent``). With no item firing, ``P(term) = silent``, but
  only when ``silent`` is set *and* every source the term names could run; otherwise the
  term is not judged (the sources can flag it, not clear it).
* **An attribute**: per value, ``e_v = 1 - prod(1 - e_i)`` over its items that fire;
  ``r = prod(1 - e_v)`` is the mass no evidence claims. Each value with evidence gets
  ``(1 - r) * e_v / sum(e)``: one detection of strength ``s`` on ``v`` gives ``P(v) = s``.
  The rest ``r`` goes to the ``silent`` value (``silent_confidence`` of it, the remainder
  spread evenly over every value) when ``silent`` is set and every source of the attribute
  could run; otherwise evenly over the values without evidence. No item firing and no
  usable ``silent``: not judged.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from icm.moderation.backends.base import Box
from icm.moderation.evidence.sources import SourceOutput
from icm.policy.model import AttributeEvidence, EvidenceFrom, TermEvidence


def normalise_text(text: str) -> str:
    """Case-folded, accents removed (``Apuéstá`` -> ``apuesta``), whitespace collapsed."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.split())


def _is_cjk(text: str) -> bool:
    return any(ord(c) >= 0x2E80 for c in text)


_PATTERNS: dict[str, re.Pattern[str]] = {}


def keyword_pattern(keyword: str) -> re.Pattern[str]:
    """A keyword as a pattern on normalised text: whole words; ``*`` at its end matches any
    word ending (``bet*``: bet, bets, betting); CJK keywords match anywhere (no word breaks)."""
    hit = _PATTERNS.get(keyword)
    if hit is None:
        kw = normalise_text(keyword)
        prefix = kw.endswith("*")
        kw = kw.rstrip("*")
        body = re.escape(kw).replace(r"\ ", r"\s*")
        if _is_cjk(kw):
            hit = re.compile(body)
        else:  # word boundaries where the keyword starts or ends with a word character
            start = r"(?<!\w)" if re.match(r"\w", kw) else ""
            end = r"\w*" if prefix else (r"(?!\w)" if re.search(r"\w$", kw) else "")
            hit = re.compile(start + body + end)
        _PATTERNS[keyword] = hit
    return hit


@dataclass
class Fired:
    """One item that fired on one image: its evidence and what it saw."""

    item: EvidenceFrom
    score: float
    evidence: float
    boxes: list[Box] = field(default_factory=list)
    what: str = ""


def item_score(item: EvidenceFrom, output: SourceOutput, *, width: float, height: float) -> Fired | None:
    """The item's score on one image, or ``None`` when it does not fire."""
    boxes: list[Box] = []
    if item.keywords:
        score, what = 0.0, ""
        for line in output.boxes:
            text = normalise_text(line.label)
            for kw in item.keywords:
                if keyword_pattern(kw).search(text):
                    boxes.append(Box(label=f"{item.source}:{kw}: {line.label}", score=line.score, x=line.x, y=line.y, w=line.w, h=line.h))
                    if line.score > score:
                        score, what = line.score, f"{item.source} read {line.label!r} ({kw})"
                    break
    elif (probs := output.probs) is not None:
        score = float(sum(probs.get(label, 0.0) for label in item.labels))
        best = max(item.labels, key=lambda label: probs.get(label, 0.0))
        what = f"{item.source}: P({'+'.join(item.labels) if len(item.labels) <= 3 else best + '+...'})={score:.2f}"
        if score > 0 and item.min_score > 0:  # a class found, not a standing probability: show it
            boxes.append(Box(label=f"{item.source}:{best}", score=score, x=0.0, y=0.0, w=float(width), h=float(height)))
    else:
        matched = [bx for bx in output.boxes if bx.label in item.labels]
        score = max((bx.score for bx in matched), default=0.0)
        boxes = matched
        what = f"{item.source}: {max(matched, key=lambda bx: bx.score).label} ({score:.2f})" if matched else ""
    if score <= 0.0 or score < item.min_score:
        return None
    score = min(1.0, score)
    return Fired(item=item, score=score, evidence=item.strength * score, boxes=boxes, what=what)


def noisy_or(values: Sequence[float], leak: float = 0.0) -> float:
    return 1.0 - (1.0 - leak) * math.prod(1.0 - v for v in values)


def term_probability(spec: TermEvidence, fired: Sequence[Fired], *, all_sources_ran: bool) -> float | None:
    """P(term) from the items that fired (module docstring), or ``None`` when not judged."""
    if fired:
        return noisy_or([f.evidence for f in fired], spec.silent or 0.0)
    if spec.silent is not None and all_sources_ran:
        return spec.silent
    return None


def attribute_distribution(
    spec: AttributeEvidence, fired: Sequence[Fired], value_ids: Sequence[str], *, all_sources_ran: bool
) -> list[float] | None:
    """P(value) aligned with ``value_ids`` (module docstring), or ``None`` when not judged."""
    if not value_ids or len(set(value_ids)) != len(value_ids):
        return None
    per_value: dict[str, list[float]] = {}
    for f in fired:
        if f.item.value is not None and f.item.value in value_ids:
            per_value.setdefault(f.item.value, []).append(f.evidence)
    e = {v: noisy_or(ev) for v, ev in per_value.items()}
    silent = spec.silent if spec.silent in value_ids and all_sources_ran else None
    if not e and silent is None:
        return None
    r = math.prod(1.0 - x for x in e.values())
    total = sum(e.values())
    probs = {v: ((1.0 - r) * x / total if total > 0 else 0.0) for v, x in e.items()}
    out = dict.fromkeys(value_ids, 0.0)
    out.update(probs)
    if silent is not None:
        out[silent] += r * spec.silent_confidence
        spread = r * (1.0 - spec.silent_confidence) / len(value_ids)
        for v in value_ids:
            out[v] += spread
    else:
        rest = [v for v in value_ids if v not in e] or list(value_ids)
        for v in rest:
            out[v] += r / len(rest)
    s = sum(out.values())
    return [out[v] / s for v in value_ids]
