"""The record `icm moderate` writes per image: one JSON line, a pydantic model."""

from __future__ import annotations

import base64
import os
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from icm import __version__

VerdictName = Literal["allow", "review", "block"]


class BoxRecord(BaseModel):
    label: str
    score: float
    box: list[float] = Field(description="x, y, width, height in pixels of the EXIF-corrected image")


class TermScore(BaseModel):
    term: str
    question: str
    p_yes: float | None = Field(description="P(Yes) for the term question; None when not judged")
    source: str | None = Field(
        default=None,
        description="logits, logprobs, text (read from the answer text: one sampled answer, counted at the backend's "
        "text confidence; 'parsed' in records of earlier versions, 0/1), guided (constrained answer text) or a detector",
    )


class Timings(BaseModel):
    load_ms: float = 0.0
    model_ms: float = 0.0
    explain_ms: float = 0.0
    total_ms: float = 0.0


def json_safe_text(text: str) -> str:
    """``text`` unchanged when it is valid Unicode, else each byte that was not UTF-8 shown as ``\\xNN``.

    File names that are not UTF-8 reach Python as ``str`` with lone surrogates
    (``surrogateescape``), which JSON cannot carry; this makes them printable and safe.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_safe(value: Any) -> Any:
    if isinstance(value, str):
        return json_safe_text(value)
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    return value


class FrameScore(BaseModel):
    """One judged view of a multi-frame image or video (``frame_scores``)."""

    frame: int
    timestamp: float | None = None
    background: str | None = None
    p_violation: float | None = None
    verdict: VerdictName | None = None
    scene_change: bool = Field(default=False, description="Judged because it starts a new scene between regular samples")


class ModerationRecord(BaseModel):
    """Everything a person needs to check one verdict."""

    model_config = ConfigDict(extra="allow")

    path: str
    path_bytes: str | None = Field(
        default=None,
        description="Only when the file name is not valid UTF-8: its exact bytes, base64; `path` then shows them as \\xNN",
    )
    sha256: str | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    policy: str
    policy_digest: str | None = Field(
        default=None, description="sha256 (16 hex digits) of the policy's content: --resume redoes records of another version"
    )
    rules: str
    backend: str
    model: str | None = None
    stage: str | None = Field(default=None, description="With the cascade backend: which stage decided")
    term: TermScore | None = None
    attributes: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Per attribute, a distribution over its values"
    )
    attribute_sources: dict[str, str] = Field(default_factory=dict)
    not_judged: list[str] = Field(default_factory=list, description="Attributes the backend could not judge")
    unanswered: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Queries (term:ID, attr:ID) with no answer and why: 'refused' (the model declined; the verdict is "
            "review and there is no product), 'off-format' (its answer was not a label; never allowed) or "
            "'cannot-judge' (the backend cannot see it, e.g. a detector asked about an action)"
        ),
    )
    failed_queries: dict[str, str] = Field(
        default_factory=dict,
        description="On an error record: the queries whose requests failed for good, and why (the image gets no verdict)",
    )
    product: str | None = None
    product_probability: float | None = None
    product_description: str | None = None
    rule: str | None = Field(default=None, description="The rule of the rule set that fired")
    label: Literal["allow", "violate"] | None = None
    severity: str | None = None
    p_violation: float | None = None
    p_violation_range: tuple[float, float] | None = None
    basis: str | None = Field(
        default=None, description="attributes, products, term, none, conflict, or refused (the model declined to answer)"
    )
    p_uncovered: float | None = Field(
        default=None, description="Mass of the attribute-grid cells no product covers (they take the rule set's default)"
    )
    cell: dict[str, str] | None = Field(default=None, description="The most likely cell of the attribute grid")
    conflict: str | None = Field(default=None, description="What conflicted, when basis is 'conflict'")
    verdict: VerdictName | None = None
    category_scores: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per standard scheme (openai, llavaguard, mlcommons), each category the policy maps: the "
        "probability of its mapped products that the rule set labels violate (icm.policy.taxonomy)",
    )
    flagged_categories: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per scheme, the categories whose score reaches the rule set's review threshold (all the policy's "
        "categories when the model refused: never passed as clean)",
    )
    reason: str | None = Field(default=None, description="Why, in one sentence built from the evidence")
    explanation: str | None = Field(default=None, description="The model's own explanation (--explain)")
    boxes: list[BoxRecord] = Field(default_factory=list)
    frame: int | None = Field(
        default=None, description="Index in the file of the frame the verdict comes from (the worst judged; 0 for a still)"
    )
    timestamp: float | None = Field(default=None, description="Video (and timed animation): seconds of that frame")
    background: str | None = Field(
        default=None, description="white or black: the background the worst view was judged on (meaningful alpha only)"
    )
    frames_seen: int | None = Field(default=None, description="How many frames of the file were judged")
    frame_count: int | None = Field(default=None, description="How many frames the file has (video: as stated or estimated)")
    unsampled_gap_frames: int | None = Field(
        default=None, description="Multi-frame and video: the longest run of consecutive frames none of which was judged"
    )
    unsampled_gap_s: float | None = Field(default=None, description="That run in seconds, when frame times are known")
    aggregate: Literal["worst", "corroborated", "uncorroborated", "zero-tolerance"] | None = Field(
        default=None,
        description="Video: how the frames made the verdict: worst (the worst frame), corroborated (enough blocking "
        "frames in a window: block), uncorroborated (blocking frames without that: review), zero-tolerance (one frame "
        "of a zero-tolerance category blocks); see the rule set's video setting",
    )
    frame_scores: list[FrameScore] = Field(
        default_factory=list, description="Multi-frame, video or alpha images: P(violation) and verdict of every view judged"
    )
    notes: list[str] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    error: str | None = Field(
        default=None,
        description="Why there is no verdict (unreadable image, a failed request: names the query and the cause); "
        "records with an error are retried by --resume",
    )
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    icm_version: str = __version__

    @property
    def ok(self) -> bool:
        return self.error is None

    @model_validator(mode="before")
    @classmethod
    def _json_safe_names(cls, data: Any) -> Any:
        """Keep a record writable as JSON whatever the file name (see :func:`json_safe_text`)."""
        if not isinstance(data, dict):
            return data
        path = data.get("path")
        if isinstance(path, str) and json_safe_text(path) != path:
            data = dict(data)
            try:
                raw = os.fsencode(path)
            except UnicodeEncodeError:
                raw = path.encode("utf-8", "surrogatepass")
            data["path_bytes"] = base64.b64encode(raw).decode("ascii")
        return _json_safe(data) if any(isinstance(v, (str, list, dict)) for v in data.values()) else data

    def text_answers(self) -> list[str]:
        """The queries (``term:ID``, ``attr:ID``) whose answers were read from the answer text
        (source ``text``, ``guided``, or ``parsed`` in older records), not measured."""
        from icm.moderation.backends.base import TEXT_SOURCES

        keys = [f"term:{self.term.term}"] if self.term is not None and self.term.source in TEXT_SOURCES else []
        return keys + [f"attr:{a}" for a, src in self.attribute_sources.items() if src in TEXT_SOURCES]

    def local_path(self) -> str:
        """The file name as the OS spells it (undoing the JSON-safe form of ``path``)."""
        if self.path_bytes:
            return os.fsdecode(base64.b64decode(self.path_bytes))
        return self.path

    def resume_key(self) -> tuple[Any, ...]:
        return (self.path, self.sha256, self.policy, self.policy_digest, self.rules, self.backend, self.model)
