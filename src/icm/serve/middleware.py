"""ASGI middleware of the server: request ids and the access log, the body limit, request
metrics, rate-limit headers."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi.responses import JSONResponse

from icm.serve.errors import BodyTooLarge
from icm.serve.logs import clean_request_id, request_id
from icm.serve.metrics import ServerMetrics


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413), by Content-Length or while reading."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    err = BodyTooLarge(self.limit)
                    await JSONResponse({"error": err.code, "detail": err.detail}, status_code=413)(scope, receive, send)
                    return
        seen = 0
        limit = self.limit

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Count requests and time them per route template (bounded label values)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope.get("path", "").startswith("/static/") else "other")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - t0)


class RateLimitHeaders:
    """Add ``RateLimit-Limit/-Remaining/-Reset`` to answers of rate-limited requests."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                state = (scope.get("state") or {}).get("ratelimit")
                if state is not None:
                    have = {k.lower() for k, _ in message.get("headers", [])}
                    extra = [(k.lower().encode(), v.encode()) for k, v in state.headers().items() if k.lower().encode() not in have]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_wrapper)


access_log = logging.getLogger("icm.serve.access")


class RequestContext:
    """Give every request an id and log one access line for it.

    The id is the client's ``X-Request-ID`` when that is 1 to 128 printable characters, a new
    one otherwise; every answer carries it in ``X-Request-ID``, every record logged while the
    request is served carries it (:data:`icm.serve.logs.request_id`), and so do its decisions.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), None)
        rid = clean_request_id(given)
        token = request_id.set(rid)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or scope.get("path", "")
            ms = round((time.perf_counter() - t0) * 1000, 3)
            key, ids = state.get("key_name"), state.get("decision_ids")
            access_log.info(
                "%s %s %d %.1f ms%s%s", scope.get("method"), route, status, ms,
                f" key={key}" if key else "", f" decisions={ids}" if ids else "",
                extra={"request_id": rid, "method": scope.get("method"), "route": route, "status": status,
                       "latency_ms": ms, "key": key, "decision_ids": ids},
            )
            request_id.reset(token)
