"""``Idempotency-Key`` on the moderation routes: a retried request gets the first answer (issue 21).

The key (1 to 255 printable characters) is scoped to the API key's name. The first request
with it reserves it in the database and stores its answer (status and JSON body) when it
succeeds; a repeat within ``--idempotency-window`` seconds gets that answer again, with
``Idempotent-Replayed: true``, from any replica, and stores no new decision. The same key
with another body is a 422 ``idempotency_key_reused``; a repeat while the first still runs
is a 409 ``idempotency_key_in_use``. A request that fails (any error) releases its key, so
that a retry runs again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from icm.serve.auth import Caller
from icm.serve.errors import APIError
from icm.serve.routes.common import service
from icm.serve.store_idempotency import IdempotencyKeys

MAX_KEY = 255
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def body_digest(request: Request, body: bytes) -> str:
    """SHA-256 of what the request asks: its content type, query and body (a multipart body
    without its boundary, which clients draw anew for each attempt)."""
    ctype = request.headers.get("content-type", "")
    found = _BOUNDARY.search(ctype)
    if found:
        body = body.replace(found.group(1).encode("latin-1"), b"")
        ctype = ctype[: found.start()]
    h = hashlib.sha256()
    for part in (ctype.strip().encode("latin-1"), request.url.query.encode("latin-1"), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


async def idempotent(request: Request, who: Caller, run: Callable[[], Awaitable[BaseModel]]) -> Any:
    """Run ``run`` once per ``Idempotency-Key``; without the header, simply run it."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return await run()
    if not key or len(key) > MAX_KEY or not all(" " <= ch <= "~" for ch in key):
        raise APIError(400, "bad_idempotency_key", f"Idempotency-Key is 1 to {MAX_KEY} printable ASCII characters")
    keys: IdempotencyKeys = service(request).extras["idempotency"]
    client = who.name or ""
    digest = body_digest(request, await request.body())
    rid = getattr(request.state, "request_id", None)
    found = await run_in_threadpool(keys.begin, client, key, request.url.path, digest, rid)
    if found is not None:
        if found.mismatch:
            raise APIError(
                422, "idempotency_key_reused",
                "this Idempotency-Key was used with a different request (another body or route); use a new key",
            )
        if found.running:
            raise APIError(
                409, "idempotency_key_in_use", "a request with this Idempotency-Key is still running; retry later",
                headers={"Retry-After": "1"},
            )
        return JSONResponse(found.body, status_code=found.status or 200, headers={"Idempotent-Replayed": "true"})
    try:
        result = await run()
    except BaseException:
        keys.release(client, key)  # synchronously: a cancelled request must release it too
        raise
    body = jsonable_encoder(result)
    await run_in_threadpool(keys.finish, client, key, 200, body)
    return JSONResponse(body)
