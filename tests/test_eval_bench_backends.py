"""`icm eval bench` moderates with any backend: every backend option of `icm eval run` and
`icm moderate`, through the nested backend spec, on a loopback OpenAI-compatible server
(tests/fake_openai.py on 127.0.0.1) answering as a guard model (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer.main

from icm.cli.main import app
from icm.moderation.job import read_records

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bench"


def _flags(*path: str) -> set[str]:
    group = typer.main.get_command(app)
    for name in path:
        group = group.commands[name]  # type: ignore[attr-defined]
    return {opt for p in group.params for opt in p.opts if opt.startswith("--")}


def test_bench_takes_every_backend_option_of_eval_run_and_moderate():
    backend = {"--backend", "--model", "--adapter", "--base-url", "--dtype", "--device", "--batch-size", "--min-label-mass",
               "--text-confidence", "--guided-choice", "--escalate-backend", "--api-key-env", "--timeout", "--max-retries",
               "--preset", "--threads"}
    assert backend <= _flags("moderate")
    assert backend <= _flags("eval", "run")
    assert backend <= _flags("eval", "bench")


def test_bench_refuses_a_bad_backend_option_naming_it(tmp_path):
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["eval", "bench", "vlguard", str(FIXTURES / "vlguard"), "-o", str(tmp_path / "out"),
                                 "--backend", "openai", "--model", "guard", "--min-label-mass", "2"])
    assert r.exit_code == 2 and "--min-label-mass: Input should be less than or equal to 1" in r.output
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_bench_with_a_guard_preset_on_the_openai_backend(request, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from typer.testing import CliRunner

    vlm, fake = request.getfixturevalue("vlm"), request.getfixturevalue("fake")
    from fake_openai import Reply, text_body

    said = {"rating": "Unsafe", "category": "O3: Sexual Content", "rationale": "A drawing."}
    fake.script("default", Reply(json=text_body(json.dumps(said), completion_tokens=40)))
    out = tmp_path / "out"
    args = ["eval", "bench", "llavaguard", str(FIXTURES / "llavaguard"), "--json", "-o", str(out), "--bootstrap", "20",
            "--backend", "openai", "--model", "guard", "--base-url", vlm[1], "--preset", "llavaguard",
            "--text-confidence", "0.9", "--timeout", "10", "--max-retries", "0", "--guided-choice", "off"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["backend"], rep["model"], rep["preset"]) == ("openai", f"guard@{vlm[1]} (preset llavaguard)", "llavaguard")
    records, bad = read_records(str(out / "records.jsonl"))
    assert bad == 0 and records and all(r.model == rep["model"] for r in records)
    guarded = [r for r in records if r.category_scores.get("llavaguard")]
    assert guarded and all(r.category_scores["llavaguard"]["O3"] == pytest.approx(0.9) for r in guarded)  # --text-confidence
    cats = {c["category"]: c for c in rep["categories"]}
    assert cats["O3"]["status"] == "scored" and cats["O3"]["coverage"] == 1.0
