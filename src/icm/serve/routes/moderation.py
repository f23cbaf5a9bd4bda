"""``POST /v1/moderate``: the native moderation endpoint, and the image pipeline it shares
with the OpenAI-compatible ``POST /v1/moderations`` (:mod:`icm.serve.routes.openai_moderations`)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from icm.moderation.backends.base import BackendConfigError
from icm.moderation.images import ImageLoadError, LoadedImage, load_image
from icm.moderation.record import ModerationRecord
from icm.serve.auth import Caller
from icm.serve.batching import BatcherClosed, QueueFull
from icm.serve.errors import APIError, image_error
from icm.serve.limits import Overloaded, decode_weight, loaded_bytes, reduce_loaded
from icm.serve.logs import request_id
from icm.serve.paths import PathRefused, read_beneath
from icm.serve.routes.common import ERRORS, can_moderate, content_type, json_body, service
from icm.serve.routes.idempotency import idempotent
from icm.serve.service import Job, JobGroup, Outcome, Service
from icm.serve.store import DecisionMeta

log = logging.getLogger("icm.serve")

IMAGE_FIELD = "image"

router = APIRouter(tags=["moderation"])


class ModerateJSON(BaseModel):
    """JSON body of ``POST /v1/moderate``: exactly one of ``image_base64`` and ``path``."""

    image_base64: str | None = Field(None, description="The image file's bytes, base64 (a data: URL prefix is accepted)")
    path: str | None = Field(None, description="A file inside the server's --image-root (relative to it)")
    filename: str | None = Field(None, max_length=500, description="A name for the image, recorded with the decision")
    policy: str | None = Field(None, description="Policy name (default: the server's)")
    rules: str | None = Field(None, description="Rule set of the policy (default: the policy's default)")


class ModerateResponse(BaseModel):
    decision_id: int = Field(description="The stored decision's id")
    review_url: str
    record: ModerationRecord


MODERATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {"type": "string", "format": "binary", "description": "The image file"},
                        "policy": {"type": "string"},
                        "rules": {"type": "string"},
                    },
                }
            },
            "application/json": {"schema": ModerateJSON.model_json_schema()},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# --------------------------------------------------------------------------- the shared pipeline


def check_size(svc: Service, n: int) -> None:
    limit = svc.config.max_upload_bytes
    if n > limit:
        svc.metrics.rejected.labels("image_too_large").inc()
        raise APIError(413, "image_too_large", f"the image is over the {limit:,}-byte upload limit")


def decode_base64(svc: Service, text: str, field: str) -> bytes:
    """Base64 (with or without a ``data:...;base64,`` prefix) to bytes, within the upload limit."""
    text = text.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    limit = svc.config.max_upload_bytes
    if len(text) > (limit + 2) * 4 // 3 + 4:
        svc.metrics.rejected.labels("image_too_large").inc()
        raise APIError(413, "image_too_large", f"the image is over the {limit:,}-byte limit")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "bad_base64", f"{field} is not valid base64") from None
    check_size(svc, len(data))
    return data


async def load(svc: Service, data: bytes, name: str, source: str) -> tuple[LoadedImage, float]:
    """Decode within the server's pixel budget; returns the image and the load time in ms."""
    config = svc.config
    t0 = time.perf_counter()
    assert svc.pixels is not None
    # Decoding holds its pixels (read from the header) of the server's budget, so many large
    # images decode a few at a time; an image over --max-pixels is refused without decoding.
    pixels = await run_in_threadpool(decode_weight, data, config.max_pixels, config.reduce_to_pixels)

    def decode() -> LoadedImage:
        im = load_image(
            data, name=name, max_pixels=config.max_pixels, max_bytes=config.max_upload_bytes,
            draft_pixels=config.reduce_to_pixels or None, max_view_pixels=config.reduce_to_pixels or None,
        )
        im = reduce_loaded(im, config.reduce_to_pixels)
        svc.prepare(im)
        return im

    try:
        async with svc.pixels.hold(pixels, len(data)):
            im = await run_in_threadpool(decode)
    except Overloaded as exc:
        svc.metrics.rejected.labels("overloaded").inc()
        raise APIError(503, "overloaded", f"the server is busy: {exc}; retry later", headers={"Retry-After": "1"}) from None
    except ImageLoadError as exc:
        err = image_error(exc)
        if source == "path":  # a server-side file: say what is wrong, never what it contains
            err = APIError(err.status, err.code, f"{name!r} in the server's image folder: {err.code.replace('_', ' ')}")
        svc.metrics.rejected.labels(err.code).inc()
        raise err from None
    return im, round((time.perf_counter() - t0) * 1000, 3)


