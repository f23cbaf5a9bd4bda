"""Secrets never reach clients (issue 20, item 4): credentials in a base URL, the upstream's
own error text, policy paths with environment variables, and `/healthz`'s details."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient

from icm.moderation.backends.detector import DetectorBackend
from icm.moderation.engine import Moderator
from icm.policy.loader import load_policy
from icm.serve import ServeConfig, create_app

from fake_openai import MODEL, Reply, fake_openai_server, vllm_error
from serve_helpers import png

KEY = "ops-key-0123456789abcdef"
UPSTREAM_TEXT = "internal shard db7 at postgres://admin:hunter2@10.0.0.5 is down"


def test_redact_url_and_text_hide_every_userinfo() -> None:
    from icm.redact import redact_text, redact_url

    assert redact_url("http://user:pw@host:8000/v1") == "http://***@host:8000/v1"
    assert redact_url("https://host/v1") == "https://host/v1"
    assert redact_text("HTTP 500 from http://u:p@h/v1/chat/completions: x") == "HTTP 500 from http://***@h/v1/chat/completions: x"
    assert redact_text("see http://host/a@b") == "see http://host/a@b"  # an @ in a path is no userinfo


def test_base_url_credentials_and_upstream_text_stay_out_of_healthz_and_502(tmp_path: Path, caplog) -> None:
    with fake_openai_server() as (fake, url):
        fake.default = Reply(status=500, json=vllm_error(500, UPSTREAM_TEXT))
        base = url.replace("http://", "http://probe-user:probe-pass-123@")
        config = ServeConfig(
            backend="openai", model=MODEL, base_url=base, max_retries=0, api_keys=[KEY],
            db=str(tmp_path / "d.sqlite"), keep_images=False,
        )
        with TestClient(create_app(config), base_url="http://evil.example") as client:
            anon = client.get("/healthz")  # no key, any Host: ok or not, nothing more
            assert anon.status_code == 200 and anon.json() == {"status": "ok"}
            wrong = client.get("/healthz", headers={"Authorization": "Bearer not-the-key-at-all-000"})
            assert wrong.json() == {"status": "ok"}
            admin = client.get("/healthz", headers={"Authorization": f"Bearer {KEY}"}).json()
            assert admin["backend"] == "openai" and "***@" in admin["model"] and "probe-pass" not in json.dumps(admin)
            with caplog.at_level(logging.WARNING, logger="icm.serve"):
                r = client.post("/v1/moderate", files={"image": ("a.png", png((200, 0, 0)), "image/png")},
                                headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 502 and r.json()["error"] == "backend_failed"
            assert "hunter2" not in r.text and "probe-pass" not in r.text and "shard" not in r.text
            ref = r.json()["detail"].split("error ")[1].split(";")[0]
            logged = [rec.getMessage() for rec in caplog.records if ref in rec.getMessage()]
            assert logged and "internal shard db7" in logged[0] and "probe-pass" not in logged[0]  # the operator has it


def test_policy_path_environment_values_never_reach_records(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    monkeypatch.setenv("ICM_API_KEYS", "bob:bob-secret-key-0123456789")
    text = f"""name: red-things
term: {{id: red, question: "Is the image red?"}}
attributes:
  - id: colour
    question: Which colour?
    values:
      - {{id: red, description: Red}}
      - {{id: blue, description: Blue}}
products:
  - {{id: red, assignment: {{colour: red}}, description: Red.}}
  - {{id: blue, assignment: {{colour: blue}}, description: Blue.}}
rule_sets:
  - name: default
    audience: everyone
    rules:
      - {{products: [red], label: violate}}
      - {{products: [blue], label: allow}}
evidence:
  sources:
    colours:
      path: {tmp_path}/models/${{ICM_API_KEYS}}.onnx
      input_size: [16, 16]
      labels: [red_thing, blue_thing]
  term:
    from:
      - {{source: colours, labels: [red_thing]}}
"""
    (tmp_path / "p.yaml").write_text(text)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "r.png")
    mod = Moderator(DetectorBackend(sources=["colours"]), policy=load_policy(tmp_path / "p.yaml"))
    (r,) = mod.moderate_paths([str(tmp_path / "r.png")])
    dumped = r.model_dump_json()
    assert "does not exist" in dumped and "${ICM_API_KEYS}" in dumped  # the path as the policy wrote it
    assert "bob-secret" not in dumped
