"""The review side of the decision store: reviews, the review queue, claims, agreement figures.

:class:`ReviewStore` is a mixin of :class:`icm.serve.store.DecisionStore`, which provides the
engine, the reflected tables and the write lock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from icm.serve.store_rows import ClaimConflict, ReviewWithdrawRefused, decision_dict, review_dict, summary_dict, utcnow


class ReviewStore:
    """Reviews, the queue and claims (a mixin: the store provides what is declared here)."""

    engine: sa.Engine
    webhooks: bool
    _decisions: sa.Table
    _reviews: sa.Table
    _claims: sa.Table

    def _writing(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _add_event(self, conn: sa.Connection, event: str, decision_id: int, body: dict[str, Any]) -> None:
        raise NotImplementedError

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
                self._add_event(conn, "review.override", decision_id, {"decision": summary_dict(row, decision_id), "review": out})
        return out

    def withdraw_review(
        self, decision_id: int, review_id: int, reviewer: str, *, within_s: float, now: float | None = None
    ) -> dict[str, Any]:
        """Delete a review its own reviewer made less than ``within_s`` seconds ago (undo): the
        decision goes back to the queue if it was queued. KeyError for no such review of that
        decision; :class:`ReviewWithdrawRefused` for another reviewer's review or a late undo."""
        now = time.time() if now is None else now
        with self._writing(), self.engine.begin() as conn:
            r = conn.execute(
                sa.select(self._reviews).where(self._reviews.c.id == review_id, self._reviews.c.decision_id == decision_id)
            ).mappings().first()
            if r is None:
                raise KeyError(f"decision {decision_id} has no review {review_id}")
            if r["reviewer"] != reviewer:
                raise ReviewWithdrawRefused(f"review {review_id} is {r['reviewer']!r}'s: only its reviewer withdraws it")
            age = now - datetime.fromisoformat(r["created_at"]).timestamp()
            if age > within_s:
                raise ReviewWithdrawRefused(
                    f"review {review_id} was made {round(age)} seconds ago: it can be withdrawn for {within_s:g} seconds only; "
                    "review the decision again instead"
                )
            conn.execute(sa.delete(self._reviews).where(self._reviews.c.id == review_id))
        return review_dict(r)

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
            d = decision_dict(row, full=False)
            c = claims.get(row["id"])
            d["claimed_by"] = c["reviewer"] if c else None
            d["claim_expires_at"] = c["expires_at"] if c else None
            out.append(d)
        return out

    def queue_facets(self) -> dict[str, list[str]]:
        """The values present in the whole queue (unfiltered), for the page's filters: each of
        ``policy``, ``rules``, ``verdict``, ``product`` sorted, without nulls (issue 21)."""
        sub = self._queue_query().subquery()
        out: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for col in ("policy", "rules", "verdict", "product"):
                values = conn.execute(sa.select(sub.c[col]).where(sub.c[col].is_not(None)).distinct()).scalars()
                out[col] = sorted(str(v) for v in values)
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
                d = decision_dict(row, full=False)
                d["claimed_by"], d["claim_expires_at"] = reviewer, now + ttl_s
                return d

    def release(self, decision_id: int, reviewer: str, *, now: float | None = None) -> bool:
        """Give a claim back (a skip); only its holder can: another reviewer's live claim raises
        :class:`ClaimConflict`. False when there was no claim of this reviewer to give back."""
        now = time.time() if now is None else now
        with self._writing(), self.engine.begin() as conn:
            n = conn.execute(sa.delete(self._claims).where(self._claims.c.decision_id == decision_id, self._claims.c.reviewer == reviewer)).rowcount
            if not n:
                holder = conn.execute(sa.select(self._claims).where(self._claims.c.decision_id == decision_id)).mappings().first()
                if holder is not None and holder["expires_at"] > now:
                    raise ClaimConflict(decision_id, holder["reviewer"], holder["expires_at"])
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


    def reviews(self, decision_id: int | None = None) -> list[dict[str, Any]]:
        q = sa.select(self._reviews).order_by(self._reviews.c.id)
        if decision_id is not None:
            q = q.where(self._reviews.c.decision_id == decision_id)
        with self.engine.connect() as conn:
            return [review_dict(r) for r in conn.execute(q).mappings()]

    def iter_reviewed(self, *, latest_only: bool = True) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(decision, review) pairs in review order; with ``latest_only`` a decision's last review."""
        q = sa.select(self._reviews).order_by(self._reviews.c.id)
        with self.engine.connect() as conn:
            reviews = [review_dict(r) for r in conn.execute(q).mappings()]
            if latest_only:
                last: dict[int, dict[str, Any]] = {}
                for r in reviews:
                    last[r["decision_id"]] = r
                reviews = sorted(last.values(), key=lambda r: r["id"])
            for r in reviews:
                row = conn.execute(sa.select(self._decisions).where(self._decisions.c.id == r["decision_id"])).mappings().first()
                if row is not None:
                    yield decision_dict(row, full=True), r

