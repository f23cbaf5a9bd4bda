"""One SQLite cache of model replies, so that a re-run or a resumed run pays for nothing twice.

Used by data generation (``icm data generate``: descriptions, explanations, Q-A tables)
and by the explanation judge (``icm eval meq``). An entry is keyed by the model and a
key string that the caller derives from everything it sends (:func:`request_key`,
:func:`stage_key`); it holds the reply text, the stage it answers (for counts) and the
token usage. Each reply is committed as soon as it arrives; the database runs in WAL
mode, so a process killed at any moment leaves every committed reply readable and the one
in flight simply absent. Failed requests are never cached.

Files written by the two caches this one replaces are read as they are: a judge cache's
``replies`` table gains the new columns, a data cache's ``responses`` table is copied
into ``replies`` under :func:`stage_key` once.

``diskcache`` or ``requests-cache`` would do less for more: the first keeps no token
usage or per-stage counts and pickles its values, the second caches HTTP responses, not
replies read from a streamed or retried exchange.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CachedReply", "ReplyCache", "prompt_hash", "request_key", "stage_key"]


def request_key(payload: Any) -> str:
    """SHA-256 of ``payload`` as canonical JSON (sorted keys): the same request, the same key."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def prompt_hash(messages: Any, params: dict[str, Any] | None = None) -> str:
    """The key of what data generation sends: the messages (text only) and the sampling parameters."""
    return request_key({"messages": messages, "params": params or {}})


def stage_key(image_sha: str, stage: str, prompt_sha: str) -> str:
    """The key of one data-generation stage of one image (``explicit``, ``combined``, ``qa`` ...)."""
    return f"{image_sha}:{stage}:{prompt_sha}"


@dataclass(frozen=True)
class CachedReply:
    text: str
    stage: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created: float = 0.0


_COLUMNS = {"stage": "TEXT NOT NULL DEFAULT ''", "prompt_tokens": "INTEGER NOT NULL DEFAULT 0",
            "completion_tokens": "INTEGER NOT NULL DEFAULT 0"}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS replies (model TEXT NOT NULL, key TEXT NOT NULL, reply TEXT NOT NULL, "
    "created REAL NOT NULL, " + ", ".join(f"{k} {v}" for k, v in _COLUMNS.items()) + ", PRIMARY KEY (model, key))"
)


class ReplyCache:
    """Replies by (model, key), in one SQLite file; see the module docstring.

    Safe to share between threads of one process (a lock serialises access); several
    processes may use the same file (SQLite locks it). ``hits``, ``misses`` and
    ``writes`` count this object's calls.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._db:  # one transaction: created and brought up to date together
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(_SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(replies)")}
            for name, decl in _COLUMNS.items():
                if name not in have:  # a judge cache of an earlier version
                    self._db.execute(f"ALTER TABLE replies ADD COLUMN {name} {decl}")
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='responses'").fetchone():
                self._db.execute(  # a data-generation cache of an earlier version; same key as stage_key()
                    "INSERT OR IGNORE INTO replies (model, key, reply, created, stage, prompt_tokens, completion_tokens) "
                    "SELECT model, image_sha || ':' || stage || ':' || prompt_sha, response, created, stage, "
                    "prompt_tokens, completion_tokens FROM responses"
                )
                self._db.execute("DROP TABLE responses")
        self.hits = 0
        self.misses = 0
        self.writes = 0

    def get(self, model: str, key: str) -> CachedReply | None:
        with self._lock:
            row = self._db.execute(
                "SELECT reply, stage, prompt_tokens, completion_tokens, created FROM replies WHERE model=? AND key=?",
                (model, key),
            ).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return CachedReply(row[0], row[1], int(row[2]), int(row[3]), float(row[4]))

    def put(
        self, model: str, key: str, text: str, *, stage: str = "", prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO replies (model, key, reply, created, stage, prompt_tokens, completion_tokens) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (model, key, text, time.time(), stage, prompt_tokens, completion_tokens),
            )
            self.writes += 1

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def stage_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT stage, COUNT(*) FROM replies GROUP BY stage").fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ReplyCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
