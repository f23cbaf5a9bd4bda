"""/docs and /redoc work offline (no URL but the server's own), and CORS for browser clients.

In-process with FastAPI's TestClient, on the detector-free SizeBackend of
test_serve_security; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from icm.cli.main import app as cli
from icm.moderation.backends.base import Backend, YesNoScore
from icm.moderation.engine import Moderator
from icm.serve import ServeConfig, create_app

LOCAL = ("127.0.0.1", 50124)
BASE = "http://127.0.0.1:8000"
KEY = "ops-key-0123456789abcdef"
URL = re.compile(r"""(?:https?:)?//[^\s"'<>)]+""")
# src=, href= and url: values in the page, and the string arguments its script passes on
ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']|\burl:\s*['"]([^'"]+)['"]""")


class LowBackend(Backend):
    name = "low"
    capabilities = frozenset({"score_yes_no"})

    def score_yes_no(self, images, questions):
        return [YesNoScore(p_yes=0.1, source="low") for _ in images]


def client_for(tmp_path: Path, **kw: Any) -> TestClient:
    kw.setdefault("db", str(tmp_path / "decisions.sqlite"))
    app = create_app(ServeConfig(**kw), moderator=Moderator(LowBackend(), policy="icm-sexy"))
    return TestClient(app, base_url=BASE, client=LOCAL)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_doc_pages_name_no_external_url_and_their_assets_answer(tmp_path, page):
    with client_for(tmp_path) as c:
        r = c.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        html = r.text
        external = [u for u in URL.findall(html) if not u.startswith(("http://127.0.0.1:8000/", "//127.0.0.1:8000/"))]
        assert not external, f"{page} names URLs outside this server: {external}"
        assert "validator.swagger.io" not in html and "fonts.googleapis" not in html
        assets = {a or b for a, b in ASSET.findall(html)}
        scripts = {a for a in assets if a.endswith(".js")}
        assert scripts, f"{page} loads no script: {html[:400]}"
        assert any(a.endswith(("favicon.png", ".ico")) for a in assets), f"{page} has no favicon of its own"
        assert "/openapi.json" in assets or "/openapi.json" in html
        for asset in assets:
            assert asset.startswith("/"), f"{page}: {asset} is not a path on this server"
            got = c.get(asset)
            assert got.status_code == 200, f"{page}: {asset} answered {got.status_code}"
            assert len(got.content) > 100, f"{page}: {asset} is empty"
        for script in scripts:  # the real Swagger UI / ReDoc bundles, not placeholders
            assert len(c.get(script).content) > 500_000


def test_doc_pages_follow_the_root_path_behind_a_proxy(tmp_path):
    kw = {"db": str(tmp_path / "decisions.sqlite")}
    app = create_app(ServeConfig(**kw), moderator=Moderator(LowBackend(), policy="icm-sexy"))
    with TestClient(app, base_url=BASE, client=LOCAL, root_path="/icm") as c:
        html = c.get("/docs").text
        assert "/icm/docs-assets/swagger-ui-bundle.js" in html and "/icm/openapi.json" in html


def test_cors_origins_let_those_pages_call_the_api_with_a_key_and_no_others(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    good, other = "https://app.example.com", "https://evil.example.net"
    # by default no page of another site may read an answer: no CORS header at all
    with client_for(tmp_path, api_keys=[f"ops:{KEY}:admin"]) as c:
        r = c.get("/v1/policies", headers={"Origin": good, "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        pre = c.options("/v1/moderate", headers={"Origin": good, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    with client_for(tmp_path, cors_origins=[good + "/"], api_keys=[f"ops:{KEY}:admin"]) as c:
        # the browser's preflight carries no key: it is answered before authentication
        pre = c.options("/v1/moderate", headers={
            "Origin": good, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type",
        })
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == good
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in pre.headers
        r = c.get("/v1/whoami", headers={"Origin": good, "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["name"] == "ops"
        assert r.headers["access-control-allow-origin"] == good
        # an error answer carries the header too, so the page can read why
        assert c.get("/v1/whoami", headers={"Origin": good}).headers.get("access-control-allow-origin") == good
        # another site's page gets nothing to read
        assert "access-control-allow-origin" not in c.get("/v1/policies", headers={"Origin": other, "Authorization": f"Bearer {KEY}"}).headers
        bad = c.options("/v1/moderate", headers={"Origin": other, "Access-Control-Request-Method": "POST"})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers


def test_without_keys_a_listed_origin_is_still_refused(tmp_path, monkeypatch, caplog):
    """Without keys the server trusts its network, never a browser page of another site: CORS needs keys."""
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    with caplog.at_level("WARNING", logger="icm.serve"), client_for(tmp_path, cors_origins=["https://app.example.com"]) as c:
        r = c.get("/v1/policies", headers={"Origin": "https://app.example.com"})
        assert r.status_code == 403 and r.json()["error"] == "cross_site_request"
    assert any("cors" in m.lower() and "api key" in m.lower() for m in caplog.messages), caplog.messages


def test_cors_origin_must_be_an_origin():
    with pytest.raises(ValidationError, match="not an origin"):
        ServeConfig(cors_origins=["https://app.example.com/path"])
    with pytest.raises(ValidationError, match="not an origin"):
        ServeConfig(cors_origins=["app.example.com"])
    assert ServeConfig(cors_origins=["*", "http://localhost:3000/"]).cors_origins == ["*", "http://localhost:3000"]


def test_cors_origin_flag_is_repeatable(tmp_path, monkeypatch):
    seen: list[ServeConfig] = []
    monkeypatch.setattr("icm.serve.app.serve", seen.append)
    r = CliRunner().invoke(cli, [
        "serve", "--db", str(tmp_path / "x.sqlite"), "--cors-origin", "https://a.example.com", "--cors-origin", "http://localhost:5173",
    ])
    assert r.exit_code == 0, r.output
    assert seen[0].cors_origins == ["https://a.example.com", "http://localhost:5173"]
    r = CliRunner().invoke(cli, ["serve", "--db", str(tmp_path / "x.sqlite"), "--cors-origin", "ftp://x"])
    assert r.exit_code == 2 and "not an origin" in r.output
