"""One BackendSpec for every entry point: its validation names the option, and the settings
given to ``icm moderate``, ``icm chat``, ``icm eval run``, the batch job and the server
reach the backend that is built (checked on the backend object or on the wire)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.job import ModerateConfig, build_moderator
from icm.moderation.spec import BackendSpec, create_backend, create_backends

from openai_recorder import Recorded, recording_server

runner = CliRunner()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 0}, "--batch-size: Input should be greater than or equal to 1"),
        ({"min_label_mass": 1.5}, "--min-label-mass: Input should be less than or equal to 1"),
        ({"backend": "vllm"}, "--backend: Input should be 'detector', 'hf', 'openai' or 'cascade'"),
        ({"guided_choice": "json"}, "--guided-choice: Input should be 'off', 'structured_outputs'"),
        ({"dtype": "int8"}, "--dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
        ({"backend": "hf"}, "the hf backend needs --model"),
        ({"backend": "cascade", "escalate_backend": "openai"}, "the openai backend needs --model"),
    ],
)
def test_a_bad_setting_is_a_value_error_naming_the_option(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        BackendSpec.build(**fields)
    assert message in str(err.value)


def test_none_means_the_default_and_the_cascade_builds_two_backends() -> None:
    spec = BackendSpec.build(backend="cascade", model="m", adapter=None, escalate_backend=None)
    assert spec == BackendSpec(backend="cascade", model="m", escalate_backend="hf")
    with pytest.raises(ValueError, match="two backends"):
        create_backend(spec)
    first, escalate = create_backends(BackendSpec.build(backend="detector"))
    assert first.name == "detector" and escalate is None


# --------------------------------------------------------------------------- settings reach the backend


@pytest.fixture()
def server() -> Iterator[Recorded]:
    with recording_server() as rec:
        yield rec


def test_the_batch_job_maps_its_fields_onto_the_spec(monkeypatch: pytest.MonkeyPatch, server: Recorded) -> None:
    monkeypatch.setenv("ICM_SPEC_TEST_KEY", "sk-from-the-named-variable-0001")
    config = ModerateConfig(
        backend="openai", model="served", base_url=server.url, min_label_mass=0.8, guided_choice="regex",
        api_key_env="ICM_SPEC_TEST_KEY", timeout=7.5, max_retries=1,
    )
    spec = config.backend_spec()
    assert (spec.min_label_mass, spec.guided_choice, spec.api_key_env, spec.timeout, spec.max_retries) == (
        0.8, "regex", "ICM_SPEC_TEST_KEY", 7.5, 1
    )
    mod = build_moderator(config)
    try:
        assert mod.backend.min_label_mass == 0.8 and mod.backend.guided_choice == "regex"
        mod.backend.score_yes_no([Image.new("RGB", (8, 8))], ["Is it red?"])
    finally:
        mod.backend.close()
    headers, body = server.requests[0]
    assert headers.get("authorization") == "Bearer sk-from-the-named-variable-0001"
    assert body["model"] == "served"


def test_an_unset_api_key_variable_is_refused_before_any_request(server: Recorded, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    result = runner.invoke(
        app, ["moderate", str(image), "-b", "openai", "-m", "served", "--base-url", server.url, "--api-key-env", "ICM_NOT_SET_ANYWHERE"]
    )
    assert result.exit_code == 2
    assert "ICM_NOT_SET_ANYWHERE" in result.output and "not set" in result.output
    assert server.requests == []


def test_the_server_takes_min_label_mass_and_guided_choice(tmp_path: Path, server: Recorded) -> None:
    pytest.importorskip("fastapi")
    from icm.serve.config import ServeConfig
    from icm.serve.service import build_service

    config = ServeConfig(
        backend="openai", model="served", base_url=server.url, min_label_mass=0.75, guided_choice="guided_choice",
        db=str(tmp_path / "d.sqlite"), keep_images=False,
    )
    service = build_service(config)
    try:
        backends = {m.backend for m in service.moderators.values()}
        assert len(backends) == 1
        (backend,) = backends
        assert backend.min_label_mass == 0.75 and backend.guided_choice == "guided_choice"
    finally:
        service.close()
    with pytest.raises(ValueError, match="min_label_mass"):
        ServeConfig(backend="openai", model="served", min_label_mass=2.0)


def test_every_command_has_the_same_backend_options() -> None:
    """moderate, chat, eval run and serve all take the spec's options, spelled the same."""
    options = ["--model", "--adapter", "--base-url", "--dtype", "--device", "--min-label-mass", "--guided-choice",
               "--api-key-env", "--timeout", "--max-retries"]
    for command in (["moderate"], ["chat"], ["eval", "run"], ["serve"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "300", "TERM": "dumb"})
        assert result.exit_code == 0, result.output
        missing = [o for o in options if o not in result.output]
        assert not missing, f"icm {' '.join(command)} lacks {missing}"
