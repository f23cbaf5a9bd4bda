"""``POST /v1/moderations``: OpenAI's moderation API over this server's policies, for images.

A client of OpenAI's API (the official ``openai`` SDKs included) works by changing only its
base URL. ``model`` names the policies (``icm-sexy:children``, several with commas), a
bundle (``icm-standard:teen``), or one of OpenAI's names (``omni-moderation-latest``,
``text-moderation-stable`` ...: the ``icm-standard`` taxonomy, see
:mod:`icm.serve.openai_models`); none is the server's default policy.

``input`` is OpenAI's: an array of content parts is **one** input (its images are judged,
the worst decides; ``{"type": "text"}`` parts beside them are accepted and not judged), a
string or a list of strings is one input per string (an image URL: ``data:`` or an
``http(s)`` URL of an allow-listed host). An input with no image is a 400: this server
judges images, never text.

Each result carries OpenAI's 13 categories (:mod:`icm.serve.openai_results`): the score
of a category is the largest over the judged policies that map it, flagged at the rule
set's review threshold; ``flagged`` is also true when any verdict is review or block (an
uncertain image is never passed as clean). Every judgement is a stored decision, as with
``/v1/moderate`` (the ``icm`` field lists them); an image the backend failed on is a 502,
never ``flagged: false``; image data that does not decode is a 400 ``invalid_request_error``.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from icm.serve.auth import Caller
from icm.serve.errors import APIError
from icm.serve.openai_models import resolve_model
from icm.serve.openai_results import ModerationResult, input_result
from icm.serve.routes.common import ERRORS, can_moderate, content_type, json_body, service
from icm.serve.routes.idempotency import idempotent
from icm.serve.routes.moderation import Loaded, decode_base64, judge_all, load
from icm.serve.service import Outcome, Service

router = APIRouter(tags=["moderation"])

MAX_INPUTS = 32
"""Most images per request (over all its inputs)."""

UNDECODABLE = frozenset({"bad_base64", "bad_data_url", "not_an_image", "corrupt_image", "unreadable_image", "empty_image"})
"""Image errors that are the request's fault: OpenAI's clients get them as a 400 invalid_request_error."""

TEXT_REFUSED = (
    "this server judges images only, not text. Send images as {\"type\": \"image_url\", \"image_url\": "
    "{\"url\": \"data:image/jpeg;base64,...\"}} content parts (text parts beside them are accepted and not judged)"
)


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
                        "model": {
                            "type": "string",
                            "description": "POLICY[:RULES][,POLICY[:RULES]...], BUNDLE[:RULES] or an alias "
                            "(omni-moderation-latest: the icm-standard bundle)",
                        },
                        "input": {
                            "description": "Content parts (one input: its images; text parts are not judged), or "
                            "image URL strings (one input each)",
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


@dataclass
class Input:
    """One of OpenAI's inputs: its image URLs (with where each is in the request) and its text parts."""

    images: list[tuple[str, str]] = field(default_factory=list)
    texts: int = 0


def _is_image_url(text: str) -> bool:
    return text.strip().startswith(("data:", "http://", "https://"))


def parse_inputs(raw: Any) -> list[Input]:
    """OpenAI's ``input``: a string (one input), a list of strings (one input each), or a
    list of content parts (one input). Every input needs an image."""
    if isinstance(raw, str):
        inputs = [Input(images=[(raw.strip(), "input")]) if _is_image_url(raw) else Input(texts=1)]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = [
            Input(images=[(x.strip(), f"input[{i}]")]) if _is_image_url(x) else Input(texts=1) for i, x in enumerate(raw)
        ]
    elif isinstance(raw, list) and raw:
        one = Input()
        for i, item in enumerate(raw):
            where = f"input[{i}]"
            if isinstance(item, str):  # a bare string among content parts: an image URL or text
                if _is_image_url(item):
                    one.images.append((item.strip(), where))
                else:
                    one.texts += 1
                continue
            if not isinstance(item, dict):
                raise APIError(400, "bad_input", f"{where} is neither a string nor a content part object", param=where)
            kind = item.get("type")
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise APIError(400, "bad_input", f"{where}.text is missing (a text part is {{\"type\": \"text\", "
                                   "\"text\": ...}})", param=where)
                one.texts += 1
                continue
            if kind != "image_url":
                raise APIError(400, "bad_input", f"{where} has type {str(kind)[:40]!r}; content parts are 'image_url' or "
                               "'text'", param=where)
            image_url = item.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url if isinstance(image_url, str) else None
            if not isinstance(url, str) or not url.strip():
                raise APIError(400, "bad_input", f"{where}.image_url.url is missing", param=where)
            one.images.append((url.strip(), where))
        inputs = [one]
    elif isinstance(raw, list):
        raise APIError(400, "missing_input", "'input' is empty: send image content parts", param="input")
    else:
        raise APIError(400, "bad_input", "'input' is a string, a list of strings or a list of content parts", param="input")
    for i, inp in enumerate(inputs):
        if not inp.images:
            where = f"input[{i}]" if isinstance(raw, list) and len(inputs) > 1 else "input"
            raise APIError(400, "text_not_supported", f"{where} is text: {TEXT_REFUSED}", param="input")
    n = sum(len(inp.images) for inp in inputs)
    if n > MAX_INPUTS:
        raise APIError(400, "too_many_inputs", f"'input' has {n} images; at most {MAX_INPUTS} per request", param="input")
    return inputs


