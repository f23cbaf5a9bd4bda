"""Kill the real server (SIGKILL) while it is answering; no acknowledged decision is lost."""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sqlalchemy")
import httpx

KEY = "restart-test-key"
NAME = "night-shift"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(db: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "ICM_API_KEYS": f"{NAME}:{KEY}", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "icm.cli.main", "serve", "--port", str(port), "--db", str(db),
        "--log-level", "warning", "--max-wait-ms", "2",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not come up:\n{log.read_text()}")


def _image(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(buf, format="PNG")
    return buf.getvalue()


def test_sigkill_loses_no_acknowledged_decision(tmp_path):
    db = tmp_path / "decisions.sqlite"
    log = tmp_path / "server.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(db, port, log)

    acked: list[tuple[int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**6))

    def client() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
            while not stop.is_set():
                with lock:
                    i = next(counter)
                try:
                    r = c.post("/v1/moderate", files={"image": (f"{i}.png", _image(i), "image/png")})
                except httpx.HTTPError:
                    return  # the server is gone
                assert r.status_code == 200, r.text
                with lock:
                    acked.append((r.json()["decision_id"], r.json()["record"]["sha256"]))

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 25 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=15)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with lock:
        acknowledged = dict(acked)
    assert len(acknowledged) >= 25, f"only {len(acknowledged)} answers before the kill:\n{log.read_text()}"

    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()

    proc = _start(db, port, log)
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
            stored = {d["id"]: d for d in c.get("/v1/decisions", params={"limit": 500}).json()["decisions"]}
            missing = {i: sha for i, sha in acknowledged.items() if i not in stored}
            assert not missing, f"{len(missing)} acknowledged decisions lost: {sorted(missing)}"
            for i, sha in acknowledged.items():
                assert stored[i]["image_sha256"] == sha and stored[i]["verdict"] in ("allow", "review", "block")
            # the restarted server goes on: new ids after the old ones, reviews work
            r = c.post("/v1/moderate", files={"image": ("new.png", _image(999_999), "image/png")})
            assert r.status_code == 200 and r.json()["decision_id"] > max(stored)
            first = min(acknowledged)
            r = c.post(f"/v1/decisions/{first}/reviews", json={"verdict": "block"})
            assert r.status_code == 201
            d = c.get(f"/v1/decisions/{first}").json()
            assert d["reviews"][0]["reviewer"] == r.json()["reviewer"] == NAME  # the key's name (issue 20)
            assert c.get(d["image_url"]).status_code == 200, "the kept image survived the kill"
        proc.send_signal(signal.SIGTERM)  # a graceful stop (uvicorn re-raises the signal when done)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
        # the store was closed: SQLite folded its write-ahead log back into the file
        assert not Path(str(db) + "-wal").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
