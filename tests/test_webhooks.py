"""Webhooks: signed events for block decisions and overrides, kept in the outbox and retried
until a receiver that was down, then failing, accepts each of them exactly once."""

from __future__ import annotations

import collections
import http.server
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")

import httpx

from icm.moderation.engine import Moderator
from icm.serve import ServeConfig, create_app
from icm.serve.store import DecisionStore
from icm.serve.webhooks import sign, verify

from serve_helpers import ColourBackend, live_server, png

SECRET = "whsec-0123456789abcdef"


class Receiver:
    """A webhook receiver on ``port`` that answers 503 to its first ``failures`` requests."""

    def __init__(self, port: int, failures: int) -> None:
        self.failures = failures
        self.requests = 0
        self.accepted: list[tuple[dict, bool]] = []  # (body, signature valid)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests += 1
                if outer.requests <= outer.failures:
                    self.send_response(503)
                    self.end_headers()
                    return
                ok = verify(SECRET, dict(self.headers), body)
                event = json.loads(body)
                assert self.headers["X-ICM-Event-Id"] == event["id"] and self.headers["X-ICM-Event"] == event["type"]
                outer.accepted.append((event, ok))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_a_receiver_that_is_down_then_failing_gets_each_event_exactly_once(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    port = _free_port()  # nothing listens there yet: the receiver is down
    db = tmp_path / "d.sqlite"
    cfg = ServeConfig(db=str(db), webhook_url=f"http://127.0.0.1:{port}/hooks/icm", webhook_secret=SECRET,
                      webhook_max_backoff_s=0.3)
    store = DecisionStore(f"sqlite:///{db}")

    # 1. decisions and reviews while the receiver is down; the server stops before it comes back
    with live_server(create_app(cfg, moderator=Moderator(ColourBackend(), policy="icm-sexy"))) as base:
        def moderate(colour, name):
            r = httpx.post(base + "/v1/moderate", files={"image": (name, png(colour), "image/png")}, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()

        red1, red2 = moderate((255, 0, 0), "r1.png"), moderate((250, 10, 0), "r2.png")
        blue = moderate((0, 0, 255), "b.png")
        assert (red1["record"]["verdict"], red2["record"]["verdict"], blue["record"]["verdict"]) == ("block", "block", "allow")

        def review(did: int, verdict: str) -> httpx.Response:
            return httpx.post(f"{base}/v1/decisions/{did}/reviews", json={"verdict": verdict, "reviewer": "ann", "note": "checked"})

        assert review(blue["decision_id"], "block").json()["action"] == "override"  # an event
        assert review(red1["decision_id"], "block").json()["action"] == "confirm"  # no event
        _wait(lambda: len(store.events()) == 3 and all(e["attempts"] >= 2 for e in store.events()))
        assert all(e["delivered_at"] is None and "ConnectError" in (e["last_error"] or "") for e in store.events())
    assert store.pending_events() == 3, "nothing is lost while the receiver is down, across a restart"

    # 2. the receiver comes back but fails its first four requests; a new server delivers the outbox
    with Receiver(port, failures=4) as rx, live_server(create_app(cfg, moderator=Moderator(ColourBackend(), policy="icm-sexy"))) as base:
        _wait(lambda: store.pending_events() == 0)
        time.sleep(1.0)  # were anything sent twice, it would arrive now
        assert rx.requests >= 4 + 3
        events = store.events()
        counts = collections.Counter(body["id"] for body, _ in rx.accepted)
        assert counts == {e["event_id"]: 1 for e in events}, "each event arrives exactly once"
        assert all(ok for _, ok in rx.accepted), "every event is signed with the secret"
        by_type = collections.defaultdict(list)
        for body, _ in rx.accepted:
            by_type[body["type"]].append(body)
        assert sorted(b["decision"]["id"] for b in by_type["decision.block"]) == sorted([red1["decision_id"], red2["decision_id"]])
        assert all(b["decision"]["verdict"] == "block" for b in by_type["decision.block"])
        (override,) = by_type["review.override"]
        assert override["decision"]["id"] == blue["decision_id"] and override["decision"]["verdict"] == "allow"
        assert override["review"]["verdict"] == "block" and override["review"]["reviewer"] == "ann"
        assert all(e["delivered_at"] and e["attempts"] >= 3 for e in events)
        metrics = httpx.get(base + "/metrics").text
        assert "icm_webhook_pending 0.0" in metrics
    store.close()


def test_the_signature_covers_body_time_and_secret():
    body = b'{"id": "e1", "type": "decision.block"}'
    ts = int(time.time())
    headers = {"X-ICM-Timestamp": str(ts), "X-ICM-Signature": sign(SECRET, ts, body)}
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body.replace(b"block", b"allow")), "a changed body"
    assert not verify("another-secret-0123", headers, body), "another key"
    assert not verify(SECRET, headers, body, now=ts + 3600), "a replay an hour later"
    assert not verify(SECRET, {"X-ICM-Signature": sign(SECRET, ts, body)}, body), "no timestamp"
    assert headers["X-ICM-Signature"].startswith("sha256=") and len(headers["X-ICM-Signature"]) == 7 + 64


def test_webhooks_need_a_secret_and_an_http_url(tmp_path):
    with pytest.raises(ValueError, match="webhook_secret"):
        ServeConfig(db=str(tmp_path / "x.sqlite"), webhook_url="https://hooks.example.com/icm")
    with pytest.raises(ValueError, match="http"):
        ServeConfig(db=str(tmp_path / "x.sqlite"), webhook_url="ftp://x", webhook_secret=SECRET)


def test_the_serve_flags_of_the_platform_features(tmp_path, monkeypatch):
    """--webhook-secret reads a file or the environment, never argv; --model-alias, --image-url-host,
    --audit-rate and --claim-seconds reach the config."""
    from typer.testing import CliRunner

    import icm.serve.app as serve_app
    from icm.cli.main import app as cli

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    started: list[ServeConfig] = []
    monkeypatch.setattr(serve_app, "serve", lambda cfg: started.append(cfg))
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    db = str(tmp_path / "x.sqlite")
    r = CliRunner().invoke(cli, [
        "serve", "--db", db, "--webhook-url", "https://hooks.example.com/icm", "--webhook-secret", "env:HOOK_SECRET",
        "--model-alias", "omni-moderation-latest=icm-sexy:children", "--image-url-host", "cdn.example.com",
        "--audit-rate", "0.05", "--claim-seconds", "90",
    ])
    assert r.exit_code == 0, r.output
    (cfg,) = started
    assert cfg.webhook_secret.get_secret_value() == SECRET and SECRET not in repr(cfg)
    assert cfg.model_aliases["omni-moderation-latest"] == "icm-sexy:children" and "text-moderation-latest" in cfg.model_aliases
    assert cfg.image_url_hosts == ["cdn.example.com"] and cfg.audit_rate == 0.05 and cfg.claim_seconds == 90
    r = CliRunner().invoke(cli, ["serve", "--db", db, "--webhook-url", "https://h.example.com", "--webhook-secret", SECRET])
    assert r.exit_code == 2 and "not the secret itself" in r.output and SECRET not in r.output
