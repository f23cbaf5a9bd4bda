"""The openai backend against loopback servers that misbehave as real ones and proxies do
(issue 19): a 200 whose body is not JSON is retried like a 5xx, a dropped or cut-off
answer is named as such (the server was reached), and retries told to wait by
``Retry-After`` come back spread out, not in one burst.

The servers are tests/openai_recorder.py's :func:`misbehaving_server` (http.server on
127.0.0.1), which decides request by request what to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

import icm.openai_http
from icm.cli.main import app
from icm.moderation.backends.base import BackendConfigError, Failed, YesNoScore
from icm.moderation.backends.openai_compat import OpenAIBackend
from icm.moderation.job import read_records

from openai_recorder import misbehaving_server

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
runner = CliRunner()


def _record_waits(monkeypatch: pytest.MonkeyPatch, *, really: bool) -> list[float]:
    """Every wait before a retry, recorded; ``really``: also waited (else skipped, for speed)."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if really:
            await asyncio.sleep(seconds)

    monkeypatch.setattr(icm.openai_http, "retry_sleep", sleep, raising=False)
    return waits


def _invalid_json_30_percent(seed: int) -> Callable[[int, dict[str, Any]], str]:
    """A server whose 200s are not JSON 30% of the time (seeded), one request failing at most twice."""
    rng = random.Random(seed)
    failed: Counter[str] = Counter()

    def decide(n: int, body: dict[str, Any]) -> str:
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if failed[key] < 2 and rng.random() < 0.3:
            failed[key] += 1
            return "invalid-json"
        return "ok"

    return decide


def test_a_server_answering_invalid_json_30_percent_of_the_time_gives_no_error_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _record_waits(monkeypatch, really=False)
    out = tmp_path / "out.jsonl"
    with misbehaving_server(_invalid_json_30_percent(19)) as srv:
        result = runner.invoke(app, ["moderate", str(EXAMPLES), "--backend", "openai", "--model", "m",
                                     "--base-url", srv.url, "--out", str(out)], env={"COLUMNS": "200"})
    records, _ = read_records(out)
    bad = srv.done.count("invalid-json")
    assert bad >= 0.2 * len(srv.done) and bad >= 3, srv.done  # the server did misbehave, often
    assert len(records) == 3 and all(r.ok for r in records), [r.error for r in records]
    assert result.exit_code == 0, result.output
    assert "errors: 0" in result.output


@pytest.mark.parametrize(
    ("behaviour", "named"),
    [("truncated", "truncated answer"), ("cut-json", "truncated answer"), ("drop", "dropped answer"),
     ("invalid-json", "malformed JSON")],
)
def test_a_dropped_or_cut_off_answer_is_named_and_not_unreachable(
    behaviour: str, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _record_waits(monkeypatch, really=False)
    with misbehaving_server(lambda n, body: behaviour) as srv:
        backend = OpenAIBackend("m", base_url=srv.url, max_retries=2, timeout=5)
        try:
            out = backend.score_yes_no([Image.new("RGB", (16, 16))] * 2, ["q1", "q2"])  # no BackendConfigError
        finally:
            backend.close()
    assert all(isinstance(o, Failed) and o.error.startswith(named) for o in out), out
    assert all("cannot reach" not in o.error and "gave up after 3 attempts" in o.error for o in out)  # type: ignore[union-attr]
    assert len(srv.done) == 6  # each retried like a 5xx


def test_a_server_that_truncates_every_answer_is_named_in_the_records_not_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _record_waits(monkeypatch, really=False)
    out = tmp_path / "out.jsonl"
    with misbehaving_server(lambda n, body: "truncated") as srv:
        result = runner.invoke(app, ["moderate", str(EXAMPLES / "flower.jpg"), "--backend", "openai", "--model", "m",
                                     "--base-url", srv.url, "--out", str(out), "--max-retries", "1"],
                               env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output  # failed records (retried by --resume), not a stopped job (2)
    assert "cannot reach" not in result.output
    [record] = read_records(out)[0]
    assert record.error is not None and "truncated answer" in record.error


def test_a_refused_connection_is_still_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    _record_waits(monkeypatch, really=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    s.close()
    backend = OpenAIBackend("m", base_url=dead, max_retries=1)
    try:
        with pytest.raises(BackendConfigError, match="cannot reach the server"):
            backend.score_yes_no([Image.new("RGB", (16, 16))], ["q"])
    finally:
        backend.close()


def test_retries_after_retry_after_are_spread_not_a_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve requests turned away at once with ``Retry-After: 1``: each waits at least the
    second the server asked for, and they come back spread over the next second."""
    waits = _record_waits(monkeypatch, really=True)
    n = 12
    with misbehaving_server(lambda i, body: "429" if i < n else "ok") as srv:
        backend = OpenAIBackend("m", base_url=srv.url, max_concurrency=n, max_retries=2, backoff_base=0.01)
        try:
            out = backend.score_yes_no([Image.new("RGB", (16, 16))] * n, [f"q{i}" for i in range(n)])
        finally:
            backend.close()
    assert all(isinstance(o, YesNoScore) for o in out)
    retried = sorted(srv.arrived[n:])
    assert len(retried) == n
    assert retried[-1] - retried[0] >= 0.25, f"retries arrived within {retried[-1] - retried[0]:.3f} s: a burst"
    assert len(waits) == n and all(1.0 <= w <= 2.0 for w in waits), waits  # Retry-After honoured, bounded
    assert max(waits) - min(waits) >= 0.25 and len(set(waits)) == n, waits
