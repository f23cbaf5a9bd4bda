"""The review queue through the API: what awaits a person, claims, skips, the audit trail,
agreement figures and audit sampling. The page's keyboard flow is in tests/test_review_page.py."""

from __future__ import annotations

import io
import os
import random

import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from icm.moderation.engine import Moderator
from icm.serve import ServeConfig, create_app
from icm.serve.service import queue_reason

from serve_helpers import ColourBackend, png

LOCAL = ("127.0.0.1", 50123)
RED, BLUE, GREEN, GREEN2 = (255, 0, 0), (0, 0, 255), (0, 255, 0), (20, 230, 0)


@pytest.fixture
def make(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)

    def build(**kw):
        kw.setdefault("db", str(tmp_path / "d.sqlite"))
        kw.setdefault("allowed_hosts", ["testserver"])
        app = create_app(ServeConfig(**kw), moderator=Moderator(ColourBackend(refuse_green=True), policy="icm-sexy"))
        return TestClient(app, client=LOCAL)

    return build


def post(c, colour, name, **form) -> dict:
    r = c.post("/v1/moderate", files={"image": (name, png(colour, (300, 200)), "image/png")}, data=form)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_queue_holds_what_awaits_a_person_oldest_first_with_thumbnails(make):
    with make() as c:
        ids = {name: post(c, colour, name)["decision_id"] for colour, name in
               ((GREEN, "g1.png"), (RED, "red.png"), (BLUE, "blue.png"), (GREEN2, "g2.png"))}
        q = c.get("/v1/review-queue").json()
        assert [i["id"] for i in q["items"]] == [ids["g1.png"], ids["g2.png"]] and q["total"] == 2
        assert all(i["verdict"] == "review" and i["queue"] == "review" and i["claimed_by"] is None for i in q["items"])
        thumb = c.get(q["items"][0]["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(thumb.content)) as im:
            assert max(im.size) == 160 and im.size == (160, 107)
        # filters: verdict, policy, rule set, product, dates
        assert c.get("/v1/review-queue", params={"verdict": "block"}).json()["total"] == 0
        assert c.get("/v1/review-queue", params={"policy": "gambling"}).json()["total"] == 0
        assert c.get("/v1/review-queue", params={"rules": "icm-default"}).json()["total"] == 2
        assert c.get("/v1/review-queue", params={"rules": "children"}).json()["total"] == 0
        assert c.get("/v1/review-queue", params={"product": "kiss"}).json()["total"] == 0
        created = q["items"][0]["created_at"]
        assert c.get("/v1/review-queue", params={"since": created[:10]}).json()["total"] == 2
        assert c.get("/v1/review-queue", params={"until": created[:10]}).json()["total"] == 0
        assert c.get("/v1/review-queue", params={"verdict": "maybe"}).status_code == 422
        assert "icm_review_queue_depth 2.0" in c.get("/metrics").text


def _databases() -> list[str]:
    return ["sqlite"] + (["postgresql"] if os.environ.get("ICM_TEST_POSTGRES_URL") else [])


@pytest.mark.parametrize("database", _databases())
def test_claims_keep_two_reviewers_off_the_same_item_and_expire(make, tmp_path, database):
    extra = {}
    if database == "postgresql":  # CI sets ICM_TEST_POSTGRES_URL; its icm tables are dropped
        from test_serve import _drop_icm_tables

        _drop_icm_tables(os.environ["ICM_TEST_POSTGRES_URL"])
        extra = {"db": os.environ["ICM_TEST_POSTGRES_URL"], "image_dir": str(tmp_path / "images")}
    with make(claim_seconds=120, **extra) as c:
        g1 = post(c, GREEN, "g1.png")["decision_id"]
        g2 = post(c, GREEN2, "g2.png")["decision_id"]
        a = c.post("/v1/review-queue/claim", json={"reviewer": "alice"}).json()
        b = c.post("/v1/review-queue/claim", json={"reviewer": "bob"}).json()
        assert (a["id"], b["id"]) == (g1, g2), "bob gets the next item, not alice's"
        assert a["claimed_by"] == "alice" and a["record"]["verdict"] == "review" and a["thumbnail_url"]
        assert c.post("/v1/review-queue/claim", json={"reviewer": "alice"}).json()["id"] == g1, "one's own claim comes back"
        assert c.post("/v1/review-queue/claim", json={"reviewer": "carol"}).status_code == 204, "nothing left for carol"
        r = c.post(f"/v1/decisions/{g1}/reviews", json={"verdict": "block", "reviewer": "bob"})
        assert r.status_code == 409 and "alice" in r.json()["detail"]
        assert c.post(f"/v1/decisions/{g1}/claim", json={"reviewer": "bob"}).status_code == 409
        # alice skips: her claim is given back and bob may take it
        assert c.delete(f"/v1/decisions/{g1}/claim", params={"reviewer": "alice"}).status_code == 204
        assert c.post(f"/v1/decisions/{g1}/claim", json={"reviewer": "bob"}).status_code == 200
        assert c.post(f"/v1/decisions/{g1}/reviews", json={"verdict": "block", "reviewer": "bob"}).status_code == 201
        assert [i["id"] for i in c.get("/v1/review-queue").json()["items"]] == [g2]
        store = c.app.state.service.store
        # a claim lapses: after claim_seconds another reviewer gets the item
        import time

        assert store.claim_next("carol", now=time.time() + 60) is None
        assert store.claim_next("carol", now=time.time() + 121)["id"] == g2
        assert c.post("/v1/review-queue/claim", json={}).status_code == 422, "a claim names its reviewer"


def test_the_audit_trail_keeps_the_model_decision_and_every_review(make):
    with make() as c:
        g1 = post(c, GREEN, "g1.png")["decision_id"]
        c.post("/v1/review-queue/claim", json={"reviewer": "alice"})
        r = c.post(f"/v1/decisions/{g1}/reviews", json={"verdict": "allow", "reviewer": "alice", "note": "a green field"})
        assert r.status_code == 201 and r.json()["action"] == "override"
        r2 = c.post(f"/v1/decisions/{g1}/reviews", json={"verdict": "block", "reviewer": "bob", "note": "second look"})
        assert r2.status_code == 201
        d = c.get(f"/v1/decisions/{g1}").json()
        assert d["verdict"] == "review" and d["record"]["verdict"] == "review", "the model's decision stays as it was"
        assert [(x["reviewer"], x["verdict"], x["note"]) for x in d["reviews"]] == [
            ("alice", "allow", "a green field"), ("bob", "block", "second look")]
        assert all(x["created_at"] for x in d["reviews"])
        assert c.get("/v1/review-queue").json()["total"] == 0, "a reviewed item has left the queue"


def test_agreement_figures_and_audit_sampling(make):
    with make(audit_rate=1.0) as c:
        red = post(c, RED, "red.png")["decision_id"]
        blue = post(c, BLUE, "blue.png")["decision_id"]
        green = post(c, GREEN, "g.png")["decision_id"]
        q = c.get("/v1/review-queue").json()["items"]
        assert [(i["id"], i["queue"]) for i in q] == [(red, "audit"), (blue, "audit"), (green, "review")]
        assert c.get("/v1/review-queue", params={"product": "upper_shoulders"}).json()["total"] == 1
        for did, verdict, who in ((red, "block", "alice"), (blue, "block", "alice"), (red, "allow", "bob"),
                                  (green, "allow", "alice"), (green, "allow", "bob")):
            assert c.post(f"/v1/decisions/{did}/reviews", json={"verdict": verdict, "reviewer": who}).status_code == 201
        a = c.get("/v1/review-queue/agreement").json()
        by = a["reviewer_vs_model"]["by_product"]
        # red: the model said block, the latest review (bob) allow -> disagree; blue: allow vs block -> disagree
        assert by["upper_shoulders"] == {"reviewed": 1, "agree": 0, "rate": 0.0, "model_review": {"allow": 0, "block": 0}}
        assert by["whole_normal"]["reviewed"] == 1 and by["whole_normal"]["agree"] == 0
        assert by["(none)"]["model_review"] == {"allow": 1, "block": 0}
        # two reviewers on red (block vs allow) and on green (allow, allow)
        assert a["reviewer_vs_reviewer"] == {"items": 2, "pairs": 2, "agree": 1, "rate": 0.5}
    rng = random.Random(7)
    picks = [queue_reason("allow", 0.25, rng) for _ in range(2000)]
    assert 400 < picks.count("audit") < 600 and set(picks) == {"audit", None}
    assert queue_reason("review", 0.0) == "review" and queue_reason("block", 0.0) is None and queue_reason(None, 1.0) is None