async def image_bytes(svc: Service, url: str, where: str) -> tuple[bytes, str, str]:
    """(bytes, name, source) of one image URL."""
    if url.startswith("data:"):
        head = url[5:].split(",", 1)[0]
        if ";base64" not in head:
            raise APIError(400, "bad_data_url", f"{where}: the data: URL is not base64 (data:image/...;base64,...)", param=where)
        return decode_base64(svc, url, f"{where}'s data: URL"), "data-url", "data-url"
    fetcher = svc.extras.get("fetcher")
    assert fetcher is not None
    data = await fetcher.fetch(url)
    return data, url.rsplit("/", 1)[-1][:200] or "url", "url"


async def load_url(svc: Service, url: str, where: str) -> Loaded:
    """Fetch and decode one image URL; data that does not decode is a 400."""
    try:
        data, name, src = await image_bytes(svc, url, where)
        im, load_ms = await load(svc, data, name, src)
    except APIError as exc:
        if exc.code in UNDECODABLE:
            detail = exc.detail if exc.detail.startswith(where) else f"{where}: {exc.detail}"
            raise APIError(400, exc.code, detail, exc.headers, param=where) from None
        raise
    return Loaded(im, load_ms, data, name, src)


@router.post(
    "/v1/moderations",
    response_model=ModerationsResponse,
    responses=ERRORS,
    openapi_extra=MODERATIONS_BODY,
    summary="OpenAI-compatible moderation of images",
)
async def moderations(request: Request, who: Caller = Depends(can_moderate)) -> Any:
    """OpenAI's `POST /v1/moderations`, for images: point an OpenAI client's base URL here.

    One result per input (an array of content parts is one input), with all 13 of OpenAI's
    categories; `flagged` is also true when any verdict is review or block. An
    `Idempotency-Key` header makes a retry return the first answer (docs/operations.md).
    """
    return await idempotent(request, who, lambda: _moderations(request, who))


async def _moderations(request: Request, who: Caller) -> ModerationsResponse:
    svc = service(request)
    ctype = content_type(request)
    if ctype != "application/json":
        raise APIError(415, "unsupported_content_type", f"send JSON (got content type {ctype or 'none'!r})")
    body = await json_body(request)
    if not isinstance(body, dict) or "input" not in body:
        raise APIError(400, "missing_input", "the body needs 'input' (image content parts) and optionally 'model'",
                       param="input")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "bad_model", "'model' is a string", param="model")
    echo, targets = resolve_model(svc, model)
    inputs = parse_inputs(body["input"])
    flat = [(i, url, where) for i, inp in enumerate(inputs) for url, where in inp.images]
    judgements, room = len(flat) * len(targets), svc.config.max_queue
    if judgements > room:  # never queued in full: a 503 to retry would fail the same way forever
        raise APIError(
            400, "too_many_inputs", f"{len(flat)} images x {len(targets)} policies is {judgements} judgements, more than the "
            f"{room} this server queues for one request (--max-queue): send fewer images per request", param="input",
        )
    # every image is fetched and decoded before any is judged: a request with a bad image makes no decision
    loaded = await asyncio.gather(*(load_url(svc, url, where) for _, url, where in flat))
    # and all its decisions are committed together, or none (a backend failure on one image: a 502, nothing stored)
    outs = await judge_all(svc, loaded, targets, who=who.name)
    request.state.decision_ids = [o.decision_id for per_image in outs for o in per_image]
    per_input: list[list[list[Outcome]]] = [[] for _ in inputs]
    for (i, _, _), o in zip(flat, outs, strict=True):
        per_input[i].append(o)
    return ModerationsResponse(
        id=f"modr-{uuid.uuid4().hex}", model=echo,
        results=[input_result(svc, targets, imgs, text_parts=inp.texts) for inp, imgs in zip(inputs, per_input, strict=True)],
    )
