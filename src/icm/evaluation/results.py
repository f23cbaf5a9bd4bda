"""Readers for moderation results: our JSONL records and the paper's JSON.

Two formats hold one moderation score per image:

* ``icm-jsonl``: the JSONL file ``icm moderate`` writes, one
  :class:`~icm.moderation.record.ModerationRecord` per line. Besides the scores it keeps
  the evidence (the term's P(Yes), attribute distributions), so an evaluation under
  another rule set can re-decide every image instead of trusting a stale P(violation).
* ``paper-json``: the ICM-Assistant scripts' JSON list, one object per image with
  ``image_name``, ``logit_yes``, ``logit_no`` and ``<term>_score`` (e.g. ``sexy_score``,
  the softmax of the two logits, i.e. P(Yes) for the term question).

Both become a :class:`ResultSet` of :class:`ResultItem`; anything unreadable is counted,
never dropped silently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from icm.fileio import read_jsonl, read_text

ResultFormat = Literal["icm-jsonl", "paper-json"]
Status = Literal["judged", "not_judged", "failed"]

# Words in a record's ``not_judged`` entries or notes that say an answer was off-format.
_OFF_FORMAT_WORDS = ("off-format", "off_format", "offformat")

_NAME_KEYS = ("image_name", "image", "path", "file", "filename", "name")


class FramePoint(BaseModel):
    """One judged frame of a video, as its record's ``frame_scores`` has it."""

    p_violation: float | None = None
    verdict: str | None = None


class ResultItem(BaseModel):
    """One image's moderation result, whatever file it came from."""

    id: str = Field(description="The image as the source names it (a path or a file name)")
    p_term: float | None = Field(default=None, description="P(Yes) for the term question")
    p_violation: float | None = Field(default=None, description="P(violation) as recorded (our records only)")
    attributes: dict[str, dict[str, float]] = Field(default_factory=dict)
    policy: str | None = None
    rules: str | None = Field(default=None, description="Rule set the record was decided under")
    product: str | None = Field(default=None, description="Most likely product, as recorded")
    verdict: str | None = None
    reason: str | None = None
    explanation: str | None = None
    error: str | None = None
    sha256: str | None = None
    label: str | None = Field(default=None, description="The rule set's label of the decided product: allow, violate or None")
    p_violation_range: tuple[float, float] | None = None
    basis: str | None = Field(default=None, description="What the decision rested on: attributes, products, term, none, conflict")
    not_judged: list[str] = Field(default_factory=list, description="Queries the backend did not judge, as recorded")
    unanswered: dict[str, str] = Field(default_factory=dict, description="Queries with no answer and why (refused, off-format, cannot-judge)")
    record_notes: list[str] = Field(default_factory=list, description="The record's notes")
    aggregate: str | None = Field(default=None, description="Videos: how the frames made the verdict, as recorded")
    frame_scores: list[FramePoint] = Field(default_factory=list, description="Videos and multi-frame images: every judged frame")

    @property
    def has_evidence(self) -> bool:
        return self.p_term is not None or bool(self.attributes)

    @property
    def off_format(self) -> bool:
        """Whether an answer was off-format (not one of the labels): the engine never allows such an image."""
        if any(why.split(":", 1)[0].strip().lower() == "off-format" for why in self.unanswered.values()):
            return True
        return any(w in text.lower() for text in (*self.not_judged, *self.record_notes) for w in _OFF_FORMAT_WORDS)

    def status(self) -> tuple[Status, str | None]:
        """Whether the image was judged, and if not, why.

        ``failed``: the record is an error (the moderation did not complete, no verdict).
        ``not_judged``: the record has no verdict of its own: the engine's ``review`` stands
        in for one because the decision rests on nothing (basis ``none``), on contradicting
        answers (``conflict``) or a query was refused (basis ``refused``, or the record's
        ``unanswered``, ``not_judged`` or notes say so: a refusal is never a verdict).
        Anything else is ``judged``. A record with a verdict is judged whatever its
        attribute answers were: off-format answers leave their queries out of the
        evidence and the rest decides (``block`` on the term alone is a verdict; an
        ``allow`` is turned into ``review``), so only an off-format record *without* a
        verdict is not judged. A query the backend cannot ask at all (a detector has no
        action question) is not a refusal: it is listed in ``not_judged`` by name only.
        """
        if self.error:
            return "failed", "moderation failed"
        if self.basis == "refused":
            return "not_judged", "refused"
        if self.basis in ("none", "conflict"):
            return "not_judged", f"basis {self.basis}"
        for why in self.unanswered.values():  # "refused: ...", "off-format: ...", "cannot-judge: ..."
            if why.split(":", 1)[0].strip().lower() == "refused":
                return "not_judged", "refused"
        for text in (*self.not_judged, *self.record_notes):
            low = text.lower()
            if not low.startswith("cannot-judge") and "refus" in low:
                return "not_judged", "refused"
        if self.off_format and self.verdict not in ("allow", "review", "block"):
            return "not_judged", "off-format"
        return "judged", None


class ResultSet(BaseModel):
    source: str
    format: ResultFormat
    items: list[ResultItem]
    bad_lines: int = Field(default=0, description="Lines or entries that could not be read")
    notes: list[str] = Field(default_factory=list)


