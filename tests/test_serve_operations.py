"""Running the server in production (issue 21): request ids, idempotency keys, JSON logs, readiness.

On SQLite, and on PostgreSQL when ICM_TEST_POSTGRES_URL names a disposable database (each test
works in a schema of its own there and drops it).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient

from icm.moderation.engine import Moderator
from icm.serve import ServeConfig, create_app

from serve_helpers import ColourBackend, png, postgres_schema

LOCAL = ("127.0.0.1", 50124)
RED, BLUE = (255, 0, 0), (0, 0, 255)
ALICE, BOB = "alice:alices-key-0123456789:client", "bob:bobs-key-0123456789abc:client"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A SQLite file, or a fresh schema of ICM_TEST_POSTGRES_URL (dropped afterwards)."""
    if request.param == "sqlite":
        yield str(tmp_path / "d.sqlite")
        return
    with postgres_schema(f"icm_ops_{os.getpid()}") as url:
        yield url


def server(db: str, tmp_path: Path, monkeypatch, backend=None, **kw) -> TestClient:
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    config = ServeConfig(db=db, image_dir=str(tmp_path / "images"), allowed_hosts=["testserver"], **kw)
    moderator = Moderator(backend or ColourBackend(), policy="icm-sexy")
    return TestClient(create_app(config, moderator=moderator), client=LOCAL)


def auth(entry: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + entry.split(":")[1]}


