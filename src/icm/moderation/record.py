"""The record `icm moderate` writes per image: one JSON line, a pydantic model."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
        default=None, description="logits, logprobs, parsed (read from the answer text: 0/1), guided (constrained answer text) or a detector"
    )


class Timings(BaseModel):
    load_ms: float = 0.0
    model_ms: float = 0.0
    explain_ms: float = 0.0
    total_ms: float = 0.0


class ModerationRecord(BaseModel):
    """Everything a person needs to check one verdict."""

    model_config = ConfigDict(extra="allow")

    path: str
    sha256: str | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    policy: str
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
    verdict: VerdictName | None = None
    reason: str | None = Field(default=None, description="Why, in one sentence built from the evidence")
    explanation: str | None = Field(default=None, description="The model's own explanation (--explain)")
    boxes: list[BoxRecord] = Field(default_factory=list)
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

    def resume_key(self) -> tuple[Any, ...]:
        return (self.path, self.sha256, self.policy, self.rules, self.backend, self.model)
