"""The decision store: every decision and every review, in SQLite or any SQLAlchemy database.

SQLite (a file path) is the default; a team points ``--db`` at a URL such as
``postgresql+psycopg://user@host/icm`` instead (install the driver, e.g. ``psycopg``).

Durability: a decision is committed before the request that made it is answered, so a
server killed at any moment has lost no acknowledged decision. SQLite runs in WAL mode with
``synchronous=FULL``. The schema is created and upgraded by numbered migrations recorded in
the ``icm_schema_migrations`` table; opening a store applies the missing ones.

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from icm.moderation.record import ModerationRecord

log = logging.getLogger(__name__)

try:
    import sqlalchemy as sa
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the decision store needs SQLAlchemy ({err}): pip install 'icm-assistant[serve]'") from err


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- schema


def _schema_v1(md: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """Version 1 of the schema, frozen: later versions are new migrations, never edits here."""
    decisions = sa.Table(
        "icm_decisions",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("image_name", sa.Text, nullable=True),
        sa.Column("image_format", sa.String(16), nullable=True),
        sa.Column("image_kept", sa.Boolean, nullable=False, default=False),
        sa.Column("source", sa.String(16), nullable=True),
        sa.Column("client", sa.String(200), nullable=True),
        sa.Column("policy", sa.String(200), nullable=False),
        sa.Column("rules", sa.String(200), nullable=False),
        sa.Column("backend", sa.String(100), nullable=False),
        sa.Column("model", sa.Text, nullable=True),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("p_violation", sa.Float, nullable=True),
        sa.Column("p_term", sa.Float, nullable=True),
        sa.Column("product", sa.String(200), nullable=True),
        sa.Column("product_probability", sa.Float, nullable=True),
        sa.Column("rule", sa.Text, nullable=True),
        sa.Column("label", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("explanation", sa.Text, nullable=True),
        sa.Column("record", sa.Text, nullable=False),
        sa.Index("ix_icm_decisions_sha", "image_sha256"),
        sa.Index("ix_icm_decisions_created", "created_at"),
    )
    reviews = sa.Table(
        "icm_reviews",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("decision_id", sa.Integer, sa.ForeignKey("icm_decisions.id"), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("api_key_name", sa.String(200), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("product", sa.String(200), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Index("ix_icm_reviews_decision", "decision_id"),
    )
    return decisions, reviews


def _migration_1(conn: sa.Connection) -> None:
    md = sa.MetaData()
    _schema_v1(md)
    md.create_all(conn)


MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (1, "decisions and reviews", _migration_1),
]
"""Numbered schema migrations, applied in order; append, never edit or renumber."""

_META = sa.MetaData()
DECISIONS, REVIEWS = _schema_v1(_META)  # the current schema (== the latest migration's)
MIGRATIONS_TABLE = sa.Table(
    "icm_schema_migrations",
    _META,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.String(40), nullable=False),
)

# --------------------------------------------------------------------------- store


@dataclass
class DecisionMeta:
    """What the server knows about a request besides the moderation record."""

    image_name: str | None = None
    image_format: str | None = None
    image_kept: bool = False
    source: str | None = None  # upload, base64, path, page
    client: str | None = None  # the API key's name


class StoreError(RuntimeError):
    pass


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
        self.applied = self.migrate()

    # -- schema --------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply missing migrations; returns the versions applied now."""
        applied_now: list[int] = []
        with self.engine.begin() as conn:
            MIGRATIONS_TABLE.create(conn, checkfirst=True)
            done = {r.version for r in conn.execute(sa.select(MIGRATIONS_TABLE.c.version))}
            newest_known = MIGRATIONS[-1][0]
            if done and max(done) > newest_known:
                raise StoreError(
                    f"the database at {self.safe_url} has schema version {max(done)}, newer than this "
                    f"icm (knows up to {newest_known}): upgrade icm"
                )
            for version, name, fn in MIGRATIONS:
                if version in done:
                    continue
                log.info("decision store: applying migration %d (%s)", version, name)
                fn(conn)
                conn.execute(sa.insert(MIGRATIONS_TABLE).values(version=version, name=name, applied_at=utcnow()))
                applied_now.append(version)
        return applied_now

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(MIGRATIONS_TABLE.c.version))).scalar() or 0)

    @property
    def safe_url(self) -> str:
        """The URL without its password."""
        try:
            return sa.engine.make_url(self.url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001
            return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", self.url)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001
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
            for r, m in zip(records, metas):
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
                }
                result = conn.execute(sa.insert(DECISIONS).values(**row).returning(DECISIONS.c.id))
                ids.append(int(result.scalar_one()))
        return ids

    def get_decision(self, decision_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(DECISIONS).where(DECISIONS.c.id == decision_id)).mappings().first()
            if row is None:
                return None
            out = _decision_dict(row, full=True)
            out["reviews"] = [
                _review_dict(r)
                for r in conn.execute(
                    sa.select(REVIEWS).where(REVIEWS.c.decision_id == decision_id).order_by(REVIEWS.c.id)
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
            sa.select(REVIEWS.c.decision_id, sa.func.max(REVIEWS.c.id).label("review_id"))
            .group_by(REVIEWS.c.decision_id)
            .subquery()
        )
        q = sa.select(DECISIONS, latest.c.review_id).outerjoin(latest, latest.c.decision_id == DECISIONS.c.id)
        if before_id is not None:
            q = q.where(DECISIONS.c.id < before_id)
        if verdict:
            q = q.where(DECISIONS.c.verdict == verdict)
        if policy:
            q = q.where(DECISIONS.c.policy == policy)
        if reviewed is True:
            q = q.where(latest.c.review_id.is_not(None))
        elif reviewed is False:
            q = q.where(latest.c.review_id.is_(None))
        q = q.order_by(DECISIONS.c.id.desc()).limit(max(1, min(int(limit), 1000)))
        with self.engine.connect() as conn:
            rows = list(conn.execute(q).mappings())
            review_ids = [r["review_id"] for r in rows if r["review_id"] is not None]
            reviews: dict[int, dict[str, Any]] = {}
            if review_ids:
                for r in conn.execute(sa.select(REVIEWS).where(REVIEWS.c.id.in_(review_ids))).mappings():
                    reviews[r["id"]] = _review_dict(r)
        out = []
        for row in rows:
            d = _decision_dict(row, full=False)
            d["review"] = reviews.get(row["review_id"]) if row["review_id"] is not None else None
            out.append(d)
        return out

    def count_decisions(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(DECISIONS)).scalar() or 0)

    def mark_images_gone(self, sha256s: Sequence[str]) -> int:
        """Record that these images are no longer kept; returns the decisions changed."""
        n = 0
        with self._writing(), self.engine.begin() as conn:
            for i in range(0, len(sha256s), 500):
                chunk = list(sha256s[i : i + 500])
                result = conn.execute(
                    sa.update(DECISIONS)
                    .where(DECISIONS.c.image_sha256.in_(chunk), DECISIONS.c.image_kept.is_(True))
                    .values(image_kept=False)
                )
                n += int(result.rowcount or 0)
        return n

    def decision_ids(self) -> list[int]:
        with self.engine.connect() as conn:
            return [int(r[0]) for r in conn.execute(sa.select(DECISIONS.c.id).order_by(DECISIONS.c.id))]

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
                sa.select(DECISIONS.c.verdict, DECISIONS.c.product).where(DECISIONS.c.id == decision_id)
            ).first()
            if d is None:
                raise KeyError(f"no decision {decision_id}")
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
            rid = conn.execute(sa.insert(REVIEWS).values(**values).returning(REVIEWS.c.id)).scalar_one()
        return {"id": int(rid), **values}

    def reviews(self, decision_id: int | None = None) -> list[dict[str, Any]]:
        q = sa.select(REVIEWS).order_by(REVIEWS.c.id)
        if decision_id is not None:
            q = q.where(REVIEWS.c.decision_id == decision_id)
        with self.engine.connect() as conn:
            return [_review_dict(r) for r in conn.execute(q).mappings()]

    def iter_reviewed(self, *, latest_only: bool = True) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(decision, review) pairs in review order; with ``latest_only`` a decision's last review."""
        q = sa.select(REVIEWS).order_by(REVIEWS.c.id)
        with self.engine.connect() as conn:
            reviews = [_review_dict(r) for r in conn.execute(q).mappings()]
            if latest_only:
                last: dict[int, dict[str, Any]] = {}
                for r in reviews:
                    last[r["decision_id"]] = r
                reviews = sorted(last.values(), key=lambda r: r["id"])
            for r in reviews:
                row = conn.execute(sa.select(DECISIONS).where(DECISIONS.c.id == r["decision_id"])).mappings().first()
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
    "product_probability", "rule", "label", "reason", "explanation",
)


def _decision_dict(row: Any, *, full: bool) -> dict[str, Any]:
    out = {k: row[k] for k in _SUMMARY}
    out["image_kept"] = bool(out["image_kept"])
    if full:
        out["record"] = json.loads(row["record"])
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
