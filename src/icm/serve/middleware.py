"""ASGI middleware of the server: the body limit, request metrics, rate-limit headers."""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse

from icm.serve.errors import BodyTooLarge
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
