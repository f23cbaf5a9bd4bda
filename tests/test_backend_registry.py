"""The backend registry (issue 22): a backend registered with one line (its options model and
its class) is accepted everywhere a backend is named, without editing another module; the
server's and the evaluation's configs nest the spec, and read the flat form of earlier
versions; a spec round-trips through JSON as the options model of its backend."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import pytest
from PIL import Image
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.backends.base import Backend, Choice, YesNoScore
from icm.moderation.backends.cascade import CascadeOptions
from icm.moderation.backends.detector_options import DetectorOptions
from icm.moderation.backends.hf_options import HFOptions
from icm.moderation.backends.openai_options import OpenAIOptions
from icm.moderation.backends.registry import register, unregister
from icm.moderation.spec import BACKEND_NAMES, BackendSpec, create_backends

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


class TinyOptions(BackendSpec):
    """A test's own backend: one setting, with bounds."""

    backend: Literal["tiny"] = "tiny"
    level: float = Field(0.25, ge=0.0, le=1.0, description="tiny: the P(Yes) it answers to every question.")


class TinyBackend(Backend):
    name = "tiny"
    capabilities = frozenset({"score_yes_no", "choose"})

    def __init__(self, *, level: float = 0.25) -> None:
        self.level = level

    @property
    def model_id(self) -> str:
        return f"tiny-{self.level:g}"

    def score_yes_no(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[YesNoScore]:
        return [YesNoScore(self.level, source="tiny") for _ in images]

    def choose(self, images: Sequence[Image.Image], question: str, options: Sequence[str]) -> list[Choice]:
        return [Choice([1.0 / len(options)] * len(options), source="tiny") for _ in images]


@pytest.fixture()
def tiny() -> Iterator[None]:
    register("tiny", TinyOptions, TinyBackend)  # the one line a new backend needs
    try:
        yield
    finally:
        unregister("tiny")


def test_a_registered_backend_is_accepted_by_the_spec_the_server_and_icm_moderate(tiny: None, tmp_path: Path) -> None:
    assert "tiny" in BACKEND_NAMES
    spec = BackendSpec.build(backend="tiny", level=0.9, model=None)
    assert isinstance(spec, TinyOptions) and spec.level == 0.9
    first, escalate = create_backends(spec)
    assert isinstance(first, TinyBackend) and first.level == 0.9 and escalate is None
    with pytest.raises(ValueError, match="--level: Input should be less than or equal to 1"):
        BackendSpec.build(backend="tiny", level=2)

    pytest.importorskip("fastapi")
    from icm.serve.config import ServeConfig
    from icm.serve.service import build_service

    config = ServeConfig(backend={"backend": "tiny", "level": 0.75}, db=str(tmp_path / "d.sqlite"), keep_images=False)
    service = build_service(config)
    try:
        (backend,) = {m.backend for m in service.moderators.values()}
        assert isinstance(backend, TinyBackend) and backend.level == 0.75
    finally:
        service.close()

    out = tmp_path / "records.jsonl"
    result = runner.invoke(app, ["moderate", str(EXAMPLES / "flower.jpg"), "--backend", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["backend"], record["model"]) == ("tiny", "tiny-0.25")  # the options model's default reached it
    assert record["term"]["p_yes"] == 0.25


def test_a_registered_backends_settings_reach_its_spec_from_moderates_options_and_an_old_flat_config(tiny: None) -> None:
    from icm.run.config import ModerateConfig

    config = ModerateConfig.from_options(backend="tiny", level=0.9, batch_size=4, out="r.jsonl")
    assert config.backend == TinyOptions(level=0.9, batch_size=4) and (config.batch_size, config.out) == (4, "r.jsonl")
    with pytest.warns(DeprecationWarning, match="level"):
        old = ModerateConfig(backend="tiny", level=0.5, batch_size=2)
    assert old.backend == TinyOptions(level=0.5, batch_size=2) and old.batch_size == 2


def test_an_old_flat_serve_config_file_still_loads_and_gives_the_same_spec(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("fastapi")
    from icm.serve.config import ServeConfig

    expected = BackendSpec.build(
        backend="openai", model="served", base_url="http://127.0.0.1:9/v1", min_label_mass=0.7, guided_choice="regex"
    )
    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "port: 9123\nbackend: openai\nmodel: served\nbase_url: http://127.0.0.1:9/v1\nmin_label_mass: 0.7\n"
        "guided_choice: regex\ndtype: auto\n"
    )
    with caplog.at_level(logging.WARNING, logger="icm.serve"):
        cfg = ServeConfig.from_file(flat)
    assert cfg.backend == expected and cfg.port == 9123
    assert any("deprecated" in r.getMessage() and "flat.yaml" in r.getMessage() for r in caplog.records)

    nested = tmp_path / "nested.yaml"
    nested.write_text("port: 9123\nbackend:\n" + "".join(f"  {k}: {v}\n" for k, v in expected.model_dump().items() if v is not None))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="icm.serve"):
        assert ServeConfig.from_file(nested).backend == expected
    assert not caplog.records, "the nested form is not deprecated"
    # flags win over the file, the file's other settings stay
    over = ServeConfig.from_file(nested, timeout=5.0, backend=None)
    assert over.backend == expected.model_copy(update={"timeout": 5.0})
    switched = ServeConfig.from_file(nested, backend="hf").backend  # the settings hf shares stay
    assert switched == BackendSpec.build(backend="hf", model="served", min_label_mass=0.7)
    with pytest.raises(ValueError, match="min_label_mass"):
        ServeConfig(backend={"backend": "openai", "model": "served", "min_label_mass": 2})


def test_the_evaluation_config_nests_the_spec_and_maps_the_flat_form() -> None:
    from icm.evaluation.run import EvalRunConfig

    spec = BackendSpec.build(backend="hf", model="m", batch_size=2)
    assert EvalRunConfig(dataset="d", backend=spec).backend == spec
    with pytest.warns(DeprecationWarning, match="backend_spec"):
        assert EvalRunConfig(dataset="d", backend_spec=spec).backend == spec  # the field's earlier name
    with pytest.warns(DeprecationWarning, match="flat backend options"):
        assert EvalRunConfig(dataset="d", backend="hf", model="m", batch_size=2).backend == spec
    assert EvalRunConfig(dataset="d").backend == BackendSpec()


class _Holder(BaseModel):
    spec: BackendSpec = Field(default_factory=BackendSpec)


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({}, DetectorOptions),
        ({"backend": "hf", "model": "m", "adapter": "a", "dtype": "bfloat16", "batch_size": 3}, HFOptions),
        ({"backend": "openai", "model": "served", "timeout": 7.5, "guided_choice": "regex"}, OpenAIOptions),
        ({"backend": "cascade", "escalate_backend": "openai", "model": "served", "max_retries": 0}, CascadeOptions),
    ],
)
def test_the_spec_round_trips_through_json_as_its_backends_options(fields: dict[str, object], kind: type) -> None:
    spec = BackendSpec.build(**fields)
    assert isinstance(spec, kind)
    text = _Holder(spec=spec).model_dump_json()
    back = _Holder.model_validate_json(text).spec
    assert back == spec and type(back) is type(spec)
    assert BackendSpec.model_validate(json.loads(text)["spec"]) == spec
    if spec.backend == "hf":
        assert "base_url" not in text, "a spec holds only its own backend's settings"
    if spec.backend == "cascade":
        assert json.loads(text)["spec"]["escalate"]["backend"] == "openai"


def test_flags_the_backend_does_not_use_are_checked_then_ignored() -> None:
    """As on the command line before: ``--model`` with the detector is ignored, a bad value is not."""
    spec = BackendSpec.build(backend="detector", model="m", timeout=5.0, escalate_backend="openai")
    assert isinstance(spec, DetectorOptions) and "model" not in spec.model_dump()
    with pytest.raises(ValueError, match="--guided-choice: Input should be 'off'"):
        BackendSpec.build(backend="hf", model="m", guided_choice="json")
    with pytest.raises(ValueError, match="--escalate-backend: Input should be 'hf' or 'openai'"):
        BackendSpec.build(backend="detector", escalate_backend="detector")
