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

Kept images live outside the database, content-addressed by SHA-256 (:class:`ImageStore`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from icm.moderation.record import ModerationRecord

log = logging.getLogger(__name__)

try:
    import sqlalchemy as sa
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the decision store needs SQLAlchemy ({err}): pip install 'icm-assistant[serve]'") from err


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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


@dataclass
class DecisionMeta:
    """What the server knows about a request besides the moderation record."""

    image_name: str | None = None
    image_format: str | None = None
    image_kept: bool = False
    source: str | None = None  # upload, base64, path, page
    client: str | None = None  # the API key's name
    queue: str | None = None  # why it awaits a person: 'review' (the verdict) or 'audit' (sampled); None: not queued


class StoreError(RuntimeError):
    pass


class ClaimConflict(StoreError):
    """Another reviewer holds the decision (their claim has not expired)."""

    def __init__(self, decision_id: int, holder: str, expires_at: float) -> None:
        super().__init__(f"decision {decision_id} is claimed by {holder!r} for {max(0, round(expires_at - time.time()))} more seconds")
        self.decision_id, self.holder, self.expires_at = decision_id, holder, expires_at


WEBHOOK_EVENTS = ("decision.block", "review.override")


MIGRATION_LOCK_KEY = 0x1C0DEC1
"""PostgreSQL advisory lock held while migrating, so that replicas started together do not race."""


class DecisionStore:
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
        return self._write_lock if self._write_lock is not None else _NullLock()

    # -- decisions -----------------------------------------------------------------------

    def add_decisions(self, records: Sequence[ModerationRecord], metas: Sequence[DecisionMeta]) -> list[int]:
        """Insert decisions in one transaction; returns their ids once committed."""
        if len(records) != len(metas):
            raise ValueError("one DecisionMeta per record")
        ids: list[int] = []
        now = utcnow()
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
                }
                result = conn.execute(sa.insert(self._decisions).values(**row).returning(self._decisions.c.id))
                ids.append(int(result.scalar_one()))
                if self.webhooks and r.verdict == "block":
                    self._add_event(conn, "decision.block", ids[-1], {"decision": _summary(row, ids[-1])})
        return ids

    def get_decision(self, decision_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self._decisions).where(self._decisions.c.id == decision_id)).mappings().first()
            if row is None:
                return None
            out = _decision_dict(row, full=True)
            out["reviews"] = [
                _review_dict(r)
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
    ) -> list[dict[str, Any]]:
        """Newest first, with each decision's latest review (None when not reviewed)."""
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
                    reviews[r["id"]] = _review_dict(r)
        out = []
        for row in rows:
            d = _decision_dict(row, full=False)
            d["review"] = reviews.get(row["review_id"]) if row["review_id"] is not None else None
            out.append(d)
        return out

    def count_decisions(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self._decisions)).scalar() or 0)

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

    # -- reviews -------------------------------------------------------------------------

    def add_review(
        self,
        decision_id: int,
        *,
        verdict: str,
        reviewer: str,
        product: str | None = None,
        note: str | None = None,
        api_key_name: str | None = None,
    ) -> dict[str, Any]:
        """Record a reviewer's final verdict; ``action`` is confirm when it agrees with the model."""
        if verdict not in ("allow", "block"):
            raise ValueError("a reviewer's verdict is allow or block")
        with self._writing(), self.engine.begin() as conn:
            d = conn.execute(
                sa.select(self._decisions.c.verdict, self._decisions.c.product).where(self._decisions.c.id == decision_id)
            ).first()
            if d is None:
                raise KeyError(f"no decision {decision_id}")
            claim = conn.execute(sa.select(self._claims).where(self._claims.c.decision_id == decision_id)).mappings().first()
            if claim is not None and claim["reviewer"] != reviewer and claim["expires_at"] > time.time():
                raise ClaimConflict(decision_id, claim["reviewer"], claim["expires_at"])
            same_product = product is None or product == d.product
            action = "confirm" if verdict == d.verdict and same_product else "override"
            values = {
                "decision_id": decision_id,
                "created_at": utcnow(),
                "reviewer": reviewer,
                "api_key_name": api_key_name,
                "action": action,
                "verdict": verdict,
                "product": product,
                "note": note or None,
            }
            rid = conn.execute(sa.insert(self._reviews).values(**values).returning(self._reviews.c.id)).scalar_one()
            conn.execute(sa.delete(self._claims).where(self._claims.c.decision_id == decision_id))
            out = {"id": int(rid), **values}
            if self.webhooks and action == "override":
                row = conn.execute(sa.select(self._decisions).where(self._decisions.c.id == decision_id)).mappings().one()
                self._add_event(conn, "review.override", decision_id, {"decision": _summary(row, decision_id), "review": out})
        return out

    # -- the review queue ----------------------------------------------------------------

    def _queue_query(
        self,
        *,
        policy: str | None = None,
        rules: str | None = None,
        verdict: str | None = None,
        product: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> Any:
        reviewed = sa.select(self._reviews.c.id).where(self._reviews.c.decision_id == self._decisions.c.id).exists()
        q = sa.select(self._decisions).where(self._decisions.c.queue.is_not(None), ~reviewed)
        for col, value in ((self._decisions.c.policy, policy), (self._decisions.c.rules, rules), (self._decisions.c.verdict, verdict),
                           (self._decisions.c.product, product)):
            if value:
                q = q.where(col == value)
        if since:
            q = q.where(self._decisions.c.created_at >= since)
        if until:
            q = q.where(self._decisions.c.created_at < until)
        return q

    def queue(self, *, limit: int = 50, now: float | None = None, **filters: str | None) -> list[dict[str, Any]]:
        """Decisions awaiting a person (queued and not reviewed), oldest first, with any live claim.

        Filters: ``policy``, ``rules``, ``verdict``, ``product``, and ``since`` / ``until``
        (ISO times, compared with ``created_at``).
        """
        now = time.time() if now is None else now
        q = self._queue_query(**filters).order_by(self._decisions.c.id).limit(max(1, min(int(limit), 1000)))
        with self.engine.connect() as conn:
            rows = list(conn.execute(q).mappings())
            claims = {
                c["decision_id"]: c
                for c in conn.execute(
                    sa.select(self._claims).where(self._claims.c.decision_id.in_([r["id"] for r in rows]), self._claims.c.expires_at > now)
                ).mappings()
            } if rows else {}
        out = []
        for row in rows:
            d = _decision_dict(row, full=False)
            c = claims.get(row["id"])
            d["claimed_by"] = c["reviewer"] if c else None
            d["claim_expires_at"] = c["expires_at"] if c else None
            out.append(d)
        return out

    def queue_count(self, **filters: str | None) -> int:
        q = sa.select(sa.func.count()).select_from(self._queue_query(**filters).subquery())
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def claim(self, decision_id: int, reviewer: str, *, ttl_s: float = 300.0, now: float | None = None) -> dict[str, Any]:
        """Claim a decision for ``ttl_s`` seconds (renewing one's own claim); raises
        :class:`ClaimConflict` while another reviewer's claim lives, KeyError for no such decision."""
        now = time.time() if now is None else now
        with self._writing(), self.engine.begin() as conn:
            if conn.execute(sa.select(self._decisions.c.id).where(self._decisions.c.id == decision_id)).first() is None:
                raise KeyError(f"no decision {decision_id}")
            self._claim(conn, decision_id, reviewer, ttl_s, now)
        return {"decision_id": decision_id, "reviewer": reviewer, "expires_at": now + ttl_s}

    def _claim(self, conn: sa.Connection, decision_id: int, reviewer: str, ttl_s: float, now: float) -> None:
        values = {"reviewer": reviewer, "claimed_at": utcnow(), "expires_at": now + ttl_s}
        taken = conn.execute(
            sa.update(self._claims)
            .where(self._claims.c.decision_id == decision_id, sa.or_(self._claims.c.expires_at <= now, self._claims.c.reviewer == reviewer))
            .values(**values)
        ).rowcount
        if taken:
            return
        holder = conn.execute(sa.select(self._claims).where(self._claims.c.decision_id == decision_id)).mappings().first()
        if holder is not None:
            raise ClaimConflict(decision_id, holder["reviewer"], holder["expires_at"])
        try:
            with conn.begin_nested():
                conn.execute(sa.insert(self._claims).values(decision_id=decision_id, **values))
        except sa.exc.IntegrityError:  # another server claimed it between the two statements
            holder = conn.execute(sa.select(self._claims).where(self._claims.c.decision_id == decision_id)).mappings().first()
            raise ClaimConflict(decision_id, holder["reviewer"] if holder else "someone", holder["expires_at"] if holder else now) from None

    def claim_next(
        self, reviewer: str, *, ttl_s: float = 300.0, skip: Sequence[int] = (), now: float | None = None, **filters: str | None
    ) -> dict[str, Any] | None:
        """Claim the oldest queued decision nobody else holds (and not in ``skip``); None when there is none.

        A reviewer who holds a claim already gets that decision again first (a reload keeps one's place).
        """
        now = time.time() if now is None else now
        held = (
            sa.select(self._claims.c.decision_id)
            .where(self._claims.c.decision_id == self._decisions.c.id, self._claims.c.expires_at > now, self._claims.c.reviewer != reviewer)
            .exists()
        )
        mine = (
            sa.select(self._claims.c.decision_id)
            .where(self._claims.c.decision_id == self._decisions.c.id, self._claims.c.reviewer == reviewer)
            .exists()
        )
        q = self._queue_query(**filters).where(~held)
        if skip:
            q = q.where(self._decisions.c.id.not_in(list(skip)))
        q = q.order_by(sa.desc(mine), self._decisions.c.id).limit(20)
        while True:
            with self.engine.connect() as conn:
                rows = list(conn.execute(q).mappings())
            if not rows:
                return None
            for row in rows:
                try:
                    self.claim(row["id"], reviewer, ttl_s=ttl_s, now=now)
                except ClaimConflict:  # another reviewer took it meanwhile: the next one
                    continue
                d = _decision_dict(row, full=False)
                d["claimed_by"], d["claim_expires_at"] = reviewer, now + ttl_s
                return d

    def release(self, decision_id: int, reviewer: str) -> bool:
        """Give a claim back (a skip); only its holder can."""
        with self._writing(), self.engine.begin() as conn:
            n = conn.execute(sa.delete(self._claims).where(self._claims.c.decision_id == decision_id, self._claims.c.reviewer == reviewer)).rowcount
        return bool(n)

    def agreement(self) -> dict[str, Any]:
        """How often reviewers agree with the model (per product) and with each other.

        Reviewer against model: each reviewed decision whose model verdict is allow or block
        counts once, by its latest review; decisions the model sent to review are counted
        apart (what people made of them). Reviewer against reviewer: decisions reviewed by two
        or more people, each person's latest verdict, every pair of people once.
        """
        with self.engine.connect() as conn:
            reviews = list(conn.execute(sa.select(self._reviews).order_by(self._reviews.c.id)).mappings())
            ids = sorted({r["decision_id"] for r in reviews})
            model = {
                r["id"]: (r["verdict"], r["product"])
                for r in conn.execute(
                    sa.select(self._decisions.c.id, self._decisions.c.verdict, self._decisions.c.product).where(self._decisions.c.id.in_(ids))
                ).mappings()
            } if ids else {}
        latest: dict[int, Any] = {}
        per_person: dict[int, dict[str, str]] = {}
        for r in reviews:
            latest[r["decision_id"]] = r
            per_person.setdefault(r["decision_id"], {})[r["reviewer"]] = r["verdict"]
        products: dict[str, dict[str, Any]] = {}
        for did, r in latest.items():
            verdict, product = model.get(did, (None, None))
            p = products.setdefault(product or "(none)", {"reviewed": 0, "agree": 0, "model_review": {"allow": 0, "block": 0}})
            if verdict in ("allow", "block"):
                p["reviewed"] += 1
                p["agree"] += int(r["verdict"] == verdict)
            elif verdict == "review":
                p["model_review"][r["verdict"]] += 1
        for p in products.values():
            p["rate"] = round(p["agree"] / p["reviewed"], 4) if p["reviewed"] else None
        pairs = agree = 0
        items = 0
        for verdicts in per_person.values():
            people = sorted(verdicts)
            if len(people) < 2:
                continue
            items += 1
            for i in range(len(people)):
                for j in range(i + 1, len(people)):
                    pairs += 1
                    agree += int(verdicts[people[i]] == verdicts[people[j]])
        return {
            "reviewer_vs_model": {"by_product": dict(sorted(products.items()))},
            "reviewer_vs_reviewer": {"items": items, "pairs": pairs, "agree": agree, "rate": round(agree / pairs, 4) if pairs else None},
        }

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

    def reviews(self, decision_id: int | None = None) -> list[dict[str, Any]]:
        q = sa.select(self._reviews).order_by(self._reviews.c.id)
        if decision_id is not None:
            q = q.where(self._reviews.c.decision_id == decision_id)
        with self.engine.connect() as conn:
            return [_review_dict(r) for r in conn.execute(q).mappings()]

    def iter_reviewed(self, *, latest_only: bool = True) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(decision, review) pairs in review order; with ``latest_only`` a decision's last review."""
        q = sa.select(self._reviews).order_by(self._reviews.c.id)
        with self.engine.connect() as conn:
            reviews = [_review_dict(r) for r in conn.execute(q).mappings()]
            if latest_only:
                last: dict[int, dict[str, Any]] = {}
                for r in reviews:
                    last[r["decision_id"]] = r
                reviews = sorted(last.values(), key=lambda r: r["id"])
            for r in reviews:
                row = conn.execute(sa.select(self._decisions).where(self._decisions.c.id == r["decision_id"])).mappings().first()
                if row is not None:
                    yield _decision_dict(row, full=True), r


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
    finally:
        cur.close()


_SUMMARY = (
    "id", "created_at", "image_sha256", "image_name", "image_format", "image_kept", "source", "client",
    "policy", "rules", "backend", "model", "verdict", "p_violation", "p_term", "product",
    "product_probability", "rule", "label", "reason", "explanation", "queue",
)


def _decision_dict(row: Any, *, full: bool) -> dict[str, Any]:
    out = {k: row[k] for k in _SUMMARY}
    out["image_kept"] = bool(out["image_kept"])
    if full:
        out["record"] = json.loads(row["record"])
    return out


def _summary(row: Any, decision_id: int) -> dict[str, Any]:
    """A decision as webhook events carry it (no image bytes, no full record)."""
    out = {k: row[k] for k in _SUMMARY if k != "id" and k in row}
    out["id"] = decision_id
    return out


def _review_dict(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "decision_id", "created_at", "reviewer", "api_key_name", "action", "verdict", "product", "note")}


