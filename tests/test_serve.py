"""`icm serve`: the HTTP API, its limits and auth, dynamic batching, the store and the export.

Most tests drive the app in-process (FastAPI TestClient, or httpx over ASGI for concurrent
requests); tests/test_serve_restart.py runs the real server as a subprocess and kills it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

import httpx
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import icm
from icm.cli.main import app as cli
from icm.moderation.engine import Moderator
from icm.serve import ServeConfig, create_app
from icm.serve.export import export_reviews
from icm.serve.store import DecisionStore, StoreError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
LOCAL = ("127.0.0.1", 50123)
runner = CliRunner()

from serve_helpers import ColourBackend, png


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` (a subset) in a Prometheus exposition; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def config(tmp_path: Path, **kw: Any) -> ServeConfig:
    kw.setdefault("db", str(tmp_path / "decisions.sqlite"))
    kw.setdefault("allowed_hosts", ["testserver", "icm"])  # the Host names of TestClient and _burst
    return ServeConfig(**kw)


@pytest.fixture
def colour_client(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    backend = ColourBackend()
    app = create_app(config(tmp_path, image_root=str(EXAMPLES)), moderator=Moderator(backend, policy="icm-sexy", explain=True))
    with TestClient(app, client=LOCAL) as c:
        c.backend = backend  # type: ignore[attr-defined]
        yield c


# --------------------------------------------------------------------------- moderation


def test_three_ways_to_send_an_image_give_the_same_stored_decision(colour_client, tmp_path):
    c = colour_client
    data = (EXAMPLES / "flower.jpg").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    r1 = c.post("/v1/moderate", files={"image": ("flower.jpg", data, "image/jpeg")})
    r2 = c.post("/v1/moderate", json={"image_base64": base64.b64encode(data).decode(), "filename": "f.jpg"})
    r3 = c.post("/v1/moderate", json={"path": "flower.jpg"})
    r4 = c.post("/v1/moderate", content=data, headers={"content-type": "image/jpeg", "x-filename": "raw.jpg"})
    bodies = [r.json() for r in (r1, r2, r3, r4)]
    assert [r.status_code for r in (r1, r2, r3, r4)] == [200] * 4, bodies
    ids = [b["decision_id"] for b in bodies]
    assert ids == sorted(set(ids)), "each request is its own decision"
    recs = [b["record"] for b in bodies]
    assert {r["sha256"] for r in recs} == {sha}
    assert len({(r["verdict"], r["p_violation"], r["product"]) for r in recs}) == 1
    assert [r["path"] for r in recs] == ["flower.jpg", "f.jpg", "flower.jpg", "raw.jpg"]
    assert recs[0]["explanation"] == "Nothing red here."

    stored = c.get(f"/v1/decisions/{ids[0]}").json()
    assert stored["record"]["sha256"] == sha and stored["verdict"] == recs[0]["verdict"]
    assert stored["source"] == "upload" and stored["policy"] == "icm-sexy" and stored["rules"] == "icm-default"
    assert stored["explanation"] == "Nothing red here." and stored["reviews"] == []
    img = c.get(stored["image_url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg" and img.content == data
    assert [d["source"] for d in c.get("/v1/decisions").json()["decisions"]] == ["upload", "path", "base64", "upload"]


def test_server_is_a_thin_layer_over_icm_moderate(tmp_path, monkeypatch):
    """The detector backend through HTTP gives exactly what the library gives."""
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    paths = sorted(EXAMPLES.glob("*.jpg"))
    lib = {Path(r.path).name: r for r in icm.moderate([str(p) for p in paths], rules="children")}
    with TestClient(create_app(config(tmp_path, rules="children")), client=LOCAL) as c:
        for p in paths:
            r = c.post("/v1/moderate", files={"image": (p.name, p.read_bytes(), "image/jpeg")})
            assert r.status_code == 200, r.text
            got, want = r.json()["record"], lib[p.name]
            assert got["verdict"] == want.verdict and got["rules"] == "children"
            assert got["p_violation"] == pytest.approx(want.p_violation)
            assert got["term"]["p_yes"] == pytest.approx(want.term.p_yes)
            assert got["model"] == want.model and got["backend"] == "detector"
            assert len(got["boxes"]) == len(want.boxes)


def test_detector_server_hashes_pixels_while_decoding_not_in_the_batch_worker(tmp_path, monkeypatch):
    """The detector keys its evidence by a hash of the pixels; the server computes it in the
    decoding thread (beside other requests), so the one batch worker only runs the models."""
    import threading
    import types

    from icm.moderation.evidence import runtime

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    hashed: list[tuple[str, bytes]] = []

    class Recording:
        def __init__(self, **kw: Any) -> None:
            self.h = hashlib.blake2b(**kw)
            self.header: bytes | None = None

        def update(self, b: bytes) -> None:
            if self.header is None:
                self.header = bytes(b)
                hashed.append((threading.current_thread().name, self.header))
            self.h.update(b)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(runtime, "hashlib", types.SimpleNamespace(blake2b=Recording))
    p = EXAMPLES / "flower.jpg"
    with TestClient(create_app(config(tmp_path)), client=LOCAL) as c:
        r = c.post("/v1/moderate", files={"image": (p.name, p.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
    mine = [name for name, header in hashed if header == b"RGB:640x427:"]
    assert mine, "the detector hashed the upload's pixels"
    assert not [n for n in mine if n.startswith("icm-batch")], f"hashed in the batch worker: {mine}"


def test_policy_and_rules_per_request(colour_client):
    red = png((250, 5, 5))
    by_rules = {}
    for rules in ("icm-default", "adult-platform"):
        r = colour_client.post("/v1/moderate", files={"image": ("red.png", red, "image/png")}, data={"rules": rules})
        assert r.status_code == 200, r.text
        by_rules[rules] = r.json()["record"]
    # same evidence, same product; the rule sets label it differently
    assert by_rules["icm-default"]["product"] == by_rules["adult-platform"]["product"]
    assert (by_rules["icm-default"]["label"], by_rules["icm-default"]["verdict"]) == ("violate", "block")
    assert (by_rules["adult-platform"]["label"], by_rules["adult-platform"]["verdict"]) == ("allow", "allow")
    r = colour_client.post("/v1/moderate", files={"image": ("red.png", red, "image/png")}, data={"rules": "martian"})
    assert r.status_code == 422 and r.json()["error"] == "unknown_rules" and "children" in r.json()["detail"]
    r = colour_client.post("/v1/moderate", json={"image_base64": base64.b64encode(red).decode(), "policy": "nope"})
    assert r.status_code == 422 and r.json()["error"] == "unknown_policy" and "icm-sexy" in r.json()["detail"]


def test_policies_endpoint_and_extra_policies(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    app = create_app(config(tmp_path, policies=["gambling"]), moderator=Moderator(ColourBackend()))
    with TestClient(app, client=LOCAL) as c:
        data = c.get("/v1/policies").json()
        assert data["default_policy"] == "icm-sexy" and data["default_rules"] == "icm-default"
        names = [p["name"] for p in data["policies"]]
        # the default and --extra-policy first, then the members of the bundles /v1/moderations serves
        # (icm-standard: OpenAI's model names), each a policy clients may name
        assert names[:2] == ["icm-sexy", "gambling"] and len(names) == len(set(names))
        assert set(names) == set(app.state.service.policies)
        sexy = data["policies"][0]
        assert {r["name"] for r in sexy["rule_sets"]} >= {"icm-default", "children", "adult-platform"}
        prods = {p["id"]: p for p in sexy["products"]}
        assert prods["upper_normal"]["labels"]["children"] == "allow"
        assert prods["upper_chest"]["labels"]["children"] == "violate"
        r = c.post("/v1/moderate", json={"image_base64": base64.b64encode(png((0, 0, 200))).decode(), "policy": "gambling"})
        assert r.status_code == 200 and r.json()["record"]["policy"] == "gambling"
        assert r.json()["record"]["rules"] == "gambling-default"


def test_a_batch_asks_the_model_once_per_policy_and_each_rule_set_decides(tmp_path, monkeypatch):
    """Images of one batch naming four rule sets: one backend call, and every record is what a
    Moderator for its own rule set makes (the evidence does not depend on the rule set)."""
    from icm.moderation.images import load_image
    from icm.serve.service import Job
    from icm.serve.store import DecisionMeta

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    backend = ColourBackend()
    app = create_app(config(tmp_path), moderator=Moderator(backend, policy="icm-sexy"))
    svc = app.state.service
    colours = [(255, 0, 0), (150, 90, 90), (0, 0, 255), (200, 60, 60)]
    rule_sets = ["children", "adult-platform", "icm-default", "general-audience"]
    images = [load_image(png(c), name=f"{i}.png") for i, c in enumerate(colours)]
    jobs = [
        Job(image=im, data=b"", policy="icm-sexy", rules=r, meta=DecisionMeta(), load_ms=0.0)
        for im in images for r in rule_sets
    ]
    records = svc.moderate(jobs)
    assert backend.batches == [len(colours)], "one model call, each distinct image asked about once"
    verdicts = set()
    for job, rec in zip(jobs, records, strict=True):
        alone = Moderator(ColourBackend(), policy="icm-sexy", rules=job.rules).moderate_loaded([job.image])[0]
        assert rec.rules == job.rules
        skip = {"timings", "created_at"}
        assert rec.model_dump(exclude=skip) == alone.model_dump(exclude=skip), (job.rules, rec.reason, alone.reason)
        verdicts.add((job.image.source, rec.verdict))
    assert len({v for _, v in verdicts}) >= 2, "the rule sets disagree on some image, so re-deciding is exercised"


def test_redecide_refuses_records_whose_evidence_depends_on_the_rule_set():
    from icm.moderation.images import load_image
    from icm.moderation.record import FrameScore
    from icm.moderation.redecide import NotRedecidable, redecide
    from icm.policy import load_policy

    policy = load_policy("icm-sexy")
    rec = Moderator(ColourBackend(), policy=policy, rules="children").moderate_loaded([load_image(png((255, 0, 0)), name="r.png")])[0]
    multi = rec.model_copy(update={"frame_scores": [FrameScore(frame=0, p_violation=0.9, verdict="block")] * 2})
    with pytest.raises(NotRedecidable):
        redecide(multi, policy, "adult-platform")
    with pytest.raises(NotRedecidable):
        redecide(rec.model_copy(update={"stage": "detector"}), policy, "adult-platform")
    with pytest.raises(ValueError, match="policy"):
        redecide(rec, load_policy("gambling"), None)


# --------------------------------------------------------------------------- bad input and limits


def _truncated() -> bytes:
    data = (EXAMPLES / "china.jpg").read_bytes()
    return data[: len(data) // 3]


BAD_UPLOADS = [
    ("text", b"this is a shopping list, not a photo\n", 415, "not_an_image", "text"),
    ("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", 415, "not_an_image", "PDF"),
    ("truncated", _truncated(), 422, "corrupt_image", "truncated"),
    ("empty", b"", 422, "empty_image", "empty"),
]


@pytest.mark.parametrize("kind,data,status,code,words", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_get_the_right_status_and_a_clear_message(colour_client, kind, data, status, code, words):
    before = colour_client.get("/v1/decisions").json()["total"]
    for r in (
        colour_client.post("/v1/moderate", files={"image": (f"{kind}.jpg", data, "image/jpeg")}),
        colour_client.post("/v1/moderate", json={"image_base64": base64.b64encode(data).decode()}),
    ):
        assert r.status_code == status, r.text
        body = r.json()
        assert body["error"] == code and words.lower() in body["detail"].lower()
    assert colour_client.get("/v1/decisions").json()["total"] == before, "a refused image is no decision"
    assert metric(colour_client.get("/metrics").text, "icm_rejected_images_total", reason=code) == 2


def test_size_and_pixel_limits(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    big = (EXAMPLES / "grace_hopper.jpg").read_bytes()  # 61 kB, 512x600
    cfg = config(tmp_path, max_upload_bytes=50_000, max_pixels=200_000, image_root=str(EXAMPLES))
    with TestClient(create_app(cfg, moderator=Moderator(ColourBackend())), client=LOCAL) as c:
        for r in (
            c.post("/v1/moderate", files={"image": ("g.jpg", big, "image/jpeg")}),
            c.post("/v1/moderate", json={"image_base64": base64.b64encode(big).decode()}),
            c.post("/v1/moderate", json={"path": "grace_hopper.jpg"}),
        ):
            assert r.status_code == 413, r.text
            assert r.json()["error"] == "image_too_large" and "50,000" in r.json()["detail"]
        # a body far over the limit is refused from its Content-Length, before it is read
        r = c.post("/v1/moderate", content=b"x" * 2_000_000, headers={"content-type": "image/jpeg"})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        # small file, too many pixels: refused before decoding
        wide = png((10, 10, 10), size=(1000, 300))
        assert len(wide) < 50_000
        r = c.post("/v1/moderate", files={"image": ("wide.png", wide, "image/png")})
        assert r.status_code == 413 and r.json()["error"] == "too_many_pixels"
        assert "1000x300" in r.json()["detail"] and "megapixels" in r.json()["detail"]
        ok = c.post("/v1/moderate", files={"image": ("ok.png", png((10, 10, 10), size=(400, 400)), "image/png")})
        assert ok.status_code == 200
        assert c.get("/v1/decisions").json()["total"] == 1


def test_malformed_requests(colour_client):
    c = colour_client
    r = c.post("/v1/moderate", files={"file": ("x.jpg", png((1, 2, 3)), "image/png")})
    assert r.status_code == 422 and r.json()["error"] == "missing_image" and "'image'" in r.json()["detail"]
    assert "'file'" in r.json()["detail"]
    r = c.post("/v1/moderate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "bad_json"
    r = c.post("/v1/moderate", json={"image_base64": "%%%not base64%%%"})
    assert r.status_code == 400 and r.json()["error"] == "bad_base64"
    r = c.post("/v1/moderate", json={"image_base64": "aGk=", "path": "flower.jpg"})
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]
    r = c.post("/v1/moderate", json={})
    assert r.status_code == 422
    r = c.post("/v1/moderate", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_content_type"
    # a data: URL prefix is accepted
    url = "data:image/png;base64," + base64.b64encode(png((0, 0, 250))).decode()
    assert c.post("/v1/moderate", json={"image_base64": url}).status_code == 200


def test_server_side_paths_stay_inside_the_image_root(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(png((0, 0, 250)))
    (root / "notes.md").write_text("# not an image\n")
    outside = tmp_path / "secret.png"
    outside.write_bytes(png((250, 0, 0)))
    (root / "link.png").symlink_to(outside)  # a link inside the root that leads out of it
    (root / "inner-link.png").symlink_to(root / "sub" / "ok.png")
    app = create_app(config(tmp_path, image_root=str(root)), moderator=Moderator(ColourBackend()))
    with TestClient(app, client=LOCAL) as c:
        for path, status, code in [
            ("../secret.png", 403, "path_outside_root"),
            ("../../../../../../etc/passwd", 403, "path_outside_root"),
            (str(outside), 403, "path_outside_root"),
            ("sub/../../secret.png", 403, "path_outside_root"),
            ("link.png", 403, "path_outside_root"),
            ("no-such.jpg", 404, "no_such_file"),
            ("sub", 422, "not_a_file"),
            ("notes.md", 415, "not_an_image"),
            ("", 400, "bad_path"),
            ("a\x00b", 400, "bad_path"),
        ]:
            r = c.post("/v1/moderate", json={"path": path})
            assert (r.status_code, r.json()["error"]) == (status, code), (path, r.text)
        for path in ("sub/ok.png", str(root / "sub" / "ok.png"), "sub/../sub/ok.png", "inner-link.png"):
            r = c.post("/v1/moderate", json={"path": path})
            assert r.status_code == 200, (path, r.text)
            assert r.json()["record"]["path"] == "sub/ok.png"
        assert c.get("/v1/decisions").json()["total"] == 4


def test_paths_are_refused_without_an_image_root(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    with TestClient(create_app(config(tmp_path), moderator=Moderator(ColourBackend())), client=LOCAL) as c:
        r = c.post("/v1/moderate", json={"path": "flower.jpg"})
        assert r.status_code == 403 and r.json()["error"] == "paths_disabled" and "--image-root" in r.json()["detail"]


def test_a_backend_failure_is_a_502_and_no_decision(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    app = create_app(config(tmp_path), moderator=Moderator(ColourBackend(fail_green=True)))
    with TestClient(app, client=LOCAL) as c:
        r = c.post("/v1/moderate", files={"image": ("g.png", png((0, 255, 0)), "image/png")})
        assert r.status_code == 502 and r.json()["error"] == "backend_failed" and "server log" in r.json()["detail"]
        assert "green is not allowed" not in r.text  # the backend's own error text stays in the log
        assert c.post("/v1/moderate", files={"image": ("b.png", png((0, 0, 255)), "image/png")}).status_code == 200
        assert c.get("/v1/decisions").json()["total"] == 1
        assert metric(c.get("/metrics").text, "icm_backend_errors_total") == 1


# --------------------------------------------------------------------------- auth


def test_api_keys_from_config_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ICM_API_KEYS", "envkey-1234567890, bob:bobs-key-0123456789")
    cfg = config(tmp_path, api_keys=["alice:alices-key-0123456789"])
    app = create_app(cfg, moderator=Moderator(ColourBackend()))
    img = {"image": ("b.png", png((0, 0, 255)), "image/png")}
    # keys configured: any client, loopback or not, needs one
    with TestClient(app, client=("203.0.113.9", 4000)) as c:
        r = c.post("/v1/moderate", files=img)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in r.json()["detail"]
        r = c.post("/v1/moderate", files=img, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"] == "invalid_api_key"
        assert c.post("/v1/moderate", files=img, headers={"Authorization": "Basic alices-key-0123456789"}).status_code == 401
        for route in ("/v1/policies", "/v1/decisions", "/metrics"):
            assert c.get(route).status_code == 401, route
        assert c.get("/healthz").status_code == 200 and c.get("/healthz").json() == {"status": "ok"}  # details: admin only
        assert c.get("/healthz", headers={"Authorization": "Bearer bobs-key-0123456789"}).json()["auth"] == "api-keys"
        assert c.get("/review").status_code == 200  # the page has no data; its API calls need the key

        ids = []
        for key in ("alices-key-0123456789", "envkey-1234567890", "bobs-key-0123456789"):
            r = c.post("/v1/moderate", files=img, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, (key, r.text)
            ids.append(r.json()["decision_id"])
        h = {"Authorization": "Bearer alices-key-0123456789"}
        clients = [d["client"] for d in c.get("/v1/decisions", headers=h).json()["decisions"]]
        assert clients[0] == "bob" and clients[2] == "alice" and clients[1].startswith("key-")
        # the key's name is who reviewed; another name in the body is refused (issue 20)
        r = c.post(f"/v1/decisions/{ids[0]}/reviews", json={"verdict": "block"}, headers=h)
        assert r.status_code == 201 and r.json()["reviewer"] == "alice" and r.json()["api_key_name"] == "alice"
        r = c.post(f"/v1/decisions/{ids[0]}/reviews", json={"verdict": "allow", "reviewer": "Carol"}, headers=h)
        assert r.status_code == 403 and r.json()["error"] == "reviewer_mismatch"
        r = c.post(f"/v1/decisions/{ids[0]}/reviews", json={"verdict": "allow", "reviewer": "alice"}, headers=h)
        assert r.status_code == 201 and r.json()["reviewer"] == "alice"


def test_without_keys_only_loopback_clients(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    app = create_app(config(tmp_path), moderator=Moderator(ColourBackend()))
    with TestClient(app, client=("203.0.113.9", 4000)) as c:
        r = c.get("/v1/policies")
        assert r.status_code == 403 and r.json()["error"] == "loopback_only" and "ICM_API_KEYS" in r.json()["detail"]
    with TestClient(app, client=LOCAL) as c:
        assert c.get("/v1/policies").status_code == 200
        assert c.get("/v1/policies", headers={"X-Forwarded-For": "198.51.100.7"}).status_code == 403
    app = create_app(config(tmp_path, allow_unauthenticated=True), moderator=Moderator(ColourBackend()))
    with TestClient(app, client=("203.0.113.9", 4000)) as c:
        assert c.get("/v1/policies").status_code == 200


def test_bind_refuses_public_interfaces_without_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    for host in ("127.0.0.1", "::1", "localhost"):
        ServeConfig(host=host).check_bind()
    with pytest.raises(ValueError, match="without API keys"):
        ServeConfig(host="0.0.0.0").check_bind()
    ServeConfig(host="0.0.0.0", api_keys=["k" * 16]).check_bind()
    ServeConfig(host="0.0.0.0", allow_unauthenticated=True).check_bind()
    monkeypatch.setenv("ICM_API_KEYS", "from-env-0123456789")
    ServeConfig(host="0.0.0.0").check_bind()
    monkeypatch.delenv("ICM_API_KEYS")
    r = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--db", str(tmp_path / "x.sqlite")])
    assert r.exit_code == 2 and "refusing to listen on 0.0.0.0" in r.output
    assert not (tmp_path / "x.sqlite").exists(), "refused before anything was opened"


def test_config_file_and_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    f = tmp_path / "serve.yaml"
    f.write_text("port: 9123\nrules: children\nmax_batch_size: 4\napi_keys: ['a:k1-0123456789abcdef']\n")
    cfg = ServeConfig.from_file(f, port=9200)
    assert (cfg.port, cfg.rules, cfg.max_batch_size, cfg.all_api_keys()[0].name) == (9200, "children", 4, "a")
    f.write_text("prot: 1\n")
    with pytest.raises(ValueError, match="prot"):
        ServeConfig.from_file(f)
    with pytest.raises(ValueError, match="needs a model"):
        ServeConfig(backend="hf")
    r = runner.invoke(cli, ["serve", "--config", str(f)])
    assert r.exit_code == 2 and "prot" in r.output


# --------------------------------------------------------------------------- dynamic batching


async def _burst(app, bodies: list[bytes]) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=LOCAL)
        async with httpx.AsyncClient(transport=transport, base_url="http://icm") as client:
            return await asyncio.gather(*[
                client.post("/v1/moderate", files={"image": (f"{i}.png", b, "image/png")}) for i, b in enumerate(bodies)
            ])


def test_dynamic_batching_groups_concurrent_requests_and_routes_each_answer(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    # 24 different images: red ones must come back "block", blue ones "allow", each with its own hash
    colours = [(250 - i, 5, 5) if i % 2 else (5, 5, 250 - i) for i in range(24)]
    bodies = [png(c) for c in colours]
    results = {}
    for batching in (True, False):
        backend = ColourBackend(delay=0.02)
        app = create_app(
            config(tmp_path, db=str(tmp_path / f"b{batching}.sqlite"), batching=batching, max_batch_size=8, max_wait_ms=20),
            moderator=Moderator(backend),
        )
        responses = asyncio.run(_burst(app, bodies))
        assert [r.status_code for r in responses] == [200] * 24
        for body, colour, r in zip(bodies, colours, responses, strict=True):
            rec = r.json()["record"]
            assert rec["sha256"] == hashlib.sha256(body).hexdigest()
            assert rec["verdict"] == ("block" if colour[0] > 200 else "allow")
        assert len({r.json()["decision_id"] for r in responses}) == 24
        assert sum(backend.batches) == 24 + 1  # and the warm-up image, judged alone at start (/readyz)
        results[batching] = backend.batches
    assert max(results[True]) > 1 and len(results[True]) < 24 and max(results[True]) <= 8
    assert results[False] == [1] * 25


def test_batcher_groups_within_the_window_propagates_errors_and_drains_on_stop():
    from icm.serve.batching import BatcherClosed, DynamicBatcher

    seen: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        seen.append(list(items))
        time.sleep(0.05)
        if -1 in items:
            raise ValueError("bad item")
        return [x * 10 for x in items]

    async def scenario() -> None:
        b = DynamicBatcher(process, max_batch_size=4, max_wait_ms=50)
        await b.start()
        first = await asyncio.gather(*(b.submit(i) for i in range(6)))
        assert first == [0, 10, 20, 30, 40, 50]
        assert [len(x) for x in seen] == [4, 2], seen  # full batch, then the rest within the window
        results = await asyncio.gather(b.submit(7), b.submit(-1), return_exceptions=True)
        assert isinstance(results[0], ValueError) and isinstance(results[1], ValueError), "a batch's error reaches all"
        alone = time.perf_counter()
        assert await b.submit(3) == 30
        assert time.perf_counter() - alone < 0.5  # a lone request waits at most the window
        queued = [asyncio.ensure_future(b.submit(i)) for i in (8, 9)]
        await asyncio.sleep(0)
        await b.stop()  # finishes what was queued, then refuses
        assert [q.result() for q in queued] == [80, 90]
        with pytest.raises(BatcherClosed):
            await b.submit(1)

    asyncio.run(scenario())


def test_a_full_queue_answers_503(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    app = create_app(
        config(tmp_path, batching=False, max_queue=1), moderator=Moderator(ColourBackend(delay=0.3))
    )
    responses = asyncio.run(_burst(app, [png((0, 0, 200 + i)) for i in range(6)]))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(503) >= 2 and set(codes) <= {200, 503}, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"] == "overloaded"


# --------------------------------------------------------------------------- operations


def test_metrics_healthz_and_openapi(colour_client):
    c = colour_client
    for i in range(3):
        assert c.post("/v1/moderate", files={"image": ("b.png", png((0, 0, 200 + i)), "image/png")}).status_code == 200
    c.post("/v1/moderate", files={"image": ("t.png", b"not an image", "image/png")})
    text = c.get("/metrics").text
    for line in text.splitlines():
        assert line.startswith("# ") or re.match(r'^[a-z_]+(\{[^}]*\})? -?[0-9.e+Inf]+$', line), line
    assert metric(text, "icm_decisions_total", verdict="allow") == 3
    assert metric(text, "icm_http_requests_total", route="/v1/moderate", status="200") == 3
    assert metric(text, "icm_http_requests_total", route="/v1/moderate", status="415") == 1
    assert metric(text, "icm_batch_size_count") == 3
    assert metric(text, "icm_build_info", version=icm.__version__, backend="colour") == 1

    h = c.get("/healthz").json()
    assert h["status"] == "ok" and h["database"] == "ok" and h["backend"] == "colour"

    spec = c.get("/openapi.json").json()
    body = spec["paths"]["/v1/moderate"]["post"]["requestBody"]["content"]
    assert "image" in body["multipart/form-data"]["schema"]["properties"]
    assert {"image_base64", "path"} <= set(body["application/json"]["schema"]["properties"])
    assert {"401", "413", "415", "422"} <= set(spec["paths"]["/v1/moderate"]["post"]["responses"])
    for route in ("/v1/policies", "/v1/decisions/{decision_id}/reviews", "/healthz", "/metrics"):
        assert route in spec["paths"]
    assert c.get("/docs").status_code == 200


# --------------------------------------------------------------------------- reviews, store and export


def test_reviews_confirm_override_and_validation(colour_client):
    c = colour_client
    red = c.post("/v1/moderate", files={"image": ("red.png", png((250, 0, 0)), "image/png")}).json()
    blue = c.post("/v1/moderate", files={"image": ("blue.png", png((0, 0, 250)), "image/png")}).json()
    assert red["record"]["verdict"] == "block" and blue["record"]["verdict"] == "allow"
    rid, bid = red["decision_id"], blue["decision_id"]

    r = c.post(f"/v1/decisions/{rid}/reviews", json={"verdict": "block", "reviewer": "ann"})
    assert r.status_code == 201 and r.json()["action"] == "confirm"
    r = c.post(f"/v1/decisions/{bid}/reviews", json={"verdict": "block", "reviewer": "ann", "product": "upper_chest", "note": "low neckline"})
    assert r.status_code == 201 and r.json()["action"] == "override" and r.json()["product"] == "upper_chest"
    # the same verdict with another product is an override too
    r = c.post(f"/v1/decisions/{rid}/reviews", json={"verdict": "block", "reviewer": "ben", "product": "upper_back"})
    assert r.json()["action"] == "override"

    assert c.post(f"/v1/decisions/{bid}/reviews", json={"verdict": "review", "reviewer": "x"}).status_code == 422
    r = c.post(f"/v1/decisions/{bid}/reviews", json={"verdict": "allow", "reviewer": "x", "product": "unicorn"})
    assert r.status_code == 422 and r.json()["error"] == "unknown_product"
    r = c.post(f"/v1/decisions/{bid}/reviews", json={"verdict": "allow"})
    assert r.status_code == 422 and r.json()["error"] == "missing_reviewer"
    assert c.post("/v1/decisions/999/reviews", json={"verdict": "allow", "reviewer": "x"}).status_code == 404
    assert c.get("/v1/decisions/999").status_code == 404

    d = c.get(f"/v1/decisions/{rid}").json()
    assert [(x["reviewer"], x["action"]) for x in d["reviews"]] == [("ann", "confirm"), ("ben", "override")]
    listed = {x["id"]: x for x in c.get("/v1/decisions").json()["decisions"]}
    assert listed[rid]["review"]["reviewer"] == "ben"  # the latest review
    c.post("/v1/moderate", files={"image": ("g.png", png((0, 0, 240)), "image/png")})
    assert [x["id"] for x in c.get("/v1/decisions?reviewed=false").json()["decisions"]] == [bid + 1]
    assert [x["id"] for x in c.get("/v1/decisions?verdict=block").json()["decisions"]] == [rid]
    assert [x["id"] for x in c.get(f"/v1/decisions?limit=1&before_id={bid + 1}").json()["decisions"]] == [bid]


def test_store_migrations_and_durability_settings(tmp_path):
    db = tmp_path / "s.sqlite"
    url = "sqlite:///" + str(db)
    s = DecisionStore(url)
    assert s.applied == ["0001", "0002", "0003", "0004"] and s.schema_version() == "0004"
    s.close()
    s = DecisionStore(url)
    assert s.applied == [], "migrations run once"
    s.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"icm_decisions", "icm_reviews", "icm_claims", "icm_webhook_outbox", "icm_idempotency", "alembic_version"} <= tables
    con.execute("UPDATE alembic_version SET version_num = '9999'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer icm"):
        DecisionStore(url)


def _legacy_v1_database(url: str) -> None:
    """A database as the numbered migrations of the previous release left it (schema version 1,
    its tables frozen here as that release defined them), with a decision of each verdict and a review."""
    import sqlalchemy as sa

    md = sa.MetaData()
    decisions = sa.Table(
        "icm_decisions", md,
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
        "icm_reviews", md,
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
    migrations = sa.Table(
        "icm_schema_migrations", md,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("applied_at", sa.String(40), nullable=False),
    )
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        md.create_all(conn)
        conn.execute(sa.insert(migrations).values(version=1, name="decisions and reviews", applied_at="2026-01-01T00:00:00"))
        for i, verdict in enumerate(("allow", "review", "block"), 1):
            conn.execute(sa.insert(decisions).values(
                id=i, created_at=f"2026-01-0{i}T00:00:00", policy="icm-sexy", rules="icm-default", backend="colour",
                verdict=verdict, image_kept=False, record=json.dumps({"verdict": verdict}),
            ))
        conn.execute(sa.insert(reviews).values(
            decision_id=3, created_at="2026-01-04T00:00:00", reviewer="ann", action="override", verdict="allow",
        ))
    engine.dispose()


def _drop_icm_tables(url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table in ("icm_idempotency", "icm_webhook_outbox", "icm_claims", "icm_reviews", "icm_decisions", "icm_schema_migrations", "alembic_version"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


def _store_urls(tmp_path: Path) -> list[str]:
    urls = ["sqlite:///" + str(tmp_path / "legacy.sqlite")]
    if os.environ.get("ICM_TEST_POSTGRES_URL"):
        urls.append(os.environ["ICM_TEST_POSTGRES_URL"])
    return urls


def test_a_database_of_the_numbered_migrations_upgrades_to_the_alembic_revisions(tmp_path):
    """SQLite always, PostgreSQL too when ICM_TEST_POSTGRES_URL is set: the old schema is taken
    over at revision 0001, upgraded, its decisions and reviews kept, and the new features work on it."""
    for url in _store_urls(tmp_path):
        _drop_icm_tables(url)
        _legacy_v1_database(url)
        s = DecisionStore(url)
        try:
            assert s.applied == ["0002", "0003", "0004"], url
            assert s.schema_version() == "0004"
            assert [d["verdict"] for d in s.list_decisions()] == ["block", "review", "allow"]
            assert s.get_decision(3)["reviews"][0]["reviewer"] == "ann"
            # the model's review verdict awaits a person after the upgrade; new decisions are stored
            assert [d["id"] for d in s.queue()] == [2]
            assert s.claim_next("bob")["id"] == 2
        finally:
            s.close()
        assert DecisionStore(url).applied == [], "upgraded once"
        _drop_icm_tables(url)


def _review_some(c) -> dict[str, int]:
    ids = {}
    for name, colour in (("red", (250, 0, 0)), ("blue", (0, 0, 250)), ("navy", (0, 0, 120))):
        ids[name] = c.post("/v1/moderate", files={"image": (f"{name}.png", png(colour), "image/png")}).json()["decision_id"]
    assert c.post(f"/v1/decisions/{ids['red']}/reviews", json={"verdict": "block", "reviewer": "ann"}).json()["action"] == "confirm"
    r = c.post(
        f"/v1/decisions/{ids['blue']}/reviews",
        json={"verdict": "block", "reviewer": "ann", "product": "upper_chest", "note": "The neckline shows cleavage."},
    )
    assert r.json()["action"] == "override"
    return ids


def test_export_reviews_as_training_records(colour_client, tmp_path):
    ids = _review_some(colour_client)
    db = str(tmp_path / "decisions.sqlite")
    out = tmp_path / "train.jsonl"
    r = runner.invoke(cli, ["data", "export-reviews", "--db", db, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "2 training records (1 overrides, 1 confirmations)" in r.output.replace("\n", " ")
    recs = {x["decision_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {ids["red"], ids["blue"]}, "the unreviewed decision is not exported"

    over = recs[ids["blue"]]
    assert over["action"] == "override" and over["verdict"] == "block" and over["model_verdict"] == "allow"
    assert over["product"] == "upper_chest" and over["positive"] is True and over["reviewer"] == "ann"
    assert Path(over["images"][0]).read_bytes() == png((0, 0, 250))
    msgs = over["messages"]
    assert msgs[0]["content"][0] == {"type": "image"} and all(m["content"][0]["type"] == "text" for m in msgs[1:])
    qa = [(msgs[i]["content"][-1]["text"], msgs[i + 1]["content"][0]["text"]) for i in range(0, len(msgs), 2)]
    assert qa[0] == ("Is the image sexy?\nAnswer with Yes or No.", "Yes")
    # upper_chest = region "upper" (option B of 4) and exposure "chest" (option C of 9): labels skip A, I, O
    assert qa[1][0].startswith("Which part of the body does the image mainly show?\nB. ") and qa[1][1] == "B"
    assert qa[2][0].startswith("What does the person's clothing leave exposed?\nB. ") and qa[2][1] == "C"
    assert qa[3][1] == "The neckline shows cleavage."
    assert qa[-1][0].startswith("Under the rule set 'icm-default'") and qa[-1][1] == "block"

    conf = recs[ids["red"]]
    assert conf["action"] == "confirm" and conf["product"] == conf["model_product"] is not None
    assert conf["explanation"] == "The image is mostly red."  # the model's own, confirmed

    only = tmp_path / "over.jsonl"
    s = export_reviews(db, only, overrides_only=True)
    assert s.written == 1 and [json.loads(x)["decision_id"] for x in only.read_text().splitlines()] == [ids["blue"]]


def test_export_skips_reviews_whose_image_was_not_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    cfg = config(tmp_path, keep_images=False)
    with TestClient(create_app(cfg, moderator=Moderator(ColourBackend())), client=LOCAL) as c:
        ids = _review_some(c)
        d = c.get(f"/v1/decisions/{ids['blue']}").json()
        assert d["image_url"] is None and not d["image_kept"]
    s = export_reviews(cfg.db, tmp_path / "t.jsonl")
    assert (s.written, s.skipped_no_image) == (0, 2)


def test_postgresql_replaces_sqlite_by_a_url(tmp_path, monkeypatch):
    """Runs when ICM_TEST_POSTGRES_URL names a disposable PostgreSQL database (its icm tables are dropped)."""
    url = os.environ.get("ICM_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set ICM_TEST_POSTGRES_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/icm_test) to test PostgreSQL")
    _drop_icm_tables(url)
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    cfg = config(tmp_path, db=url, image_dir=str(tmp_path / "images"))
    with TestClient(create_app(cfg, moderator=Moderator(ColourBackend(), explain=True)), client=LOCAL) as c:
        ids = _review_some(c)
        assert c.get("/healthz").json()["database"] == "ok"
        assert c.get("/v1/decisions").json()["total"] == 3
        assert [r["reviewer"] for r in c.get(f"/v1/decisions/{ids['blue']}").json()["reviews"]] == ["ann"]
    assert DecisionStore(url).applied == []
    s = export_reviews(url, tmp_path / "t.jsonl", image_dir=tmp_path / "images")
    assert (s.written, s.overrides, s.confirmations) == (2, 1, 1)