def part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def test_a_request_id_is_echoed_or_made_on_every_route_and_stored_with_the_decision(db, tmp_path, monkeypatch):
    with server(db, tmp_path, monkeypatch) as c:
        r = c.post("/v1/moderate", files={"image": ("r.png", png(RED), "image/png")}, headers={"X-Request-ID": "req-abc.1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc.1"
        decision = c.get(f"/v1/decisions/{r.json()['decision_id']}").json()
        assert decision["request_id"] == "req-abc.1"
        assert c.get("/v1/decisions").json()["decisions"][0]["request_id"] == "req-abc.1"
        # made when missing, too long or not printable; on errors and on every route
        made = {c.get("/healthz").headers["x-request-id"], c.get("/readyz").headers["x-request-id"]}
        for bad in ("x" * 129, "a\tb", " "):
            made.add(c.get("/v1/policies", headers={"X-Request-ID": bad}).headers["x-request-id"])
        refused = c.post("/v1/moderate", content=b"not an image", headers={"Content-Type": "text/plain"})
        assert refused.status_code == 415
        made.add(refused.headers["x-request-id"])
        assert len(made) == 6 and all(len(m) == 32 and int(m, 16) >= 0 for m in made)
        assert c.get("/healthz", headers={"X-Request-ID": "y" * 128}).headers["x-request-id"] == "y" * 128
        r = c.post("/v1/moderations", json={"input": [part(png(BLUE))]}, headers={"X-Request-ID": "openai-1"})
        ids = [d["decision_id"] for d in r.json()["results"][0]["icm"]["decisions"]]
        assert r.headers["x-request-id"] == "openai-1"
        assert [c.get(f"/v1/decisions/{i}").json()["request_id"] for i in ids] == ["openai-1"] * len(ids)


def test_an_idempotency_key_replays_the_first_answer_across_replicas(db, tmp_path, monkeypatch):
    """Two servers over one database (replicas): a retry with the same key, on either, returns the
    first answer and stores no second decision; another body with that key is a 422; keys are per API key."""
    kw = {"api_keys": [ALICE, BOB]}
    with server(db, tmp_path, monkeypatch, **kw) as one, server(db, tmp_path, monkeypatch, **kw) as two:
        store = one.app.state.service.store
        files = {"image": ("r.png", png(RED), "image/png")}
        first = one.post("/v1/moderate", files=files, headers={**auth(ALICE), "Idempotency-Key": "k-1"})
        assert first.status_code == 200
        again = two.post("/v1/moderate", files=files, headers={**auth(ALICE), "Idempotency-Key": "k-1"})
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert store.count_decisions() == 1
        other = two.post("/v1/moderate", files={"image": ("b.png", png(BLUE), "image/png")},
                         headers={**auth(ALICE), "Idempotency-Key": "k-1"})
        assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused"
        # another API key's same key is its own
        bob = two.post("/v1/moderate", files=files, headers={**auth(BOB), "Idempotency-Key": "k-1"})
        assert bob.status_code == 200 and bob.json()["decision_id"] != first.json()["decision_id"]
        assert store.count_decisions() == 2
        # the OpenAI-compatible route, and a bad key
        body = {"model": "icm-sexy", "input": [part(png(RED))]}
        a = one.post("/v1/moderations", json=body, headers={**auth(ALICE), "Idempotency-Key": "m-1"})
        b = two.post("/v1/moderations", json=body, headers={**auth(ALICE), "Idempotency-Key": "m-1"})
        assert a.status_code == b.status_code == 200 and a.json() == b.json() and store.count_decisions() == 3
        c = two.post("/v1/moderations", json={**body, "model": "icm-sexy:children"}, headers={**auth(ALICE), "Idempotency-Key": "m-1"})
        assert c.status_code == 422 and c.json()["error"]["code"] == "idempotency_key_reused"
        assert one.post("/v1/moderate", files=files, headers={**auth(ALICE), "Idempotency-Key": "x" * 256}).status_code == 400
        # a failed request keeps no key: its corrected retry runs
        bad = one.post("/v1/moderate", files=files, data={"policy": "nope"}, headers={**auth(ALICE), "Idempotency-Key": "k-2"})
        assert bad.status_code == 422 and bad.json()["error"] == "unknown_policy"
        fixed = two.post("/v1/moderate", files=files, headers={**auth(ALICE), "Idempotency-Key": "k-2"})
        assert fixed.status_code == 200 and store.count_decisions() == 4


def test_an_idempotency_key_expires_after_its_window(tmp_path, monkeypatch):
    with server(str(tmp_path / "d.sqlite"), tmp_path, monkeypatch, idempotency_window_s=0.3) as c:
        files = {"image": ("r.png", png(RED), "image/png")}
        a = c.post("/v1/moderate", files=files, headers={"Idempotency-Key": "k"}).json()["decision_id"]
        assert c.post("/v1/moderate", files=files, headers={"Idempotency-Key": "k"}).json()["decision_id"] == a
        time.sleep(0.4)
        assert c.post("/v1/moderate", files=files, headers={"Idempotency-Key": "k"}).json()["decision_id"] == a + 1


def test_json_logs_are_one_object_per_line_with_the_request_id(tmp_path, monkeypatch):
    from icm.serve.logs import configure_logging

    out = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("icm").level)
    handler = configure_logging("info", "json", stream=out)
    try:
        with server(str(tmp_path / "d.sqlite"), tmp_path, monkeypatch, api_keys=[ALICE]) as c:
            r = c.post("/v1/moderate", files={"image": ("r.png", png(RED), "image/png")},
                       headers={**auth(ALICE), "X-Request-ID": "log-me"})
            assert r.status_code == 200
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
    finally:
        root.removeHandler(handler)
        root.setLevel(before[1])
        logging.getLogger("icm").setLevel(before[2])
        logging.captureWarnings(False)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # every line parses
    assert lines and all({"time", "level", "logger", "message", "request_id"} <= set(x) for x in lines)
    access = [x for x in lines if x["logger"] == "icm.serve.access" and x["request_id"] == "log-me"]
    assert len(access) == 1
    assert access[0]["route"] == "/v1/moderate" and access[0]["status"] == 200 and access[0]["method"] == "POST"
    assert access[0]["key"] == "alice" and access[0]["decision_ids"] == [r.json()["decision_id"]]
    assert access[0]["latency_ms"] > 0 and access[0]["level"] == "INFO"
    assert any(x["logger"] == "py.warnings" and "a library's warning" in x["message"] for x in lines)


class SlowStart(ColourBackend):
    """Its first call (the warm-up) waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def ask(self, images, queries):
        assert self.go.wait(30), "never let go"
        return super().ask(images, queries)


def test_readyz_answers_200_only_after_the_backend_warmed_up(tmp_path, monkeypatch):
    backend = SlowStart()
    with server(str(tmp_path / "d.sqlite"), tmp_path, monkeypatch, backend=backend) as c:
        time.sleep(0.2)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "starting"}
        assert c.get("/healthz").status_code == 200  # liveness: the process answers
        assert backend.batches == []
        backend.go.set()
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/readyz").json() == {"status": "ready"}
        assert backend.batches == [1], "one warm-up image"
        assert c.app.state.service.store.count_decisions() == 0, "the warm-up stores no decision"
