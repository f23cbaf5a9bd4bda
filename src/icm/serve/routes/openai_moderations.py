"""``POST /v1/moderations``: OpenAI's moderation API over this server's policies.

A client of OpenAI's API (the official ``openai`` SDK included) works by changing only its
base URL: ``model`` names the policies (``icm-sexy:children``, several with commas, an
alias such as ``omni-moderation-latest`` for the server's default), ``input`` carries the
images as content parts ``{"type": "image_url", "image_url": {"url": ...}}`` (``data:``
URLs, or ``http(s)`` URLs of allow-listed hosts; a bare string that is such a URL counts
too). Text is refused with a 400: this service judges images.

Each image is one result; its categories are the named policies' terms. A category is
flagged when the policy's verdict is ``block`` or ``review`` (an uncertain image is never
passed as clean; ``icm.decisions[].record.verdict`` tells which), its score is
P(violation) under the rule set. Every judgement is a stored decision, as with
``/v1/moderate``; an image the backend failed on is a 502, never ``flagged: false``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from icm.moderation.record import ModerationRecord
from icm.serve.errors import APIError
from icm.serve.routes.common import ERRORS, content_type, json_body, principal, service
from icm.serve.routes.moderation import decode_base64, judge
from icm.serve.service import Outcome, Service

router = APIRouter(tags=["moderation"])

MAX_INPUTS = 32


class ICMDecision(BaseModel):
    decision_id: int
    review_url: str
    record: ModerationRecord


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]
    icm: dict[str, Any] = Field(description="This server's decisions for the image (OpenAI's clients ignore it)")


class ModerationsResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


MODERATIONS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["input"],
                    "properties": {
                        "model": {"type": "string", "description": "POLICY[:RULES][,POLICY[:RULES]...] or an alias"},
                        "input": {
                            "description": "Image content parts (or URL strings)",
                            "oneOf": [
                                {"type": "string"},
                                {"type": "array", "items": {"type": "string"}},
                                {"type": "array", "items": {"type": "object"}},
                            ],
                        },
                    },
                }
            }
        },
    }
}


def resolve_model(svc: Service, model: str | None) -> tuple[str, list[tuple[str, str]]]:
    """The model name to echo and the (policy, rule set) pairs it names."""
    spec = (model or "").strip()
    aliases = svc.config.model_aliases
    if spec in aliases:
        spec = aliases[spec].strip()
    if not spec:
        return f"{svc.config_policy_name}:{svc.default_rules}", [(svc.config_policy_name, svc.default_rules)]
    targets: list[tuple[str, str]] = []
    for part in spec.split(","):
        pname, _, rname = part.strip().partition(":")
        if not pname:
            raise APIError(400, "bad_model", f"model {model!r}: write POLICY[:RULES][,POLICY[:RULES]...]")
        try:
            target = svc.resolve(pname, rname or None)
        except APIError as exc:
            raise APIError(400, exc.code, f"model {model!r}: {exc.detail}") from None
        if target not in targets:
            targets.append(target)
    return ",".join(f"{p}:{r}" for p, r in targets), targets


def image_urls(raw: Any) -> list[str]:
    """The image URLs of OpenAI's ``input`` (a string, a list of strings, or content parts)."""
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise APIError(400, "missing_input", "'input' is empty: send image content parts")
    if len(items) > MAX_INPUTS:
        raise APIError(400, "too_many_inputs", f"'input' has {len(items)} items; at most {MAX_INPUTS} per request")
    urls: list[str] = []
    for i, item in enumerate(items):
        where = f"input[{i}]" if isinstance(raw, list) else "input"
        if isinstance(item, str):
            if item.strip().startswith(("data:", "http://", "https://")):
                urls.append(item.strip())
                continue
            raise APIError(
                400, "text_not_supported",
                f"{where} is text: this service judges images only. Send {{\"type\": \"image_url\", "
                "\"image_url\": {\"url\": \"data:image/jpeg;base64,...\"}} content parts",
            )
        if not isinstance(item, dict):
            raise APIError(400, "bad_input", f"{where} is neither a string nor a content part object")
        kind = item.get("type")
        if kind == "text":
            raise APIError(
                400, "text_not_supported",
                f"{where} is a text part: this service judges images only (send image_url parts)",
            )
        if kind != "image_url":
            raise APIError(400, "bad_input", f"{where} has type {str(kind)[:40]!r}; content parts are 'image_url' (or 'text', refused)")
        image_url = item.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url if isinstance(image_url, str) else None
        if not isinstance(url, str) or not url.strip():
            raise APIError(400, "bad_input", f"{where}.image_url.url is missing")
        urls.append(url.strip())
    return urls


async def image_bytes(svc: Service, url: str, where: str) -> tuple[bytes, str, str]:
    """(bytes, name, source) of one image URL."""
    if url.startswith("data:"):
        head = url[5:].split(",", 1)[0]
        if ";base64" not in head:
            raise APIError(400, "bad_data_url", f"{where}: the data: URL is not base64 (data:image/...;base64,...)")
        return decode_base64(svc, url, f"{where}'s data: URL"), "data-url", "data-url"
    fetcher = svc.extras.get("fetcher")
    assert fetcher is not None
    data = await fetcher.fetch(url)
    return data, url.rsplit("/", 1)[-1][:200] or "url", "url"


def result_of(svc: Service, outs: list[Outcome]) -> ModerationResult:
    categories: dict[str, bool] = {}
    scores: dict[str, float] = {}
    types: dict[str, list[str]] = {}
    decisions = []
    for out in outs:
        r = out.record
        term = svc.policies[r.policy].term.id
        flagged = r.verdict in ("block", "review")
        score = r.p_violation if r.p_violation is not None else (1.0 if flagged else 0.0)
        categories[term] = categories.get(term, False) or flagged
        scores[term] = max(scores.get(term, 0.0), float(score))
        types[term] = ["image"]
        assert out.decision_id is not None
        decisions.append(ICMDecision(decision_id=out.decision_id, review_url=f"/review#decision={out.decision_id}", record=r).model_dump(mode="json"))
    return ModerationResult(
        flagged=any(categories.values()), categories=categories, category_scores=scores,
        category_applied_input_types=types, icm={"decisions": decisions},
    )


@router.post(
    "/v1/moderations",
    response_model=ModerationsResponse,
    responses=ERRORS,
    openapi_extra=MODERATIONS_BODY,
    summary="OpenAI-compatible moderation of images",
)
async def moderations(request: Request, who: str | None = Depends(principal)) -> ModerationsResponse:
    """OpenAI's `POST /v1/moderations`, for images: point an OpenAI client's base URL here."""
    svc = service(request)
    ctype = content_type(request)
    if ctype != "application/json":
        raise APIError(415, "unsupported_content_type", f"send JSON (got content type {ctype or 'none'!r})")
    body = await json_body(request)
    if not isinstance(body, dict) or "input" not in body:
        raise APIError(400, "missing_input", "the body needs 'input' (image content parts) and optionally 'model'")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "bad_model", "'model' is a string")
    echo, targets = resolve_model(svc, model)
    urls = image_urls(body["input"])
    fetched = await asyncio.gather(*(image_bytes(svc, u, f"input[{i}]") for i, u in enumerate(urls)))
    outs = await asyncio.gather(*(judge(svc, data, name, targets, source=src, who=who) for data, name, src in fetched))
    return ModerationsResponse(id=f"modr-{uuid.uuid4().hex}", model=echo, results=[result_of(svc, o) for o in outs])