def _prob(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) and 0.0 <= v <= 1.0 else None


def _paper_score_key(entry: dict[str, Any], term: str | None) -> str | None:
    if term and f"{term}_score" in entry:
        return f"{term}_score"
    for key in ("score", "p_yes"):
        if key in entry:
            return key
    keys = [k for k in entry if k.endswith("_score")]
    return keys[0] if len(keys) == 1 else None


def _softmax2(a: Any, b: Any) -> float | None:
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a, b)):
        return None
    m = max(a, b)
    ea, eb = math.exp(a - m), math.exp(b - m)
    return ea / (ea + eb)


def parse_paper_json(data: Any, source: str = "<json>", *, term: str | None = None) -> ResultSet:
    """A :class:`ResultSet` from the paper's JSON list (already decoded)."""
    if isinstance(data, dict):  # {"image": score} or {"results": [...]}
        data = data.get("results", data.get("items", [{"image_name": k, "score": v} for k, v in data.items()]))
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of per-image results")
    items: list[ResultItem] = []
    bad = 0
    for entry in data:
        if not isinstance(entry, dict):
            bad += 1
            continue
        name = next((entry[k] for k in _NAME_KEYS if isinstance(entry.get(k), str)), None)
        key = _paper_score_key(entry, term)
        p = _prob(entry.get(key)) if key else None
        if p is None and "logit_yes" in entry and "logit_no" in entry:
            p = _softmax2(entry["logit_yes"], entry["logit_no"])
        if name is None or p is None:
            bad += 1
            continue
        items.append(ResultItem(id=name, p_term=p))
    notes = [f"{bad} entries without an image name or a score in [0, 1] were skipped"] if bad else []
    return ResultSet(source=source, format="paper-json", items=items, bad_lines=bad, notes=notes)


def _record_item(r: Any) -> ResultItem:
    """The figures of one :class:`~icm.moderation.record.ModerationRecord`."""
    return ResultItem(
        id=r.path,
        p_term=r.term.p_yes if r.term is not None else None,
        p_violation=r.p_violation,
        attributes=r.attributes,
        policy=r.policy,
        rules=r.rules,
        product=r.product,
        verdict=r.verdict,
        reason=r.reason,
        explanation=r.explanation,
        error=r.error,
        sha256=r.sha256,
        label=r.label,
        p_violation_range=r.p_violation_range,
        basis=r.basis,
        not_judged=[str(x) for x in r.not_judged],
        unanswered={str(k): str(v) for k, v in (getattr(r, "unanswered", None) or {}).items()},
        record_notes=[str(x) for x in r.notes],
        aggregate=r.aggregate,
        frame_scores=[FramePoint(p_violation=f.p_violation, verdict=f.verdict) for f in r.frame_scores],
    )


def parse_records_jsonl(text: str, source: str = "<jsonl>") -> ResultSet:
    """A :class:`ResultSet` from ``icm moderate`` JSONL text.

    When a path occurs more than once (a resumed run keeps earlier records), the last
    record wins.
    """
    from icm.moderation.record import ModerationRecord

    by_id: dict[str, ResultItem] = {}
    rows = read_jsonl(source, ModerationRecord, text=text, skip_bad=True)
    bad = len(rows.errors)
    for record in rows:
        item = _record_item(record)
        by_id.pop(item.id, None)
        by_id[item.id] = item
    notes = [f"{bad} unreadable lines skipped (a run killed mid-write?)"] if bad else []
    return ResultSet(source=source, format="icm-jsonl", items=list(by_id.values()), bad_lines=bad, notes=notes)


def read_results(path: str | Path, *, term: str | None = None) -> ResultSet:
    """Read a results file, detecting its format (our JSONL or parquet, or the paper's JSON)."""
    p = Path(path)
    from icm.moderation.parquet import is_parquet_path, read_parquet_records

    if is_parquet_path(p):  # `icm moderate --out x.parquet`: a folder of part files (or one file)
        if not p.exists():
            raise ValueError(f"cannot read results {p}: no such file or folder")
        try:
            records, bad = read_parquet_records(p)
        except ImportError as exc:
            raise ValueError(f"{p}: {exc}") from None
        rs = parse_records_jsonl("".join(r.model_dump_json() + "\n" for r in records), str(p))
        if not rs.items:
            raise ValueError(f"{p}: no readable moderation record")
        rs.bad_lines = bad
        if bad:
            rs.notes.append(f"{bad} unreadable parts or rows skipped")
        return rs
    text = read_text(p, "results file")
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{p}: the results file is empty")
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
        return parse_paper_json(data, str(p), term=term)
    if stripped.startswith("{"):
        first = stripped.splitlines()[0]
        try:
            head = json.loads(first)
        except json.JSONDecodeError:
            head = None
        if isinstance(head, dict) and "path" in head and "policy" in head:
            rs = parse_records_jsonl(text, str(p))
            if not rs.items:
                raise ValueError(f"{p}: no readable moderation record")
            return rs
        try:
            return parse_paper_json(json.loads(text), str(p), term=term)
        except json.JSONDecodeError:
            pass
    raise ValueError(
        f"{p}: not a results file: expected the JSONL written by `icm moderate` or the paper's JSON list"
        " (objects with image_name and <term>_score)"
    )