# --------------------------------------------------------------------------- images

_SHA = re.compile(r"^[0-9a-f]{64}$")

FORMAT_MEDIA_TYPES = {
    "JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
    "BMP": "image/bmp", "TIFF": "image/tiff", "ICO": "image/x-icon", "PPM": "image/x-portable-anymap",
}


class ImageStore:
    """Image bytes kept on disk under their SHA-256 (``ab/abcdef...``); written atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, sha256: str, data: bytes) -> Path:
        """Keep ``data``; an image kept already is touched, so its retention starts again."""
        target = self.path(sha256)
        if target.exists():
            try:
                os.utime(target)
                return target
            except FileNotFoundError:  # purged meanwhile: write it again
                pass
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return target

    def get(self, sha256: str) -> bytes | None:
        try:
            return self.path(sha256).read_bytes()
        except (FileNotFoundError, ValueError):
            return None

    def purge(self, older_than_s: float, *, now: float | None = None) -> list[str]:
        """Delete kept images (and stray temporary files) not written for ``older_than_s``
        seconds; returns the SHA-256 of each image deleted."""
        cutoff = (time.time() if now is None else now) - older_than_s
        gone: list[str] = []
        if not self.root.is_dir():
            return gone
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir() or sub.is_symlink() or len(sub.name) != 2:
                continue
            for f in sub.iterdir():
                try:
                    st = f.lstat()
                except FileNotFoundError:
                    continue
                if st.st_mtime >= cutoff or not (_SHA.match(f.name) or f.name.startswith(".tmp-")):
                    continue
                try:
                    f.unlink()
                except FileNotFoundError:
                    continue
                if _SHA.match(f.name):
                    gone.append(f.name)
        return gone


def purge_kept_images(store: DecisionStore, images: ImageStore, days: float, *, now: float | None = None) -> int:
    """Delete kept images older than ``days`` and mark their decisions as without image.

    A moderation server receives images that may be illegal to hold; keeping them only as
    long as reviewers need them is the operator's duty (``--keep-images-days``). Returns how
    many images were deleted; ``days`` 0 deletes nothing.
    """
    if days <= 0:
        return 0
    gone = images.purge(days * 86400.0, now=now)
    store.mark_images_gone(gone)
    return len(gone)
