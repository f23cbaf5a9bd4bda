"""All or nothing per request (issue 20): a request that fails stores no decision and sends no
webhook, on SQLite and on PostgreSQL (when ICM_TEST_POSTGRES_URL names a disposable database;
each test works in a schema of its own there and drops it).

Before, each image (and each policy) of a ``/v1/moderations`` request was committed by the batch
that judged it: a request whose second image the backend failed on answered 502, or one a full
queue refused answered 503, yet kept the decisions of its other images and queued their
``decision.block`` webhooks.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sa = pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient

from icm.moderation.engine import Moderator
from icm.serve import ServeConfig, create_app

from serve_helpers import ColourBackend, png, postgres_schema

LOCAL = ("127.0.0.1", 50123)
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
PHOTO = Path(__file__).resolve().parents[1] / "examples" / "images" / "flower.jpg"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A SQLite file, or a fresh schema of ICM_TEST_POSTGRES_URL (dropped afterwards)."""
    if request.param == "sqlite":
        yield str(tmp_path / "d.sqlite")
        return
    with postgres_schema(f"icm_atomic_{os.getpid()}") as url:
        yield url


def server(db: str, tmp_path: Path, monkeypatch, **kw) -> TestClient:
    """Webhooks go to a port nobody listens on: every event stays in the outbox to be counted."""
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    config = ServeConfig(
        db=db, image_dir=str(tmp_path / "images"), allowed_hosts=["testserver"],
        webhook_url="http://127.0.0.1:9/hook", webhook_secret="w" * 32, **kw,
    )
    return TestClient(create_app(config, moderator=Moderator(ColourBackend(fail_green=True), policy="icm-sexy")), client=LOCAL)


def part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def stored(c: TestClient) -> tuple[int, list[str]]:
    store = c.app.state.service.store
    return store.count_decisions(), [e["event"] for e in store.events()]


def test_a_backend_failure_on_one_image_stores_nothing_of_the_request(db, tmp_path, monkeypatch):
    with server(db, tmp_path, monkeypatch) as c:
        # a blocked image and one the backend fails on, under one policy and under two
        for model in ("icm-sexy", "icm-sexy,icm-sexy:children"):
            r = c.post("/v1/moderations", json={"model": model, "input": [part(png(RED)), part(png(GREEN))]})
            assert r.status_code == 502 and r.json()["error"]["code"] == "backend_failed", r.text
            assert "green is not allowed" not in r.text  # the upstream's text stays in the server log
            assert stored(c) == (0, []), model
        # the same request without the failing image: every decision and its webhook
        r = c.post("/v1/moderations", json={"model": "icm-sexy,icm-sexy:children", "input": [part(png(RED)), part(png(BLUE))]})
        assert r.status_code == 200 and r.json()["results"][0]["flagged"] is True
        assert stored(c) == (4, ["decision.block", "decision.block"])
        ids = sorted(d for res in r.json()["results"] for d in (x["decision_id"] for x in res["icm"]["decisions"]))
        assert ids == c.app.state.service.store.decision_ids()
        # /v1/moderate: one image, one decision, or none
        r = c.post("/v1/moderate", files={"image": ("g.png", png(GREEN), "image/png")})
        assert r.status_code == 502 and stored(c)[0] == 4


def test_a_flagged_image_beside_a_truncated_jpeg_stores_nothing(db, tmp_path, monkeypatch):
    """The probe's case: a flagged picture and a truncated JPEG in one request (re-measured on the
    reworked route, which decodes every image before judging any)."""
    truncated = PHOTO.read_bytes()[: PHOTO.stat().st_size // 2]
    with server(db, tmp_path, monkeypatch) as c:
        r = c.post("/v1/moderations", json={"input": [part(png(RED)), part(truncated, "image/jpeg")], "model": "icm-sexy"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]", r.text
        assert stored(c) == (0, [])
        r = c.post("/v1/moderate", files={"image": ("half.jpg", truncated, "image/jpeg")})
        assert r.status_code == 422 and stored(c) == (0, [])


def test_a_request_a_full_queue_refuses_in_part_stores_nothing(db, tmp_path, monkeypatch):
    from icm.serve.batching import QueueFull

    images = [part(png(RED)), part(png((250, 0, 9))), part(png((240, 9, 0)))]
    c = server(db, tmp_path, monkeypatch, max_queue=1)
    with c:  # more judgements than the queue holds at all: refused up front, nothing judged
        r = c.post("/v1/moderations", json={"model": "icm-sexy", "input": images})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_inputs", r.text
    c = server(db, tmp_path, monkeypatch, max_queue=3)
    with c:  # other clients' work fills the queue after the first image is queued: the rest is refused
        batcher = c.app.state.service.batcher
        real, calls = batcher.submit, []

        async def crowded(job, cost=0):
            calls.append(job)
            if len(calls) > 1:
                raise QueueFull("3 requests are already waiting (limit 3)")
            return await real(job, cost=cost)

        monkeypatch.setattr(batcher, "submit", crowded)
        r = c.post("/v1/moderations", json={"model": "icm-sexy", "input": images})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        assert len(calls) == 3
    # the server has stopped: what was queued was judged, and none of it committed
    c = server(db, tmp_path, monkeypatch)
    with c:
        assert stored(c) == (0, [])
