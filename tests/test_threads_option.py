"""One thread setting for onnxruntime and torch (issue 23 item 3): the ``threads`` option of the
detector and hf backends (``--threads``), beside ``$ICM_THREADS``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.evidence.runtime import thread_plan
from icm.moderation.spec import BackendSpec, create_backend, create_backends
from icm.run.config import ModerateConfig

runner = CliRunner()
IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


def test_the_option_wins_over_the_variable_and_sizes_the_pool_and_the_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICM_THREADS", "2")
    config = ModerateConfig.from_options(backend="detector", threads=6)
    backend = create_backend(config.backend)
    try:
        assert backend.threads == 6  # type: ignore[attr-defined]
        assert (backend.workers, backend.intra_op_num_threads) == thread_plan(6)  # type: ignore[attr-defined]
    finally:
        backend.close()


def test_the_cascade_gives_its_detector_the_threads() -> None:
    spec = BackendSpec.build(backend="cascade", escalate_backend="openai", model="m", base_url="http://127.0.0.1:9/v1", threads=3)
    first, escalate = create_backends(spec)
    try:
        assert first.threads == 3  # type: ignore[attr-defined]
    finally:
        first.close()
        if escalate is not None:
            escalate.close()


def test_hf_takes_threads_and_openai_does_not() -> None:
    assert BackendSpec.build(backend="hf", model="m", threads=2).options()["threads"] == 2
    assert "threads" not in BackendSpec.build(backend="openai", model="m", threads=2).options()


def test_moderate_runs_with_threads_and_refuses_zero() -> None:
    bad = runner.invoke(app, ["moderate", str(IMAGES / "flower.jpg"), "--threads", "0"])
    assert bad.exit_code == 2
    assert "--threads" in bad.output and "greater than or equal to 1" in bad.output
    ok = runner.invoke(app, ["moderate", str(IMAGES / "flower.jpg"), "--threads", "1", "--json"])
    assert ok.exit_code == 0, ok.output
    records = [json.loads(line) for line in ok.output.splitlines() if line.startswith("{")]
    assert [r["verdict"] for r in records] == ["allow"] and records[0]["error"] is None


@pytest.mark.parametrize("command", [["moderate"], ["serve"], ["eval", "run"], ["eval", "bench"]])
def test_every_backend_command_has_the_flag(command: list[str]) -> None:
    out = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
    assert "--threads" in out and "ICM_THREADS" in out
