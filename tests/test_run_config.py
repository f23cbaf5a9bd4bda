"""One run configuration (issue 22): ModerateConfig nests the backend spec, old flat configs
still run (read into the spec, with a note), and `icm moderate` checks its output before a
model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.job import ModerateConfig, read_records, run_job
from icm.moderation.spec import BackendSpec

runner = CliRunner()


def _images(folder: Path) -> Path:
    folder.mkdir()
    for i, colour in enumerate([(230, 180, 150), (20, 40, 200), (120, 120, 120)]):
        Image.new("RGB", (40, 30), colour).save(folder / f"img{i}.png")
    return folder


def test_an_old_flat_config_file_still_runs(tmp_path: Path) -> None:
    """A config file written for the flat ModerateConfig (backend settings beside the run's):
    read into the nested spec with a note, and the run gives the records a nested config gives."""
    folder = _images(tmp_path / "imgs")
    flat = tmp_path / "old.yaml"
    flat.write_text(yaml.safe_dump({
        "inputs": [str(folder)], "policy": "icm-sexy", "backend": "detector", "dtype": "auto", "device": "auto",
        "min_label_mass": 0.5, "batch_size": 2, "max_frames": 4, "out": str(tmp_path / "old.jsonl"),
    }))
    with pytest.warns(DeprecationWarning, match="flat backend settings") as caught:
        old = ModerateConfig(**yaml.safe_load(flat.read_text()))
    named = str(caught[0].message).split("(")[1].split(")")[0].split(", ")
    assert sorted(named) == ["backend", "device", "dtype", "min_label_mass"]
    assert old.backend == BackendSpec.build(backend="detector", min_label_mass=0.5, batch_size=2)
    assert old.backend_spec() is old.backend
    s = run_job(old)
    assert s.ok and s.total == 3
    nested = ModerateConfig.model_validate({
        "inputs": [str(folder)], "backend": {"backend": "detector", "min_label_mass": 0.5}, "batch_size": 2,
        "max_frames": 4, "out": str(tmp_path / "new.jsonl"),
    })
    assert run_job(nested).ok

    def stable(p: Path) -> list[tuple]:
        return [(r.path, r.verdict, r.p_violation, r.policy_digest, r.backend, r.model) for r in read_records(p)[0]]

    assert stable(tmp_path / "old.jsonl") == stable(tmp_path / "new.jsonl")


def test_a_config_gives_its_backend_nested_or_flat_not_both() -> None:
    with pytest.raises(ValueError, match="both nested"):
        ModerateConfig(backend=BackendSpec.build(), model="m")
    with pytest.raises(ValueError, match="the hf backend needs --model"):
        ModerateConfig.from_options(backend="hf")


@pytest.mark.parametrize("make_out", ["folder", "parquet-file"])
def test_an_output_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path, make_out: str) -> None:
    """--out naming a folder (for JSONL), or a file where parquet parts would go: exit 2 with the
    name and the problem, before any image is moderated (it was a traceback after the model loaded)."""
    folder = _images(tmp_path / "imgs")
    if make_out == "folder":
        out = tmp_path / "results"
        out.mkdir()
        want = "is a folder"
    else:
        out = tmp_path / "results.parquet"
        out.write_text("not a folder of parts")
        want = "a file of that name exists"
    result = runner.invoke(app, ["moderate", str(folder), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert str(out) in result.output and want in result.output
    assert not isinstance(result.exception, (ValueError, OSError))
