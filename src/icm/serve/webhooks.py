"""Webhooks: an event for each ``block`` decision and each reviewer's override, signed, and
retried from the decision store's outbox until the receiver accepts it.

The event is written to the outbox (``icm_webhook_outbox``) in the same transaction as the
decision or review that makes it, so no committed decision loses its event, and a receiver
that is down loses nothing: the dispatcher retries with exponential backoff (1 s, 2 s, 4 s,
... up to ``webhook_max_backoff_s``) until it answers 2xx. Delivery is at least once (a
server killed between the receiver's 2xx and the outbox update sends that event again), so
receivers keep the ``X-ICM-Event-Id`` of what they processed and ignore a repeat.

Each request is ``POST`` with a JSON body and the headers

* ``X-ICM-Event``: ``decision.block`` or ``review.override``;
* ``X-ICM-Event-Id``: the event's id (unique; the body's ``id`` too);
* ``X-ICM-Timestamp``: unix seconds when this attempt was signed;
* ``X-ICM-Signature``: ``sha256=`` + hex HMAC-SHA256, keyed with ``webhook_secret``, of
  ``TIMESTAMP + "." + BODY`` (the raw body bytes).

A receiver recomputes the HMAC over the raw body, compares in constant time, and refuses a
timestamp older than a few minutes (a replayed request): :func:`verify` does all three.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import threading
import time
from collections.abc import Mapping

import httpx

from icm.redact import redact_text
from icm.serve.metrics import ServerMetrics
from icm.serve.store import DecisionStore

log = logging.getLogger("icm.serve.webhooks")

SIGNATURE_HEADER = "X-ICM-Signature"
TIMESTAMP_HEADER = "X-ICM-Timestamp"
EVENT_ID_HEADER = "X-ICM-Event-Id"
EVENT_HEADER = "X-ICM-Event"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-ICM-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Whether a received request is ours: a valid signature over its raw ``body``, recently signed."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        ts = int(lower.get(TIMESTAMP_HEADER.lower(), ""))
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), lower.get(SIGNATURE_HEADER.lower(), ""))


class WebhookDispatcher:
    """Delivers due outbox events in the server's event loop; ``wake()`` may be called from any thread."""

    def __init__(
        self,
        store: DecisionStore,
        url: str,
        secret: str,
        *,
        metrics: ServerMetrics | None = None,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        poll_s: float = 2.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.store, self.url, self.secret, self.metrics = store, url, secret, metrics
        self.base_backoff_s, self.max_backoff_s, self.poll_s, self.timeout_s = base_backoff_s, max_backoff_s, poll_s, timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failures (exponential, jittered, capped)."""
        return min(self.max_backoff_s, self.base_backoff_s * 2 ** max(0, attempts - 1)) * random.uniform(0.8, 1.0)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="icm-webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def wake(self) -> None:
        """Deliver now (a new event was committed); safe from any thread."""
        loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    async def _run(self) -> None:
        assert self._event is not None
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False, trust_env=False) as client:
            while True:
                try:
                    await self.deliver_due(client)
                except Exception as exc:  # noqa: BLE001 - the store was unreachable: try again later
                    log.error("webhook delivery round failed: %s: %s", type(exc).__name__, exc)
                self._event.clear()
                try:
                    await asyncio.wait_for(self._event.wait(), timeout=self._next_wait())
                except asyncio.TimeoutError:
                    pass

    def _next_wait(self) -> float:
        return self.poll_s if self.base_backoff_s >= self.poll_s else max(0.05, self.base_backoff_s / 2)

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        """One round: every due event once; returns how many were delivered."""
        due = await asyncio.to_thread(self.store.due_events)
        delivered = 0
        for ev in due:
            # lease it, so another replica on the same database does not send it meanwhile
            if not await asyncio.to_thread(self.store.lease_event, ev["id"], ev["next_attempt_at"], time.time() + self.timeout_s + 5):
                continue
            body = ev["payload"].encode()
            ts = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "icm-serve-webhooks",
                EVENT_HEADER: ev["event"],
                EVENT_ID_HEADER: ev["event_id"],
                TIMESTAMP_HEADER: str(ts),
                SIGNATURE_HEADER: sign(self.secret, ts, body),
            }
            error = None
            try:
                resp = await client.post(self.url, content=body, headers=headers)
                if not 200 <= resp.status_code < 300:
                    error = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                error = redact_text(f"{type(exc).__name__}: {exc}")  # no user:password@ of the URL in the log
            if error is None:
                await asyncio.to_thread(self.store.event_delivered, ev["id"])
                delivered += 1
                if self.metrics is not None:
                    self.metrics.webhook_deliveries.labels("delivered").inc()
            else:
                wait = self.backoff(ev["attempts"] + 1)
                await asyncio.to_thread(self.store.event_failed, ev["id"], error, time.time() + wait)
                log.warning("webhook %s (%s) not delivered: %s; retry in %.1f s", ev["event_id"], ev["event"], error, wait)
                if self.metrics is not None:
                    self.metrics.webhook_deliveries.labels("failed").inc()
        return delivered
