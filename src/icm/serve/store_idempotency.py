"""Idempotency keys of the moderation routes, in the decision store's database (issue 21).

A client that retries a request (its replica died, the connection dropped) sends the same
``Idempotency-Key``; the first request's answer (status and JSON body) is stored in the
database, so any replica answers the retry with it instead of deciding (and storing) again.
Keys are scoped to the API key's name. A key is kept for ``window_s`` seconds.

:meth:`IdempotencyKeys.begin` reserves a key before the request runs (one row, primary key
(client, key): two replicas cannot both reserve it); :meth:`finish` stores the answer;
:meth:`release` drops the reservation of a request that failed, so that a retry runs again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

TABLE = "icm_idempotency"


@dataclass
class Replay:
    """What :meth:`IdempotencyKeys.begin` found: the stored answer (``status`` and ``body``), a
    request still running (``running``), or a key used with another body (``mismatch``)."""

    status: int | None = None
    body: Any = None
    running: bool = False
    mismatch: bool = False
    request_id: str | None = None


class IdempotencyKeys:
    """Reserve, answer and release idempotency keys in ``store``'s database."""

    def __init__(self, store: Any, *, window_s: float, lease_s: float = 300.0) -> None:
        self.store, self.window_s, self.lease_s = store, window_s, lease_s
        with store.engine.connect() as conn:
            md = sa.MetaData()
            md.reflect(conn, only=(TABLE,))
        self.table = md.tables[TABLE]

    def begin(self, client: str, key: str, route: str, body_sha256: str, request_id: str | None) -> Replay | None:
        """Reserve ``key`` (None: reserved, run the request) or say what an earlier request left."""
        t = self.table
        now = time.time()
        where = sa.and_(t.c.client == client, t.c.key == key)
        for _ in range(3):  # a row expired or abandoned meanwhile is replaced; another replica may race us
            try:
                with self.store._writing(), self.store.engine.begin() as conn:
                    row = conn.execute(sa.select(t).where(where)).mappings().first()
                    if row is not None:
                        stale = row["created_at"] < now - self.window_s
                        abandoned = row["status"] is None and row["created_at"] < now - self.lease_s
                        if not (stale or abandoned):
                            return _found(row, route, body_sha256)
                        conn.execute(sa.delete(t).where(where, t.c.created_at == row["created_at"]))
                    conn.execute(sa.insert(t).values(
                        client=client, key=key, route=route, body_sha256=body_sha256, created_at=now,
                        request_id=request_id, status=None, response=None,
                    ))
                return None
            except sa.exc.IntegrityError:
                continue  # another replica reserved it first: read its row
        return Replay(running=True)

    def finish(self, client: str, key: str, status: int, body: Any) -> None:
        t = self.table
        with self.store._writing(), self.store.engine.begin() as conn:
            conn.execute(sa.update(t).where(t.c.client == client, t.c.key == key).values(
                status=status, response=json.dumps(body, separators=(",", ":"))))

    def release(self, client: str, key: str) -> None:
        t = self.table
        with self.store._writing(), self.store.engine.begin() as conn:
            conn.execute(sa.delete(t).where(t.c.client == client, t.c.key == key, t.c.status.is_(None)))

    def purge(self, now: float | None = None) -> int:
        """Delete keys older than the window; returns how many."""
        t = self.table
        cutoff = (time.time() if now is None else now) - self.window_s
        with self.store._writing(), self.store.engine.begin() as conn:
            return int(conn.execute(sa.delete(t).where(t.c.created_at < cutoff)).rowcount or 0)


def _found(row: Any, route: str, body_sha256: str) -> Replay:
    if row["body_sha256"] != body_sha256 or row["route"] != route:
        return Replay(mismatch=True, request_id=row["request_id"])
    if row["status"] is None:
        return Replay(running=True, request_id=row["request_id"])
    return Replay(status=int(row["status"]), body=json.loads(row["response"]), request_id=row["request_id"])