async def submit(svc: Service, job: Job) -> Outcome:
    """Queue one job for the batch worker; the HTTP errors of a full queue, a failed backend or store."""
    assert svc.batcher is not None
    try:
        return await svc.batcher.submit(job, cost=len(job.data) + loaded_bytes(job.image))
    except QueueFull as exc:
        raise APIError(503, "overloaded", f"the server is busy: {exc}; retry later", headers={"Retry-After": "1"}) from None
    except BatcherClosed as exc:
        raise APIError(503, "unavailable", str(exc), headers={"Retry-After": "5"}) from None
    except BackendConfigError as exc:  # a rejected key, an unknown model: no decision can be made
        log.error("the backend cannot work: %s", exc)
        raise APIError(
            503, "backend_unavailable", "the model backend is misconfigured or unreachable (see the server log)",
            headers={"Retry-After": "30"},
        ) from None
    except Exception as exc:  # any other failure is this request's 503, logged in full
        log.exception("batch failed: %s: %s", type(exc).__name__, exc)
        raise APIError(
            503, "store_failed", "the decision could not be made or stored (see the server log)",
            headers={"Retry-After": "5"},
        ) from None


async def judge(
    svc: Service, data: bytes, name: str, targets: Sequence[tuple[str, str]], *, source: str, who: str | None,
) -> list[Outcome]:
    """Decode an image once and judge it under each (policy, rule set); each judgement is a
    stored decision. A judgement the backend failed on is a 502: never a silent pass."""
    im, load_ms = await load(svc, data, name, source)
    (outs,) = await judge_all(svc, [Loaded(im, load_ms, data, name, source)], targets, who=who)
    return outs


@dataclass
class Loaded:
    """An image :func:`load` decoded, with its bytes, name and source."""

    image: LoadedImage
    load_ms: float
    data: bytes
    name: str
    source: str


async def judge_all(
    svc: Service, images: Sequence[Loaded], targets: Sequence[tuple[str, str]], *, who: str | None,
) -> list[list[Outcome]]:
    """Judge every image under every target: one list of outcomes per image, in target order.

    All or nothing: the request's decisions are committed together once all are made
    (:class:`~icm.serve.service.JobGroup`), so a judgement the backend failed on (a 502), a full
    queue or a failed store (503) leaves no decision and no webhook event of the request.
    A request decodes all its images before it calls this: an undecodable one makes no decision.
    """
    pairs = [(im, t) for im in images for t in targets]
    group = JobGroup(size=len(pairs))
    jobs = [
        Job(
            image=im.image, data=im.data, policy=p, rules=r, load_ms=im.load_ms, group=group, index=k,
            meta=DecisionMeta(
                image_name=im.name, image_format=im.image.format, source=im.source, client=who, request_id=request_id.get(),
            ),
        )
        for k, (im, (p, r)) in enumerate(pairs)
    ]
    try:
        outs = await asyncio.gather(*(submit(svc, j) for j in jobs))
    except BaseException:
        group.failed = True  # jobs still queued are judged, but never committed
        raise
    for (im, _), out in zip(pairs, outs, strict=True):
        if not out.record.ok:  # the upstream's own error text stays in the server log
            ref = secrets.token_hex(4)
            log.warning("backend failed on %s [error %s]: %s", im.name, ref, out.record.error or "no decision")
            raise APIError(502, "backend_failed", f"the model backend failed on this image (error {ref}; details in the server log)")
    if group.ids is None:  # every job judged, yet not committed: cannot happen, never a silent pass
        raise APIError(503, "store_failed", "the decisions could not be stored (see the server log)", headers={"Retry-After": "5"})
    n, ids = len(targets), group.ids
    return [[Outcome(record=outs[i * n + t].record, decision_id=ids[i * n + t]) for t in range(n)] for i in range(len(images))]


