"""Decisions, reviews, kept images and the review page.

A reviewer is the API key's name, never a field of the body (a body's ``reviewer`` other than
the key's name is a 403); only without keys, when the server trusts its local callers, does
the body say who reviews. A key without the ``read_all`` permission (a client) sees only its own
decisions and images: another key's are a 404, as if they did not exist.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from icm.moderation.image_base import ImageLoadError
from icm.serve.auth import Caller
from icm.serve.errors import APIError, image_error
from icm.serve.limits import Overloaded
from icm.serve.routes.common import ERRORS, MAX_ID, can_review, principal, service
from icm.serve.service import Service
from icm.serve.store import FORMAT_MEDIA_TYPES, ClaimConflict
from icm.serve.store_rows import ReviewWithdrawRefused
from icm.serve.thumbs import ThumbnailCache, make_thumbnail, thumbnail_weight

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["review"])
page_router = APIRouter(include_in_schema=False)


class ReviewIn(BaseModel):
    verdict: Literal["allow", "block"] = Field(description="The reviewer's final verdict")
    product: str | None = Field(None, max_length=200, description="The correct attribute product, if the reviewer names one")
    note: str | None = Field(None, max_length=4000, description="Why; exported as the explanation for tuning")
    reviewer: str | None = Field(
        None, max_length=200,
        description="Who reviews: with API keys always the key's name (another name is a 403); without keys, required",
    )


@router.get("/v1/decisions", responses=ERRORS, summary="Recent decisions, newest first")
def decisions(
    request: Request,
    limit: int = Query(50, ge=1, le=500),
    before_id: int | None = Query(None, ge=1, le=MAX_ID, description="Page: decisions with a smaller id"),
    verdict: Literal["allow", "review", "block"] | None = None,
    reviewed: bool | None = None,
    policy: str | None = None,
    who: Caller = Depends(principal),
) -> dict[str, Any]:
    """A client key gets its own decisions only (and their number as `total`)."""
    svc = service(request)
    items = svc.store.list_decisions(
        limit=limit, before_id=before_id, verdict=verdict, reviewed=reviewed, policy=policy, client=who.scope
    )
    return {"decisions": items, "total": svc.store.count_decisions(client=who.scope)}


@router.get("/v1/decisions/{decision_id}", responses=ERRORS, summary="One decision with its reviews")
def decision(request: Request, decision_id: int = PathParam(ge=1, le=MAX_ID), who: Caller = Depends(principal)) -> dict[str, Any]:
    d = service(request).store.get_decision(decision_id)
    if d is None or (who.scope is not None and d["client"] != who.scope):
        raise APIError(404, "no_such_decision", f"no decision {decision_id}")
    d["image_url"] = f"/v1/images/{d['image_sha256']}" if d["image_kept"] and d["image_sha256"] else None
    return d


@router.post(
    "/v1/decisions/{decision_id}/reviews", status_code=201, responses=ERRORS, summary="Confirm or override a decision",
)
def review(
    request: Request, body: ReviewIn, decision_id: int = PathParam(ge=1, le=MAX_ID), who: Caller = Depends(can_review)
) -> dict[str, Any]:
    svc = service(request)
    reviewer = _reviewer(body.reviewer, who)
    d = svc.store.get_decision(decision_id)
    if d is None:
        raise APIError(404, "no_such_decision", f"no decision {decision_id}")
    if body.product is not None:
        p = svc.policies.get(d["policy"])
        if p is None:
            raise APIError(422, "unknown_policy", f"this server does not know the decision's policy {d['policy']!r}")
        if body.product not in p.product_map:
            raise APIError(422, "unknown_product", f"policy {p.name!r} has no product {body.product!r}")
    try:
        r = svc.store.add_review(
            decision_id, verdict=body.verdict, product=body.product, note=(body.note or "").strip() or None,
            reviewer=reviewer, api_key_name=who.name,
        )
    except ClaimConflict as exc:
        raise APIError(409, "claimed", f"{exc}: two people do not decide the same item") from None
    svc.metrics.reviews.labels(r["action"]).inc()
    svc.extras.get("wake_webhooks", lambda: None)()
    return r


@router.delete(
    "/v1/decisions/{decision_id}/reviews/{review_id}", responses=ERRORS, summary="Withdraw (undo) one's own recent review",
)
def withdraw_review(
    request: Request, decision_id: int = PathParam(ge=1, le=MAX_ID), review_id: int = PathParam(ge=1, le=MAX_ID),
    reviewer: str | None = Query(None, max_length=200), who: Caller = Depends(can_review),
) -> dict[str, Any]:
    """Only the review's reviewer, within `--undo-seconds` (30 by default) of making it; later, review
    the decision again. The withdrawn review is deleted (a webhook already sent is not recalled);
    a queued decision is back in the queue. Returns the withdrawn review."""
    svc = service(request)
    name = _reviewer(reviewer, who)
    try:
        return svc.store.withdraw_review(decision_id, review_id, name, within_s=svc.config.undo_seconds)
    except KeyError as exc:
        raise APIError(404, "no_such_review", str(exc.args[0])) from None
    except ReviewWithdrawRefused as exc:
        raise APIError(409, "cannot_withdraw", str(exc)) from None


# --------------------------------------------------------------------------- the review queue


class QueueFilters(BaseModel):
    policy: str | None = Field(None, max_length=200)
    rules: str | None = Field(None, max_length=200)
    verdict: Literal["allow", "review", "block"] | None = None
    product: str | None = Field(None, max_length=200)
    since: str | None = Field(None, max_length=40, description="ISO date or time: decisions made at or after it")
    until: str | None = Field(None, max_length=40, description="ISO date or time: decisions made before it")


class ClaimIn(QueueFilters):
    reviewer: str | None = Field(None, max_length=200, description="Who claims: as ReviewIn.reviewer")
    skip: list[int] = Field(default_factory=list, max_length=1000, description="Decisions this reviewer skipped")


class ReviewerIn(BaseModel):
    reviewer: str | None = Field(None, max_length=200)


def _reviewer(given: str | None, who: Caller) -> str:
    """Who reviews or claims: the key's name. A different name in the request is a 403; only a
    server without keys (which trusts its local callers) takes the name from the request."""
    given = (given or "").strip() or None
    if who.name is None:
        if given is None:
            raise APIError(422, "missing_reviewer", "say who reviews: give 'reviewer' (no API key identifies you)")
        return given
    if given is not None and given != who.name:
        raise APIError(
            403, "reviewer_mismatch",
            f"this API key is {who.name!r}: it claims and reviews only as {who.name!r}, not as {given[:100]!r}",
        )
    return who.name


def _with_images(d: dict[str, Any]) -> dict[str, Any]:
    kept = d.get("image_kept") and d.get("image_sha256")
    d["image_url"] = f"/v1/images/{d['image_sha256']}" if kept else None
    d["thumbnail_url"] = f"/v1/images/{d['image_sha256']}/thumbnail" if kept else None
    return d


@router.get("/v1/review-queue", responses=ERRORS, summary="Decisions awaiting a person, oldest first")
def review_queue(
    request: Request,
    filters: QueueFilters = Depends(),
    limit: int = Query(50, ge=1, le=500),
    _who: Caller = Depends(can_review),
) -> dict[str, Any]:
    """Decisions whose verdict is `review`, or that were sampled for audit (`--audit-rate`), and
    that nobody has reviewed yet; each says who holds it (`claimed_by`) while a claim lives.
    `facets` lists the policies, rule sets, verdicts and products present in the whole queue
    (whatever the filters), so a filter offers only values that match something."""
    svc = service(request)
    f = filters.model_dump()
    items = [_with_images(d) for d in svc.store.queue(limit=limit, **f)]
    total = svc.store.queue_count(**f)
    return {
        "items": items, "total": total, "facets": svc.store.queue_facets(),
        "claim_seconds": svc.config.claim_seconds, "undo_seconds": svc.config.undo_seconds,
    }


@router.post("/v1/review-queue/claim", responses={**ERRORS, 204: {"description": "The queue (as filtered) is empty"}},
             summary="Claim the next decision of the queue")
def claim_next(request: Request, body: ClaimIn, who: Caller = Depends(can_review)) -> Response:
    """The oldest queued decision nobody else holds, claimed for `--claim-seconds`; 204 when none is left."""
    svc = service(request)
    reviewer = _reviewer(body.reviewer, who)
    d = svc.store.claim_next(
        reviewer, ttl_s=svc.config.claim_seconds, skip=body.skip, **body.model_dump(exclude={"reviewer", "skip"})
    )
    if d is None:
        return Response(status_code=204)
    full = svc.store.get_decision(d["id"]) or d
    full.update({"claimed_by": d["claimed_by"], "claim_expires_at": d["claim_expires_at"]})
    return JSONResponse(_with_images(full))


@router.post("/v1/decisions/{decision_id}/claim", responses=ERRORS, summary="Claim one decision")
def claim(request: Request, body: ReviewerIn, decision_id: int = PathParam(ge=1, le=MAX_ID),
          who: Caller = Depends(can_review)) -> dict[str, Any]:
    svc = service(request)
    reviewer = _reviewer(body.reviewer, who)
    try:
        return svc.store.claim(decision_id, reviewer, ttl_s=svc.config.claim_seconds)
    except KeyError:
        raise APIError(404, "no_such_decision", f"no decision {decision_id}") from None
    except ClaimConflict as exc:
        raise APIError(409, "claimed", str(exc)) from None


@router.delete("/v1/decisions/{decision_id}/claim", status_code=204, responses=ERRORS, summary="Give a claim back (skip)")
def release(request: Request, decision_id: int = PathParam(ge=1, le=MAX_ID), reviewer: str | None = Query(None, max_length=200),
            who: Caller = Depends(can_review)) -> Response:
    """Only the claim's holder gives it back: another reviewer's live claim is a 409."""
    try:
        service(request).store.release(decision_id, _reviewer(reviewer, who))
    except ClaimConflict as exc:
        raise APIError(409, "claimed", str(exc)) from None
    return Response(status_code=204)


@router.get("/v1/review-queue/agreement", responses=ERRORS, summary="Reviewer-model and reviewer-reviewer agreement")
def agreement(request: Request, _who: Caller = Depends(can_review)) -> dict[str, Any]:
    return service(request).store.agreement()


@router.get(
    "/v1/images/{sha256}/thumbnail", responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}},
    summary="A kept image, at most 160 pixels a side", response_class=Response,
)
async def thumbnail(request: Request, sha256: str, who: Caller = Depends(principal)) -> Response:
    svc = service(request)
    key = sha256.lower()
    cache: ThumbnailCache = svc.extras.setdefault("thumbnails", ThumbnailCache())

    def visible() -> bool:
        # a client sees only its own decisions' images; a cached thumbnail is served only while
        # its image is kept (retention deletes both)
        return svc.images is not None and _may_see(svc, who, key) and svc.images.path(key).is_file()

    try:
        kept = await run_in_threadpool(visible)
    except ValueError:
        kept = False
    if not kept:
        raise APIError(404, "no_such_image", f"no kept image {sha256}")
    assert svc.images is not None
    jpeg = cache.get(key)
    if jpeg is None:
        data = await run_in_threadpool(svc.images.get, key)
        if data is None:
            raise APIError(404, "no_such_image", f"no kept image {sha256}")
        # Decoding holds its pixels of the server's budget, as an upload does: sixteen
        # thumbnails of a 40-megapixel PNG decode one at a time, then come from the cache.
        weight = await run_in_threadpool(thumbnail_weight, data, svc.config.max_pixels)
        held = svc.pixels.hold(weight, len(data)) if svc.pixels is not None else contextlib.nullcontext()
        try:
            async with held:
                jpeg = cache.get(key)
                if jpeg is None:
                    jpeg = await run_in_threadpool(make_thumbnail, data, svc.config.max_pixels, f"image {key}")
                    cache.put(key, jpeg)
        except Overloaded as exc:
            raise APIError(503, "overloaded", f"the server is busy: {exc}; retry later", headers={"Retry-After": "1"}) from None
        except ImageLoadError as exc:
            raise image_error(exc) from None
    return Response(
        jpeg, media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


@router.get(
    "/v1/images/{sha256}", responses={**ERRORS, 200: {"content": {"image/*": {}}}},
    summary="A kept image, by SHA-256", response_class=Response,
)
def image(request: Request, sha256: str, who: Caller = Depends(principal)) -> Response:
    svc = service(request)
    if svc.images is None:
        raise APIError(404, "images_not_kept", "this server does not keep images (--no-keep-images)")
    try:
        data = svc.images.get(sha256.lower()) if _may_see(svc, who, sha256) else None
    except ValueError:
        data = None
    if data is None:
        raise APIError(404, "no_such_image", f"no kept image {sha256}")
    return Response(
        data, media_type=media_type(data),
        headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


def _may_see(svc: Service, who: Caller, sha256: str) -> bool:
    """Whether the caller may have a kept image: any with ``read_all``, a client only the images
    of its own decisions."""
    return who.scope is None or svc.store.client_has_image(who.scope, sha256.lower())


def media_type(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return FORMAT_MEDIA_TYPES.get(im.format or "", "application/octet-stream")
    except Exception:  # noqa: BLE001 - Pillow raises anything on a corrupt header; the bytes are still served
        return "application/octet-stream"


# --------------------------------------------------------------------------- the page


@page_router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/review")


@page_router.get("/review")
def review_page() -> HTMLResponse:
    html = (STATIC_DIR / "review.html").read_text(encoding="utf-8")
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": (
                "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )
