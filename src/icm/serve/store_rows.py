"""What the decision store's modules share: the rows as dictionaries, the errors, the request metadata."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")




@dataclass
class DecisionMeta:
    """What the server knows about a request besides the moderation record."""

    image_name: str | None = None
    image_format: str | None = None
    image_kept: bool = False
    source: str | None = None  # upload, base64, path, page
    client: str | None = None  # the API key's name
    queue: str | None = None  # why it awaits a person: 'review' (the verdict) or 'audit' (sampled); None: not queued
    request_id: str | None = None  # the X-Request-ID of the request that made it


class StoreError(RuntimeError):
    pass


class ClaimConflict(StoreError):
    """Another reviewer holds the decision (their claim has not expired)."""

    def __init__(self, decision_id: int, holder: str, expires_at: float) -> None:
        super().__init__(f"decision {decision_id} is claimed by {holder!r} for {max(0, round(expires_at - time.time()))} more seconds")
        self.decision_id, self.holder, self.expires_at = decision_id, holder, expires_at


class ReviewWithdrawRefused(StoreError):
    """A review may be withdrawn only by its reviewer, and only soon after it was made."""


WEBHOOK_EVENTS = ("decision.block", "review.override")

class NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None



SUMMARY_FIELDS = (
    "id", "created_at", "image_sha256", "image_name", "image_format", "image_kept", "source", "client",
    "policy", "rules", "backend", "model", "verdict", "p_violation", "p_term", "product",
    "product_probability", "rule", "label", "reason", "explanation", "queue", "request_id",
)


def decision_dict(row: Any, *, full: bool) -> dict[str, Any]:
    out = {k: row[k] for k in SUMMARY_FIELDS}
    out["image_kept"] = bool(out["image_kept"])
    if full:
        out["record"] = json.loads(row["record"])
    return out


def summary_dict(row: Any, decision_id: int) -> dict[str, Any]:
    """A decision as webhook events carry it (no image bytes, no full record)."""
    out = {k: row[k] for k in SUMMARY_FIELDS if k != "id" and k in row}
    out["id"] = decision_id
    return out


def review_dict(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "decision_id", "created_at", "reviewer", "api_key_name", "action", "verdict", "product", "note")}

