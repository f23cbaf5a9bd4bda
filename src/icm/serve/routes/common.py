"""What every router uses: the service dependency, the caller's identity, the error shapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from icm.serve.auth import AuthThrottle, Caller, Permission, client_address, cross_site, host_allowed
from icm.serve.errors import APIError
from icm.serve.limits import RateLimited
from icm.serve.service import Service

MAX_ID = 2**63 - 1  # the largest id a SQL integer column holds; larger ones are 422, not a 500


class ErrorBody(BaseModel):
    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {  # FastAPI's `responses=` type
    400: {"model": ErrorBody, "description": "Malformed request (bad JSON or base64)"},
    401: {"model": ErrorBody, "description": "Missing or invalid API key"},
    403: {"model": ErrorBody, "description": "The key's role may not do this, a reviewer name other than the key's, a path "
          "outside the image folder, paths disabled, or without keys: a non-loopback client, a Host that is not this "
          "machine's, or a request from another site's page"},
    404: {"model": ErrorBody, "description": "No such file, decision or image"},
    409: {"model": ErrorBody, "description": "The decision is claimed by another reviewer"},
    413: {"model": ErrorBody, "description": "Image over the byte or pixel limit"},
    415: {"model": ErrorBody, "description": "Not an image, or an unsupported content type"},
    422: {"model": ErrorBody, "description": "Missing field, unknown policy or rule set, empty or corrupt image"},
    429: {"model": ErrorBody, "description": "Over the key's requests per minute (see Retry-After and the RateLimit-* headers), "
          "or too many wrong API keys from this address within a minute"},
    502: {"model": ErrorBody, "description": "The model backend failed on this image"},
    503: {"model": ErrorBody, "description": "Too many requests or too much memory waiting (see Retry-After), or shutting down"},
}


def service(request: Request) -> Service:
    return request.app.state.service


def content_type(request: Request) -> str:
    """The request's media type, lower case, without parameters (``multipart/form-data``)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def json_body(request: Request) -> object:
    """The parsed JSON body; a 400 ``bad_json`` when it is not JSON. A body over the size limit
    (:class:`APIError` from the reading) and a client that went away propagate as they are."""
    try:
        return await request.json()
    except (APIError, ClientDisconnect):
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise APIError(400, "bad_json", f"the body is not valid JSON ({type(exc).__name__}: {exc})") from None


def principal(request: Request) -> Caller:
    """The caller (its key's name and role; an unnamed admin without keys); enforces auth, Host,
    same-site and the rate limit."""
    svc = service(request)
    config = svc.config
    client = request.client.host if request.client else None
    if "x-forwarded-for" in request.headers or "forwarded" in request.headers:
        client = None  # relayed by a proxy: the real client is not known to be local
    if not svc.auth.enabled:
        # Trust by network location must not extend to pages of other sites in the user's browser.
        host = request.headers.get("host")
        if not config.allow_unauthenticated and not host_allowed(host, [*config.allowed_hosts, config.host]):
            raise APIError(
                403, "host_not_allowed",
                f"this server answers requests for this machine only, not for Host {(host or '')[:100]!r} "
                "(DNS rebinding protection; add the name with --allowed-host, or configure API keys)",
            )
        why = cross_site(request.headers)
        if why is not None:
            raise APIError(
                403, "cross_site_request",
                f"refused a request from another site's page ({why}): without API keys only this server's "
                "own pages and non-browser clients may call it",
            )
    throttle: AuthThrottle | None = svc.extras.get("auth_throttle")
    address = client_address(request.client.host if request.client else None, request.headers.get("x-forwarded-for"),
                             svc.extras.get("trusted_proxies", ()))
    if throttle is not None and svc.auth.enabled:
        try:
            throttle.check(address)
        except APIError:
            svc.metrics.rejected.labels("auth_throttled").inc()
            raise
    try:
        who = svc.auth.principal(request.headers.get("authorization"), client)
    except APIError as exc:
        if throttle is not None and exc.code == "invalid_api_key":
            throttle.failed(address)
        raise
    request.state.key_name = who.name  # for the access log
    if svc.limiter is not None and request.url.path != "/metrics":
        try:
            state = svc.limiter.hit(f"key:{who.name}" if who.name else f"client:{client or 'unknown'}")
        except RateLimited as exc:
            svc.metrics.rejected.labels("rate_limited").inc()
            raise APIError(
                429, "rate_limited",
                f"over the limit of {exc.state.limit} requests per minute; retry in {exc.state.reset} s",
                headers={**exc.state.headers(), "Retry-After": str(exc.state.reset)},
            ) from None
        request.state.ratelimit = state
    return who


def allowed(permission: Permission) -> Callable[[Request], Caller]:
    """A dependency: the caller, when its role has ``permission`` (a 403 ``forbidden`` otherwise)."""

    def check(request: Request) -> Caller:
        who = principal(request)
        who.require(permission)
        return who

    return check


can_moderate = allowed("moderate")
can_review = allowed("review")
can_read_metrics = allowed("metrics")


def is_admin(request: Request) -> bool:
    """Whether the caller may see the server's operational details (``/healthz``'s model, backend,
    policy, version): today any caller :func:`principal` accepts (a valid key; without keys, a
    local caller on an allowed Host). Never raises: a refused caller is simply not an admin.

    With key roles: a key whose role may read the metrics (admin); a key without a role is an admin.
    """
    try:
        return principal(request).can("metrics")
    except APIError:
        return False
