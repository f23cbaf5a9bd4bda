"""The smaller holes of issue 20 (item 6), each replayed: image-URL address checks, bodies that
are not UTF-8, throttled wrong keys, short webhook secrets in a config file, fetch errors as a
port scanner, `icm policy validate` against what `icm moderate` refuses, and --workers with a
settings error."""

from __future__ import annotations

import asyncio
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from icm.cli.main import app as cli
from icm.moderation.engine import Moderator
from icm.serve import ServeConfig, create_app
from icm.serve.errors import APIError
from icm.serve.fetch import FetchPolicy, ImageFetcher, public_address

from serve_helpers import ColourBackend, png

runner = CliRunner()
KEY = "alice-key-0123456789abcdef"
BAD = "Bearer wrong-key-0123456789abcdef"


def test_6to4_teredo_nat64_and_site_local_addresses_are_not_public() -> None:
    for ip in ("2002:7f00:1::", "2002:a00:1::1", "fec0::1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
               "2001:0:4136:e378:8000:63bf:80ff:fffe"):  # Teredo to 127.0.0.1 (its client address is stored inverted)
        assert not public_address(ip), ip
    assert public_address("2002:5db8:d822::1") and public_address("64:ff9b::5db8:d822")  # 93.184.216.34 inside


def test_a_body_that_is_not_utf8_on_the_review_routes_is_a_422(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    app = create_app(ServeConfig(db=str(tmp_path / "d.sqlite")), moderator=Moderator(ColourBackend()))
    with TestClient(app, client=("127.0.0.1", 5000), base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        assert c.post("/v1/moderate", files={"image": ("a.png", png((200, 0, 0)), "image/png")}).status_code == 200
        for path in ("/v1/decisions/1/reviews", "/v1/review-queue/claim", "/v1/decisions/1/claim"):
            r = c.post(path, content=b'{"verdict": "allow", "note": "caf\xe9 \xff"}', headers={"Content-Type": "text/plain"})
            assert r.status_code == 422 and r.json()["error"] == "invalid_request", (path, r.text)
            assert "\\xff" not in r.text and "caf" not in r.text  # the input is not echoed


def test_wrong_keys_are_throttled_per_client_address(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    cfg = ServeConfig(db=str(tmp_path / "d.sqlite"), api_keys=[KEY], auth_failures_per_minute=3,
                      trusted_proxies=["10.0.0.0/8"])
    app = create_app(cfg, moderator=Moderator(ColourBackend()))
    good = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app, client=("203.0.113.9", 4000)) as guesser:
        assert [guesser.get("/v1/decisions", headers={"Authorization": BAD}).status_code for _ in range(3)] == [401] * 3
        r = guesser.get("/v1/decisions", headers={"Authorization": BAD})
        assert r.status_code == 429 and r.json()["error"] == "too_many_failed_authentications" and int(r.headers["retry-after"]) > 0
        assert guesser.get("/v1/decisions", headers=good).status_code == 429  # even the right key, until the minute ends
        # a forged X-Forwarded-For from a peer that is no trusted proxy changes nothing
        spoofed = {**good, "X-Forwarded-For": "198.51.100.1"}
        assert guesser.get("/v1/decisions", headers=spoofed).status_code == 429
    with TestClient(app, client=("203.0.113.10", 4000)) as other:
        assert other.get("/v1/decisions", headers=good).status_code == 200  # another address is not affected
    with TestClient(app, client=("10.1.2.3", 4000)) as proxy:  # a trusted proxy: the client is the one it names
        fwd = {"Authorization": BAD, "X-Forwarded-For": "198.51.100.7, 10.9.9.9"}
        assert [proxy.get("/v1/decisions", headers=fwd).status_code for _ in range(4)] == [401, 401, 401, 429]
        ok = {**good, "X-Forwarded-For": "198.51.100.8"}
        assert proxy.get("/v1/decisions", headers=ok).status_code == 200  # the proxy's other clients go on


def test_a_config_file_refuses_a_short_webhook_secret(tmp_path: Path) -> None:
    (tmp_path / "serve.yaml").write_text("webhook_url: http://127.0.0.1:9/hook\nwebhook_secret: x\n")
    with pytest.raises(ValueError, match="webhook_secret is shorter than 16"):
        ServeConfig.from_file(tmp_path / "serve.yaml")
    (tmp_path / "serve.yaml").write_text("webhook_url: http://127.0.0.1:9/hook\nwebhook_secret: 0123456789abcdef\n")
    assert ServeConfig.from_file(tmp_path / "serve.yaml").webhook_secret is not None


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_fetch_errors_do_not_tell_an_open_port_from_a_closed_one() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    fetcher = ImageFetcher(FetchPolicy(hosts=["h.test"], max_bytes=1000, timeout_s=5, private_networks=True),
                           resolver=lambda host, port: ["127.0.0.1"])
    details = []
    try:
        for port in (server.server_address[1], closed):
            with pytest.raises(APIError) as err:
                asyncio.run(fetcher.fetch(f"http://h.test:{port}/x.png"))
            details.append((err.value.status, err.value.code, err.value.detail))
    finally:
        server.shutdown()
        server.server_close()
    assert details[0] == details[1] == (502, "image_fetch_failed", "could not fetch the image from 'h.test'")


def test_policy_validate_refuses_what_moderate_refuses(tmp_path: Path) -> None:
    values = "\n".join(f"      - {{id: v{i}, description: Value {i}}}" for i in range(3000))
    (tmp_path / "big.yaml").write_text(f"""name: big
term: {{id: bad, question: "Is the image bad?"}}
attributes:
  - id: colour
    question: Which colour dominates?
    values:
{values}
products:
  - {{id: p0, assignment: {{colour: v0}}, description: V0.}}
rule_sets:
  - name: strict
    audience: everyone
    default: allow
    rules:
      - {{products: [p0], label: violate}}
""")
    result = runner.invoke(cli, ["policy", "validate", str(tmp_path / "big.yaml")])
    assert result.exit_code != 0
    # the first value beyond the 23 a question can offer: line 7 + 23
    assert f"{tmp_path / 'big.yaml'}:30: error: attribute 'colour' has 3,000 values" in result.output.replace("\n", "")


def test_workers_with_a_settings_error_stop_and_free_the_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "icm.cli.main", "serve", "--workers", "2", "--port", str(port),
           "--policy", str(tmp_path / "no-such-policy.yaml"), "--db", str(tmp_path / "d.sqlite")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: supervisor and workers
        proc.communicate()
        pytest.fail("icm serve --workers kept respawning workers that cannot start")
    assert proc.returncode == 2 and "no-such-policy.yaml" in out and "could not start" in out, out
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the port is free again
