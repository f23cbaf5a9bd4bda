"""Several `icm serve` replicas on one PostgreSQL decision store; one is SIGKILLed mid-stream.

Runs when ICM_TEST_POSTGRES_URL names a disposable PostgreSQL database (CI starts one); the
test works in a schema of its own there and drops it at the end.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg")
import httpx

from serve_helpers import postgres_schema


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (i % 251, (i * 7) % 253, (i * 13) % 255)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pg_url():
    """ICM_TEST_POSTGRES_URL with a fresh schema on the search path (dropped afterwards)."""
    with postgres_schema(f"icm_replicas_{os.getpid()}") as url:
        yield url


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ICM_API_KEYS", None)
    cmd = [sys.executable, "-m", "icm.cli.main", "serve", "--log-level", "warning", "--max-wait-ms", "2", "--no-keep-images", *args]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            if r.status_code == 200 and r.json()["database"] == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server on {port} did not come up:\n{log.read_text()}")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def test_two_replicas_share_postgres_and_a_killed_one_loses_no_acknowledged_decision(pg_url, tmp_path):
    port_a, port_b = _free_port(), _free_port()
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    # started together: both migrate the empty schema at once (an advisory lock orders them)
    a = _start(["--port", str(port_a), "--db", pg_url, "--workers", "2"], log_a)
    b = _start(["--port", str(port_b), "--db", pg_url], log_b)
    acked: list[tuple[int, str, str]] = []  # decision id, sha256, replica
    lock = threading.Lock()
    stop = threading.Event()
    b_dead = threading.Event()
    counter = iter(range(10**6))
    try:
        _wait_healthy(a, port_a, log_a)
        _wait_healthy(b, port_b, log_b)
        workers = [p for p in _children(a.pid) if Path(f"/proc/{p}/cmdline").read_bytes().find(b"spawn_main") >= 0]
        assert len(workers) == 2, f"--workers 2 started {len(workers)} worker processes"

        def client(port: int, name: str) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
                while not stop.is_set():
                    with lock:
                        i = next(counter)
                    try:
                        r = c.post("/v1/moderate", files={"image": (f"{i}.png", _image(i), "image/png")})
                    except httpx.HTTPError:
                        if name == "b" and b_dead.is_set():
                            return  # the killed replica: the request was never acknowledged
                        raise
                    assert r.status_code == 200, r.text
                    with lock:
                        acked.append((r.json()["decision_id"], r.json()["record"]["sha256"], name))

        threads = [threading.Thread(target=client, args=(port, name)) for port, name in [(port_a, "a"), (port_b, "b")] * 3]
        errors: list[BaseException] = []
        for t in threads:
            t.run = (lambda f: (lambda: _catch(f, errors)))(t.run)  # type: ignore[method-assign]
            t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with lock:
                by = Counter(r for _, _, r in acked)
            if by["a"] >= 20 and by["b"] >= 20:
                break
            time.sleep(0.02)
        b_dead.set()
        b.send_signal(signal.SIGKILL)  # requests to b are in flight
        b.wait(timeout=10)
        with lock:
            at_kill = Counter(r for _, _, r in acked)
        while time.monotonic() < deadline:  # the surviving replica goes on
            with lock:
                if Counter(r for _, _, r in acked)["a"] >= at_kill["a"] + 10:
                    break
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert r_ok(port_a)
    finally:
        stop.set()
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (a, b):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    assert b.returncode == -signal.SIGKILL
    by = Counter(r for _, _, r in acked)
    assert by["a"] >= 30 and by["b"] >= 20, by

    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, image_sha256, verdict FROM icm_decisions")).all()
    engine.dispose()
    stored = {row.id: row for row in rows}
    per_sha = Counter(row.image_sha256 for row in rows)
    missing = [i for i, _, _ in acked if i not in stored]
    assert not missing, f"{len(missing)} acknowledged decisions lost: {missing[:10]}"
    assert len({i for i, _, _ in acked}) == len(acked), "two acknowledgements with one decision id"
    for i, sha, _ in acked:
        assert stored[i].image_sha256 == sha and stored[i].verdict in ("allow", "review", "block")
        assert per_sha[sha] == 1, f"decision for {sha} stored {per_sha[sha]} times"
    # a decision stored but never acknowledged (b killed between commit and answer) is at most one per request in flight
    assert len(rows) - len(acked) <= 3


def r_ok(port: int) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


def _catch(f, errors: list[BaseException]) -> None:
    try:
        f()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)
