"""The decision store: every decision and every review, in SQLite or any SQLAlchemy database.

SQLite (a file path) is the default; a team points ``--db`` at a URL such as
``postgresql+psycopg://user@host/icm`` instead (install the driver, e.g. ``psycopg``).

Durability: a decision is committed before the request that made it is answered, so a
server killed at any moment has lost no acknowledged decision. SQLite runs in WAL mode with
``synchronous=FULL``. The schema is created and upgraded by Alembic revisions shipped in
``icm/serve/migrations`` (their state in the ``alembic_version`` table); opening a store
applies the missing ones, then reads the tables back (:func:`reflect_tables`): the revisions
are the schema's only definition. A database made by the numbered migrations of earlier releases
(``icm_schema_migrations``) is taken over at the revision it matches and upgraded from there.

Kept images live outside the database, content-addressed by SHA-256 (:class:`ImageStore`,
in :mod:`icm.serve.store_images`); reviews, the queue and claims are in
:mod:`icm.serve.store_reviews`. This module re-exports what callers import from it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icm.moderation.record import ModerationRecord

log = logging.getLogger(__name__)

try:
    import sqlalchemy as sa
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the decision store needs SQLAlchemy ({err}): pip install 'icm-assistant[serve]'") from err

# the store's other modules import SQLAlchemy themselves: after the check above, which names the extra
from icm.serve.store_images import FORMAT_MEDIA_TYPES, ImageStore, purge_kept_images  # noqa: E402
from icm.serve.store_reviews import ReviewStore  # noqa: E402
from icm.serve.store_rows import (  # noqa: E402
    WEBHOOK_EVENTS,
    ClaimConflict,
    DecisionMeta,
    NullLock,
    StoreError,
    decision_dict,
    review_dict,
    summary_dict,
    utcnow,
)

__all__ = [
    "FORMAT_MEDIA_TYPES", "WEBHOOK_EVENTS", "ClaimConflict", "DecisionMeta", "DecisionStore", "ImageStore",
    "StoreError", "purge_kept_images", "reflect_tables", "utcnow",
]


# --------------------------------------------------------------------------- schema


TABLE_NAMES = ("icm_decisions", "icm_reviews", "icm_claims", "icm_webhook_outbox")


def reflect_tables(conn: sa.Connection) -> tuple[sa.Table, sa.Table, sa.Table, sa.Table]:
    """The decisions, reviews, claims and webhook outbox tables, read back from a migrated database.

    The Alembic revisions in ``icm/serve/migrations`` are the schema's one definition (each a
    frozen snapshot that must not import live table code); the store reflects what they made
    instead of declaring the columns a second time, so queries and schema cannot drift apart.
    """
    md = sa.MetaData()
    md.reflect(conn, only=TABLE_NAMES)
    decisions, reviews, claims, outbox = (md.tables[name] for name in TABLE_NAMES)
    return decisions, reviews, claims, outbox


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
LEGACY_MIGRATIONS_TABLE = "icm_schema_migrations"
LEGACY_REVISIONS = {1: "0001"}
"""The Alembic revision each numbered migration of earlier releases corresponds to."""

# --------------------------------------------------------------------------- store



MIGRATION_LOCK_KEY = 0x1C0DEC1
"""PostgreSQL advisory lock held while migrating, so that replicas started together do not race."""


class DecisionStore(ReviewStore):
    """Decisions and reviews in a SQLAlchemy database (SQLite file by default).

    Thread-safe: the server writes from its batch worker and reads from request threads.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url in ("sqlite://", "sqlite:///:memory:"):
                kwargs["poolclass"] = sa.pool.StaticPool  # one shared in-memory database
            else:
                path = url.split("///", 1)[1] if "///" in url else ""
                if path:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = sa.create_engine(url, **kwargs)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self.webhooks = False  # write webhook events to the outbox (the server sets it when a URL is configured)
        self.applied = self.migrate()
        with self.engine.connect() as conn:
            self._decisions, self._reviews, self._claims, self._outbox = reflect_tables(conn)
        # built once: its compiled form is cached, where .values(**row) built and compiled a statement per row
        self._insert_decision = sa.insert(self._decisions).returning(self._decisions.c.id)

    # -- schema --------------------------------------------------------------------------

    def _alembic(self, conn: sa.Connection) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        return cfg

    def migrate(self) -> list[str]:
        """Apply missing Alembic revisions; returns the revisions applied now, oldest first."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        with self._writing(), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # replicas starting at once migrate one at a time
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            cfg = self._alembic(conn)
            script = ScriptDirectory.from_config(cfg)
            head = script.get_current_head()
            current = MigrationContext.configure(conn).get_current_revision()
            insp = sa.inspect(conn)
            if current is None and insp.has_table(LEGACY_MIGRATIONS_TABLE):
                done = [int(r[0]) for r in conn.execute(sa.text(f"SELECT version FROM {LEGACY_MIGRATIONS_TABLE}"))]
                newest = max(done, default=0)
                if newest and newest not in LEGACY_REVISIONS:
                    raise StoreError(
                        f"the database at {self.safe_url} has schema version {newest}, newer than this "
                        f"icm (knows up to {max(LEGACY_REVISIONS)}): upgrade icm"
                    )
                if newest:
                    log.info("decision store: taking over schema version %d as revision %s", newest, LEGACY_REVISIONS[newest])
                    command.stamp(cfg, LEGACY_REVISIONS[newest])
                    current = LEGACY_REVISIONS[newest]
            if current is not None:
                try:
                    script.get_revision(current)
                except Exception:  # noqa: BLE001 - alembic's ResolutionError / CommandError
                    raise StoreError(
                        f"the database at {self.safe_url} has schema revision {current!r}, unknown to this icm "
                        f"(newest known: {head}): it was made by a newer icm; upgrade icm"
                    ) from None
            todo = [s.revision for s in script.iterate_revisions(head, current)][::-1]
            if todo:
                log.info("decision store: applying revisions %s", ", ".join(todo))
                command.upgrade(cfg, "head")
        return todo

    def schema_version(self) -> str | None:
        """The database's Alembic revision."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @property
    def safe_url(self) -> str:
        """The URL without its password."""
        try:
            return sa.engine.make_url(self.url).render_as_string(hide_password=True)
        except (sa.exc.ArgumentError, ValueError):  # a URL SQLAlchemy cannot parse: hide what looks like a password
            return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", self.url)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except (sa.exc.SQLAlchemyError, OSError):  # the driver's errors arrive wrapped as DBAPIError
            return False

    def close(self) -> None:
        self.engine.dispose()

    def _writing(self):
        return self._write_lock if self._write_lock is not None else NullLock()

    # -- decisions -----------------------------------------------------------------------

    def add_decisions(self, records: Sequence[ModerationRecord], metas: Sequence[DecisionMeta]) -> list[int]:
        """Insert decisions in one transaction; returns their ids once committed."""
        if len(records) != len(metas):
            raise ValueError("one DecisionMeta per record")
        ids: list[int] = []
        now = utcnow()
        insert = self._insert_decision
        with self._writing(), self.engine.begin() as conn:
            for r, m in zip(records, metas, strict=True):
                row = {
                    "created_at": now,
                    "image_sha256": r.sha256,
                    "image_name": m.image_name,
                    "image_format": m.image_format,
                    "image_kept": bool(m.image_kept),
                    "source": m.source,
                    "client": m.client,
                    "policy": r.policy,
                    "rules": r.rules,
                    "backend": r.backend,
                    "model": r.model,
                    "verdict": r.verdict,
                    "p_violation": r.p_violation,
                    "p_term": r.term.p_yes if r.term is not None else None,
                    "product": r.product,
                    "product_probability": r.product_probability,
                    "rule": r.rule,
                    "label": r.label,
                    "reason": r.reason,
                    "explanation": r.explanation,
                    "record": r.model_dump_json(),
                    "queue": m.queue,
                    "request_id": m.request_id,
                }
                result = conn.execute(insert, row)
                ids.append(int(result.scalar_one()))
                if self.webhooks and r.verdict == "block":
                    self._add_event(conn, "decision.block", ids[-1], {"decision": summary_dict(row, ids[-1])})
        return ids

    def get_decision(self, decision_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self._decisions).where(self._decisions.c.id == decision_id)).mappings().first()
            if row is None:
                return None
            out = decision_dict(row, full=True)
            out["reviews"] = [
                review_dict(r)
                for r in conn.execute(
                    sa.select(self._reviews).where(self._reviews.c.decision_id == decision_id).order_by(self._reviews.c.id)
                ).mappings()
            ]
            return out

    def list_decisions(
        self,
        *,
        limit: int = 50,
        before_id: int | None = None,
        verdict: str | None = None,
        reviewed: bool | None = None,
        policy: str | None = None,
        client: str | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first, with each decision's latest review (None when not reviewed); ``client``:
        only the decisions of that API key."""
        latest = (
            sa.select(self._reviews.c.decision_id, sa.func.max(self._reviews.c.id).label("review_id"))
            .group_by(self._reviews.c.decision_id)
            .subquery()
        )
        q = sa.select(self._decisions, latest.c.review_id).outerjoin(latest, latest.c.decision_id == self._decisions.c.id)
        if before_id is not None:
            q = q.where(self._decisions.c.id < before_id)
        if verdict:
            q = q.where(self._decisions.c.verdict == verdict)
        if policy:
            q = q.where(self._decisions.c.policy == policy)
        if client is not None:
            q = q.where(self._decisions.c.client == client)
        if reviewed is True:
            q = q.where(latest.c.review_id.is_not(None))
        elif reviewed is False:
            q = q.where(latest.c.review_id.is_(None))
        q = q.order_by(self._decisions.c.id.desc()).limit(max(1, min(int(limit), 1000)))
        with self.engine.connect() as conn:
            rows = list(conn.execute(q).mappings())
            review_ids = [r["review_id"] for r in rows if r["review_id"] is not None]
            reviews: dict[int, dict[str, Any]] = {}
            if review_ids:
                for r in conn.execute(sa.select(self._reviews).where(self._reviews.c.id.in_(review_ids))).mappings():
                    reviews[r["id"]] = review_dict(r)
        out = []
        for row in rows:
            d = decision_dict(row, full=False)
            d["review"] = reviews.get(row["review_id"]) if row["review_id"] is not None else None
            out.append(d)
        return out

    def count_decisions(self, *, client: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(self._decisions)
        if client is not None:
            q = q.where(self._decisions.c.client == client)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def client_has_image(self, client: str, sha256: str) -> bool:
        """Whether one of ``client``'s decisions kept the image ``sha256``."""
        q = sa.select(self._decisions.c.id).where(
            self._decisions.c.client == client, self._decisions.c.image_sha256 == sha256, self._decisions.c.image_kept.is_(True)
        ).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(q).first() is not None

    def mark_images_gone(self, sha256s: Sequence[str]) -> int:
        """Record that these images are no longer kept; returns the decisions changed."""
        n = 0
        with self._writing(), self.engine.begin() as conn:
            for i in range(0, len(sha256s), 500):
                chunk = list(sha256s[i : i + 500])
                result = conn.execute(
                    sa.update(self._decisions)
                    .where(self._decisions.c.image_sha256.in_(chunk), self._decisions.c.image_kept.is_(True))
                    .values(image_kept=False)
                )
                n += int(result.rowcount or 0)
        return n

    def decision_ids(self) -> list[int]:
        with self.engine.connect() as conn:
            return [int(r[0]) for r in conn.execute(sa.select(self._decisions.c.id).order_by(self._decisions.c.id))]

    # -- the webhook outbox --------------------------------------------------------------

    def _add_event(self, conn: sa.Connection, event: str, decision_id: int, body: dict[str, Any]) -> None:
        import uuid

        event_id = uuid.uuid4().hex
        payload = {"id": event_id, "type": event, "created_at": utcnow(), **body}
        conn.execute(sa.insert(self._outbox).values(
            event_id=event_id, event=event, decision_id=decision_id, created_at=payload["created_at"],
            payload=json.dumps(payload, sort_keys=True, default=str), attempts=0, next_attempt_at=time.time(),
        ))

    def due_events(self, *, now: float | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Undelivered webhook events whose next attempt is due, oldest first."""
        now = time.time() if now is None else now
        q = (
            sa.select(self._outbox).where(self._outbox.c.delivered_at.is_(None), self._outbox.c.next_attempt_at <= now)
            .order_by(self._outbox.c.id).limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def lease_event(self, outbox_id: int, seen_next_attempt_at: float, until: float) -> bool:
        """Take an event for one delivery attempt (False: another server took it first)."""
        with self._writing(), self.engine.begin() as conn:
            n = conn.execute(
                sa.update(self._outbox)
                .where(self._outbox.c.id == outbox_id, self._outbox.c.delivered_at.is_(None), self._outbox.c.next_attempt_at == seen_next_attempt_at)
                .values(next_attempt_at=until)
            ).rowcount
        return bool(n)

    def event_delivered(self, outbox_id: int) -> None:
        with self._writing(), self.engine.begin() as conn:
            conn.execute(sa.update(self._outbox).where(self._outbox.c.id == outbox_id).values(
                delivered_at=utcnow(), attempts=self._outbox.c.attempts + 1, last_error=None))

    def event_failed(self, outbox_id: int, error: str, retry_at: float) -> None:
        with self._writing(), self.engine.begin() as conn:
            conn.execute(sa.update(self._outbox).where(self._outbox.c.id == outbox_id).values(
                attempts=self._outbox.c.attempts + 1, last_error=error[:2000], next_attempt_at=retry_at))

    def events(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(self._outbox).order_by(self._outbox.c.id)).mappings()]

    def pending_events(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self._outbox).where(self._outbox.c.delivered_at.is_(None))).scalar() or 0)




def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
    finally:
        cur.close()

