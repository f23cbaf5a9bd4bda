"""Keys and roles (issue 20): a reviewer is its key's name, never a field of the body; a
client key moderates and reads only its own decisions and images; reviewers and admins see
everything, only admins read the metrics. Each test replays a case a hostile probe ran on the
server before roles existed (see docs/security.md, "Keys and roles")."""

from __future__ import annotations

import hashlib
import logging

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from icm.cli.main import app as cli
from icm.moderation.engine import Moderator
from icm.serve import ServeConfig, create_app

from serve_helpers import ColourBackend, png

LOCAL = ("127.0.0.1", 50123)
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
SECRETS = {
    "alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef",
    "carol": "carol-key-0123456789abcdef", "dave": "dave-key-0123456789abcdef", "root": "root-key-0123456789abcdef",
}
ROLES = {"alice": "reviewer", "bob": "reviewer", "carol": "client", "dave": "client", "root": "admin"}


def h(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


@pytest.fixture
def make(tmp_path, monkeypatch):
    """A server with two reviewers (alice, bob), two clients (carol, dave) and an admin (root);
    webhooks go to a port nobody listens on, so every event stays in the outbox to be read."""
    monkeypatch.delenv("ICM_API_KEYS", raising=False)

    def build(**kw):
        kw.setdefault("db", str(tmp_path / "d.sqlite"))
        kw.setdefault("api_keys", [f"{n}:{SECRETS[n]}:{ROLES[n]}" for n in SECRETS])
        kw.setdefault("webhook_url", "http://127.0.0.1:9/hook")
        kw.setdefault("webhook_secret", "w" * 32)
        app = create_app(ServeConfig(**kw), moderator=Moderator(ColourBackend(refuse_green=True), policy="icm-sexy"))
        return TestClient(app, client=LOCAL)

    return build


def moderate(c: TestClient, who: str, colour: tuple[int, int, int], name: str = "x.png") -> dict:
    r = c.post("/v1/moderate", files={"image": (name, png(colour, (60, 40)), "image/png")}, headers=h(who))
    assert r.status_code == 200, r.text
    return r.json()


def store(c: TestClient):
    return c.app.state.service.store


def test_bobs_key_cannot_claim_release_or_review_as_alice(make):
    with make() as c:
        d = moderate(c, "carol", GREEN)["decision_id"]  # green: the model cannot tell, so a person must
        r = c.post(f"/v1/decisions/{d}/claim", json={}, headers=h("alice"))
        assert r.status_code == 200 and r.json()["reviewer"] == "alice"
        # Bob's key naming Alice: refused, whatever the route
        for method, path, body in (
            ("POST", f"/v1/decisions/{d}/claim", {"reviewer": "alice"}),
            ("POST", "/v1/review-queue/claim", {"reviewer": "alice"}),
            ("POST", f"/v1/decisions/{d}/reviews", {"verdict": "block", "reviewer": "alice"}),
        ):
            r = c.request(method, path, json=body, headers=h("bob"))
            assert r.status_code == 403 and r.json()["error"] == "reviewer_mismatch", (path, r.text)
            assert "'bob'" in r.json()["detail"]
        r = c.delete(f"/v1/decisions/{d}/claim", params={"reviewer": "alice"}, headers=h("bob"))
        assert r.status_code == 403 and r.json()["error"] == "reviewer_mismatch"
        # as himself, Bob meets Alice's live claim: 409, and her claim stays
        assert c.post(f"/v1/decisions/{d}/claim", json={}, headers=h("bob")).status_code == 409
        r = c.delete(f"/v1/decisions/{d}/claim", headers=h("bob"))
        assert r.status_code == 409 and "'alice'" in r.json()["detail"]
        assert c.post(f"/v1/decisions/{d}/reviews", json={"verdict": "block"}, headers=h("bob")).status_code == 409
        assert c.post("/v1/review-queue/claim", json={}, headers=h("bob")).status_code == 204  # nothing else waits
        (item,) = c.get("/v1/review-queue", headers=h("bob")).json()["items"]
        assert item["id"] == d and item["claimed_by"] == "alice"
        assert store(c).reviews() == []
        # Alice reviews as herself; naming herself is allowed too
        r = c.post(f"/v1/decisions/{d}/reviews", json={"verdict": "block", "reviewer": "alice"}, headers=h("alice"))
        assert r.status_code == 201 and r.json()["reviewer"] == "alice" and r.json()["api_key_name"] == "alice"
        assert [(x["reviewer"], x["api_key_name"]) for x in store(c).reviews()] == [("alice", "alice")]


def test_a_client_key_cannot_override_decisions_nor_work_the_queue(make):
    with make() as c:
        d = moderate(c, "carol", RED)
        assert d["record"]["verdict"] == "block"
        did = d["decision_id"]
        r = c.post(f"/v1/decisions/{did}/reviews", json={"verdict": "allow"}, headers=h("carol"))
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert "'carol'" in r.json()["detail"] and "'client'" in r.json()["detail"]
        for method, path in (
            ("GET", "/v1/review-queue"), ("POST", "/v1/review-queue/claim"), ("POST", f"/v1/decisions/{did}/claim"),
            ("DELETE", f"/v1/decisions/{did}/claim"), ("GET", "/v1/review-queue/agreement"), ("GET", "/metrics"),
        ):
            r = c.request(method, path, json={} if method == "POST" else None, headers=h("carol"))
            assert r.status_code == 403 and r.json()["error"] == "forbidden", (path, r.text)
        assert store(c).reviews() == []
        assert [e["event"] for e in store(c).events()] == ["decision.block"], "no review.override webhook"
        # a reviewer neither moderates nor reads the metrics; an admin does everything
        assert c.post("/v1/moderate", files={"image": ("a.png", png(RED), "image/png")}, headers=h("alice")).status_code == 403
        assert c.get("/metrics", headers=h("alice")).status_code == 403
        assert c.get("/metrics", headers=h("root")).status_code == 200
        r = c.post(f"/v1/decisions/{did}/reviews", json={"verdict": "allow"}, headers=h("root"))
        assert r.status_code == 201 and r.json()["action"] == "override" and r.json()["reviewer"] == "root"
        assert [e["event"] for e in store(c).events()] == ["decision.block", "review.override"]
        # every role reads the policies and who it is
        assert c.get("/v1/policies", headers=h("carol")).status_code == 200
        me = c.get("/v1/whoami", headers=h("carol")).json()
        assert me == {"name": "carol", "role": "client", "permissions": ["moderate"], "keys": True}
        assert c.get("/v1/whoami", headers=h("alice")).json()["permissions"] == ["read_all", "review"]


def test_a_client_reads_only_its_own_decisions_and_images(make):
    with make() as c:
        mine = moderate(c, "carol", RED, "carol.png")
        theirs = moderate(c, "dave", BLUE, "dave.png")
        own_sha, their_sha = (hashlib.sha256(png(col, (60, 40))).hexdigest() for col in (RED, BLUE))
        listed = c.get("/v1/decisions", headers=h("carol")).json()
        assert [x["id"] for x in listed["decisions"]] == [mine["decision_id"]] and listed["total"] == 1
        assert c.get(f"/v1/decisions/{mine['decision_id']}", headers=h("carol")).status_code == 200
        r = c.get(f"/v1/decisions/{theirs['decision_id']}", headers=h("carol"))
        assert r.status_code == 404 and r.json()["error"] == "no_such_decision"  # as if it did not exist
        for path in (f"/v1/images/{their_sha}", f"/v1/images/{their_sha}/thumbnail"):
            assert c.get(path, headers=h("carol")).status_code == 404, path
        r = c.get(f"/v1/images/{own_sha}", headers=h("carol"))
        assert r.status_code == 200 and r.content == png(RED, (60, 40))
        assert c.get(f"/v1/images/{own_sha}/thumbnail", headers=h("carol")).status_code == 200
        # reviewers and admins read everything
        for who in ("alice", "root"):
            assert c.get("/v1/decisions", headers=h(who)).json()["total"] == 2
            assert c.get(f"/v1/decisions/{theirs['decision_id']}", headers=h(who)).status_code == 200
            assert c.get(f"/v1/images/{their_sha}", headers=h(who)).content == png(BLUE, (60, 40))
        # the same picture sent by Dave too: now it is one of his images as well
        moderate(c, "dave", RED, "again.png")
        assert c.get(f"/v1/images/{own_sha}", headers=h("dave")).status_code == 200


def test_without_keys_the_page_names_the_reviewer_as_before(make):
    with make(api_keys=[], webhook_url=None, webhook_secret=None, allowed_hosts=["testserver"]) as c:
        d = c.post("/v1/moderate", files={"image": ("g.png", png(GREEN), "image/png")}).json()["decision_id"]
        assert c.get("/v1/whoami").json() == {
            "name": None, "role": "admin", "permissions": ["metrics", "moderate", "read_all", "review"], "keys": False,
        }
        assert c.post(f"/v1/decisions/{d}/claim", json={}).status_code == 422  # nobody said who
        assert c.post(f"/v1/decisions/{d}/claim", json={"reviewer": "ada"}).json()["reviewer"] == "ada"
        assert c.delete(f"/v1/decisions/{d}/claim", params={"reviewer": "bea"}).status_code == 409
        r = c.post(f"/v1/decisions/{d}/reviews", json={"verdict": "allow", "reviewer": "ada"})
        assert r.status_code == 201 and r.json()["reviewer"] == "ada" and r.json()["api_key_name"] is None


# --------------------------------------------------------------------------- the key file


def test_key_entries_take_a_role_and_keys_without_one_are_admins_with_a_warning(make, tmp_path, monkeypatch, caplog):
    key = SECRETS["alice"]
    cfg = ServeConfig(api_keys=[f"alice:{key}:reviewer", f"old:{SECRETS['bob']}"])
    (alice, old) = cfg.all_api_keys()
    assert (alice.name, alice.role, alice.effective_role) == ("alice", "reviewer", "reviewer")
    assert (old.name, old.role, old.effective_role) == ("old", None, "admin")
    for entry, words in [
        (f"alice:{key}:superuser", "role 'superuser'"),
        (f"alice:{key}:", "role ''"),
        ("alice::reviewer", "empty key"),
        (f"alice:{key[:10]}:client", "at least 16"),
    ]:
        with pytest.raises(ValidationError) as info:
            ServeConfig(api_keys=[entry])
        assert words in str(info.value) and "'alice'" in str(info.value), str(info.value)
        assert key not in str(info.value) and key[:10] not in str(info.value)
    # two keys of one name (a rotation) are one identity: one role
    assert len(ServeConfig(api_keys=[f"alice:{key}:reviewer", f"alice:{SECRETS['bob']}:reviewer"]).all_api_keys()) == 2
    with pytest.raises(ValueError, match="named 'alice' have different roles"):
        ServeConfig(api_keys=[f"alice:{key}:reviewer", f"alice:{SECRETS['bob']}:admin"]).all_api_keys()
    # $ICM_API_KEYS as today: no role, full access, and a warning naming the keys
    monkeypatch.setenv("ICM_API_KEYS", f"legacy:{SECRETS['dave']}")
    caplog.set_level(logging.WARNING, logger="icm.serve")
    with make(api_keys=[f"carol:{SECRETS['carol']}:client"]) as c:
        assert c.get("/v1/whoami", headers=h("dave")).json()["role"] == "admin"
        assert c.get("/metrics", headers=h("dave")).status_code == 200
    warned = [r.getMessage() for r in caplog.records if "roles are not set" in r.getMessage()]
    assert len(warned) == 1 and "legacy" in warned[0] and "carol" not in warned[0] and SECRETS["dave"] not in warned[0]
    caplog.clear()
    monkeypatch.delenv("ICM_API_KEYS")
    with make():
        pass
    assert not [r for r in caplog.records if "roles are not set" in r.getMessage()]


def test_the_key_file_takes_name_key_role(tmp_path, monkeypatch):
    import icm.serve.app as serve_app

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    started: list[ServeConfig] = []
    monkeypatch.setattr(serve_app, "serve", lambda cfg: started.append(cfg))
    keys = tmp_path / "keys"
    keys.write_text(f"# name:key:role\nalice:{SECRETS['alice']}:reviewer\ncarol:{SECRETS['carol']}:client\nroot:{SECRETS['root']}\n")
    keys.chmod(0o600)
    r = CliRunner().invoke(cli, ["serve", "--db", str(tmp_path / "x.sqlite"), "--api-key", str(keys)])
    assert r.exit_code == 0, r.output
    assert [(k.name, k.role) for k in started[0].all_api_keys()] == [("alice", "reviewer"), ("carol", "client"), ("root", None)]
    keys.write_text(f"alice:{SECRETS['alice']}:reviewr\n")
    r = CliRunner().invoke(cli, ["serve", "--db", str(tmp_path / "x.sqlite"), "--api-key", str(keys)])
    assert r.exit_code == 2 and "role 'reviewr'" in r.output and SECRETS["alice"] not in r.output
