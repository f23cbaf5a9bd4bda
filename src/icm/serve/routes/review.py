"""Decisions, reviews, kept images and the review page."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from icm.serve.errors import APIError
from icm.serve.routes.common import ERRORS, MAX_ID, principal, service
from icm.serve.store import FORMAT_MEDIA_TYPES

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["review"])
page_router = APIRouter(include_in_schema=False)


class ReviewIn(BaseModel):
    verdict: Literal["allow", "block"] = Field(description="The reviewer's final verdict")
    product: str | None = Field(None, max_length=200, description="The correct attribute product, if the reviewer names one")
    note: str | None = Field(None, max_length=4000, description="Why; exported as the explanation for tuning")
    reviewer: str | None = Field(None, max_length=200, description="Who reviews (default: the API key's name)")


@router.get("/v1/decisions", responses=ERRORS, summary="Recent decisions, newest first")
def decisions(
    request: Request,
    limit: int = Query(50, ge=1, le=500),
    before_id: int | None = Query(None, ge=1, le=MAX_ID, description="Page: decisions with a smaller id"),
    verdict: Literal["allow", "review", "block"] | None = None,
    reviewed: bool | None = None,
    policy: str | None = None,
    _who: str | None = Depends(principal),
) -> dict[str, Any]:
    svc = service(request)
    items = svc.store.list_decisions(limit=limit, before_id=before_id, verdict=verdict, reviewed=reviewed, policy=policy)
    return {"decisions": items, "total": svc.store.count_decisions()}


@router.get("/v1/decisions/{decision_id}", responses=ERRORS, summary="One decision with its reviews")
def decision(request: Request, decision_id: int = PathParam(ge=1, le=MAX_ID), _who: str | None = Depends(principal)) -> dict[str, Any]:
    d = service(request).store.get_decision(decision_id)
    if d is None:
        raise APIError(404, "no_such_decision", f"no decision {decision_id}")
    d["image_url"] = f"/v1/images/{d['image_sha256']}" if d["image_kept"] and d["image_sha256"] else None
    return d


@router.post(
    "/v1/decisions/{decision_id}/reviews", status_code=201, responses=ERRORS, summary="Confirm or override a decision",
)
def review(
    request: Request, body: ReviewIn, decision_id: int = PathParam(ge=1, le=MAX_ID), who: str | None = Depends(principal)
) -> dict[str, Any]:
    svc = service(request)
    d = svc.store.get_decision(decision_id)
    if d is None:
        raise APIError(404, "no_such_decision", f"no decision {decision_id}")
    reviewer = (body.reviewer or "").strip() or who
    if not reviewer:
        raise APIError(422, "missing_reviewer", "say who reviews: give 'reviewer' (no API key identifies you)")
    if body.product is not None:
        p = svc.policies.get(d["policy"])
        if p is None:
            raise APIError(422, "unknown_policy", f"this server does not know the decision's policy {d['policy']!r}")
        if body.product not in p.product_map:
            raise APIError(422, "unknown_product", f"policy {p.name!r} has no product {body.product!r}")
    r = svc.store.add_review(
        decision_id, verdict=body.verdict, product=body.product, note=(body.note or "").strip() or None,
        reviewer=reviewer, api_key_name=who,
    )
    svc.metrics.reviews.labels(r["action"]).inc()
    return r


@router.get(
    "/v1/images/{sha256}", responses={**ERRORS, 200: {"content": {"image/*": {}}}},
    summary="A kept image, by SHA-256", response_class=Response,
)
def image(request: Request, sha256: str, _who: str | None = Depends(principal)) -> Response:
    svc = service(request)
    if svc.images is None:
        raise APIError(404, "images_not_kept", "this server does not keep images (--no-keep-images)")
    try:
        data = svc.images.get(sha256.lower())
    except ValueError:
        data = None
    if data is None:
        raise APIError(404, "no_such_image", f"no kept image {sha256}")
    return Response(
        data, media_type=media_type(data),
        headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


def media_type(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return FORMAT_MEDIA_TYPES.get(im.format or "", "application/octet-stream")
    except Exception:  # noqa: BLE001
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
