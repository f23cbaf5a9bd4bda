"""Scaffolding the server's tests share: a scripted backend, PNG bytes, a live server in a thread,
a fresh PostgreSQL schema,
a server script in its own process (and its memory from /proc)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from icm.moderation.backends.base import Backend, Box, Choice, NotJudged, YesNoScore


class ColourBackend(Backend):
    """A scripted model that looks at the image: redness is its evidence.

    P(Yes) is the red share of the pixels; red images get the first option of every
    attribute (a violating product under icm-default) and a box over their left half,
    others the last option ("normal"/"none"). It records the size of every batch it is
    asked about, sleeps ``delay`` seconds per call, and fails on images whose top-left
    pixel is pure green when ``fail_green`` is set.
    """

    name = "colour"
    capabilities = frozenset({"score_yes_no", "choose", "generate"})

    def __init__(self, delay: float = 0.0, fail_green: bool = False, refuse_green: bool = False) -> None:
        self.delay = delay
        self.fail_green = fail_green
        self.refuse_green = refuse_green  # green images: the term question is refused, so the verdict is review
        self.batches: list[int] = []
        self.lock = threading.Lock()

    @staticmethod
    def red(image: Image.Image) -> float:
        a = np.asarray(image.convert("RGB"), dtype=np.float64)
        return float((a[..., 0] / (a.sum(axis=-1) + 1e-9)).mean())

    def ask(self, images, queries):
        with self.lock:
            self.batches.append(len(images))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_green and any(im.convert("RGB").getpixel((0, 0)) == (0, 255, 0) for im in images):
            raise RuntimeError("green is not allowed")
        return super().ask(images, queries)

    def score_yes_no(self, images, questions):
        out = []
        for im in images:
            red = self.red(im)
            boxes = [Box("RED_AREA", 0.9, 0.0, 0.0, im.width / 2, float(im.height))] if red > 0.5 else []
            if self.refuse_green and im.convert("RGB").getpixel((0, 0))[1] > 200:
                out.append(NotJudged("refused", "I can't help with that.", {"text": "I can't help with that."}))
                continue
            out.append(YesNoScore(p_yes=min(1.0, max(0.0, (red - 0.2) * 1.6)), source="colour", raw={"boxes": boxes}))
        return out

    def choose(self, images, question, options):
        out = []
        for im in images:
            probs = [0.01] * len(options)
            probs[0 if self.red(im) > 0.5 else -1] = 1.0
            out.append(Choice(probs=probs, source="colour"))
        return out

    def generate(self, images, messages, *, max_new_tokens=256):
        return ["The image is mostly red." if self.red(im) > 0.5 else "Nothing red here." for im in images]


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def live_server(app: Any, **options: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields its base URL.

    ``options`` go to ``uvicorn.Config`` (``lifespan="off"``, ``timeout_graceful_shutdown=1`` ...).
    The one server-in-a-thread harness of the tests.
    """
    import uvicorn

    config = {"host": "127.0.0.1", "port": 0, "log_level": "warning", "lifespan": "on", **options}
    server = uvicorn.Server(uvicorn.Config(app, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and server.servers) and time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


PG_SKIP = "set ICM_TEST_POSTGRES_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/icm_test) to test PostgreSQL"


@contextlib.contextmanager
def postgres_schema(schema: str) -> Iterator[str]:
    """ICM_TEST_POSTGRES_URL with a fresh ``schema`` on the search path (dropped afterwards); skips without it."""
    url = os.environ.get("ICM_TEST_POSTGRES_URL")
    if not url:
        pytest.skip(PG_SKIP)
    pytest.importorskip("psycopg")
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in url else "?"
    try:
        yield url + sep + "options=" + quote(f"-csearch_path={schema}", safe="")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()


@contextlib.contextmanager
def server_process(script: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run ``script`` (``python -c``; argv: a database file under ``tmp_path`` and a free loopback port)
    until its ``/healthz`` answers (60 s at most; the assertion shows its log); yield the process and its
    URL, and kill it afterwards."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "d.sqlite"), str(port)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield proc, url
    finally:
        proc.kill()
        proc.wait()


def status_kib(pid: int, field: str) -> int:
    """A memory figure of a process (``VmRSS``, ``VmHWM``, ...) in KiB, from /proc/PID/status (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/PID/status")