def clean_name(name: str | None) -> str | None:
    """An uploaded file's base name, printable, at most 200 characters."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:200].strip()
    return base or None


# --------------------------------------------------------------------------- POST /v1/moderate


@router.post(
    "/v1/moderate",
    response_model=ModerateResponse,
    responses=ERRORS,
    openapi_extra=MODERATE_BODY,
    summary="Moderate one image",
)
async def moderate(request: Request, who: Caller = Depends(can_moderate)) -> Any:
    """One image in, one stored decision out.

    The image comes as a multipart upload in the form field `image`, as JSON
    `{"image_base64": ...}` or `{"path": ...}` (a file inside the server's `--image-root`),
    or as the raw body with an `image/*` content type (`?policy=&rules=` in the query,
    its name in `X-Filename`). `policy` and `rules` choose the policy and rule set.
    An `Idempotency-Key` header makes a retry return the first answer (docs/operations.md).
    """
    return await idempotent(request, who, lambda: _moderate(request, who))


async def _moderate(request: Request, who: Caller) -> ModerateResponse:
    svc = service(request)
    ctype = content_type(request)
    if ctype == "multipart/form-data":
        data, name, policy, rules, source = await _from_multipart(svc, request)
    elif ctype == "application/json":
        data, name, policy, rules, source = await _from_json(svc, request)
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await request.body()
        check_size(svc, len(data))
        name = clean_name(request.headers.get("x-filename")) or "raw"
        policy, rules, source = request.query_params.get("policy"), request.query_params.get("rules"), "upload"
    else:
        raise APIError(
            415, "unsupported_content_type",
            f"send multipart/form-data with the image in the field '{IMAGE_FIELD}', JSON with "
            f"'image_base64' or 'path', or the image itself as image/* (got content type {ctype or 'none'!r})",
        )
    target = svc.resolve(policy, rules)
    (out,) = await judge(svc, data, name, [target], source=source, who=who.name)
    assert out.decision_id is not None
    request.state.decision_ids = [out.decision_id]
    return ModerateResponse(decision_id=out.decision_id, review_url=f"/review#decision={out.decision_id}", record=out.record)


async def _from_multipart(svc: Service, request: Request) -> tuple[bytes, str, str | None, str | None, str]:
    try:
        form = await request.form(max_files=2, max_fields=16, max_part_size=64 * 1024)
    except (APIError, ClientDisconnect):
        raise
    except Exception as exc:  # noqa: BLE001 - starlette's parser errors
        raise APIError(400, "bad_multipart", f"the multipart body could not be parsed: {getattr(exc, 'detail', exc)}") from None
    upload = form.get(IMAGE_FIELD)
    if not isinstance(upload, UploadFile):
        files = [k for k, v in form.multi_items() if isinstance(v, UploadFile)]
        hint = f" (the request has a file in {', '.join(map(repr, files))})" if files else ""
        raise APIError(422, "missing_image", f"the image goes in the multipart form field '{IMAGE_FIELD}'{hint}")
    data = await upload.read(svc.config.max_upload_bytes + 1)
    await upload.close()
    check_size(svc, len(data))
    name = clean_name(upload.filename) or "upload"
    policy = form.get("policy")
    rules = form.get("rules")
    source = form.get("source")
    return (
        data, name,
        policy if isinstance(policy, str) and policy else None,
        rules if isinstance(rules, str) and rules else None,
        "page" if source == "page" else "upload",
    )


async def _from_json(svc: Service, request: Request) -> tuple[bytes, str, str | None, str | None, str]:
    raw = await json_body(request)
    try:
        body = ModerateJSON.model_validate(raw)
    except ValidationError as exc:
        raise APIError(422, "bad_request", f"invalid request: {exc}") from None
    if (body.image_base64 is None) == (body.path is None):
        raise APIError(422, "missing_image", "give exactly one of 'image_base64' and 'path'")
    if body.image_base64 is not None:
        data = decode_base64(svc, body.image_base64, "'image_base64'")
        return data, clean_name(body.filename) or "base64", body.policy, body.rules, "base64"
    data, rel = await run_in_threadpool(_read_root_file, svc, body.path or "")
    return data, rel, body.policy, body.rules, "path"


def _read_root_file(svc: Service, path: str) -> tuple[bytes, str]:
    """Read a file beneath --image-root without a check-then-open race (see icm.serve.paths)."""
    config = svc.config
    if not config.image_root:
        raise APIError(403, "paths_disabled", "server-side paths are off: the server was started without --image-root")
    try:
        return read_beneath(config.image_root, path, config.max_upload_bytes)
    except PathRefused as exc:
        if exc.code == "image_too_large":
            svc.metrics.rejected.labels("image_too_large").inc()
        raise APIError(exc.status, exc.code, exc.detail) from None
