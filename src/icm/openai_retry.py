"""Reading failed HTTP exchanges and timing their retries, for :mod:`icm.openai_http`.

Pure functions, no I/O: whether a status is transient, the server's own error message,
``Retry-After``, the wait before a retry (full jitter; ``Retry-After`` a minimum with
jitter on top) and what kind of transport failure an exception is (a server that cannot be
reached, a dropped request, a truncated answer).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icm.openai_http import ServerSettings

__all__ = [
    "RETRY_STATUSES",
    "backoff",
    "is_retryable_status",
    "retry_after",
    "retry_wait",
    "server_message",
    "transport_failure",
]

RETRY_STATUSES: frozenset[int] = frozenset({408, 409, 429})  # plus every 5xx: what the SDK retries




def is_retryable_status(status: int) -> bool:
    """Whether the SDK retries a response with this status (408, 409, 429, 5xx)."""
    return status in RETRY_STATUSES or status >= 500


def server_message(resp: Any, limit: int = 500) -> str:
    """The server's error message: OpenAI ``{"error": {"message"}}``, vLLM ``{"message"}``,
    FastAPI ``{"detail"}``, else the body text; at most ``limit`` characters.

    ``resp`` is an ``httpx`` (or ``httpx2``) response whose body has been read.
    """
    try:
        body = resp.json()
    except ValueError:
        body = None
    msg: Any = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
        elif isinstance(err, str):
            msg = err
        msg = msg or body.get("message") or body.get("detail")
    if not msg:
        msg = resp.text
    msg = str(msg).strip() or getattr(resp, "reason_phrase", "") or f"HTTP {resp.status_code}"
    return msg[:limit]


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP date) or ``retry-after-ms``."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


# --------------------------------------------------------------------------- waits


def backoff(settings: ServerSettings, attempt: int) -> float:
    """The wait before retry ``attempt + 1``: exponential with "full jitter", uniform in
    ``[0, min(max_backoff, backoff_base * 2**attempt)]``: clients that failed together
    spread their retries over the whole window instead of coming back at once."""
    d = min(settings.max_backoff, settings.backoff_base * (2 ** min(attempt, 60)))
    return random.uniform(0, d)


def retry_wait(settings: ServerSettings, attempt: int, after: float | None) -> float:
    """The wait before retry ``attempt + 1`` when the server may have said ``Retry-After``.

    Without it, :func:`backoff`. With it, the server's wait (capped at ``max_backoff``) is
    a minimum and a random time is added on top, uniform up to the larger of that wait and
    the backoff window (itself capped at ``max_backoff``): the retries of the requests a
    server turned away at once with ``Retry-After: 1`` return spread over one to two
    seconds, not in one burst. The wait is at most twice ``max_backoff``.
    """
    if after is None:
        return backoff(settings, attempt)
    floor = min(after, settings.max_backoff)
    d = min(settings.max_backoff, settings.backoff_base * (2 ** min(attempt, 60)))
    return floor + random.uniform(0, min(settings.max_backoff, max(floor, d)))


def transport_failure(err: BaseException) -> tuple[str, str]:
    """``(kind, description)`` of an exception under a failed HTTP exchange.

    ``"connect"`` when no connection could be made (refused, DNS, connect timeout: the
    server cannot be reached), ``"dropped"`` when the server took the request and closed
    the connection without a response, ``"truncated"`` when it closed it in the middle of
    the answer's body, else ``"connection"``.
    """
    name = type(err).__name__
    text = str(err)
    what = f"{name}: {text}" if text else name
    if name in ("ConnectError", "ConnectTimeout") or isinstance(err, ConnectionRefusedError):
        return "connect", what
    low = text.lower()
    if name == "RemoteProtocolError" and "without sending a response" in low:
        return "dropped", what
    if name in ("RemoteProtocolError", "ReadError") and ("complete message body" in low or "incomplete chunked" in low):
        return "truncated", what
    return "connection", what
