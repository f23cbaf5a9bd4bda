"""Answers read from the answer text (a server without usable logprobs), issue 19.

One sampled answer is not a probability of 0 or 1: it counts at the stated, configurable
``--text-confidence``; the record says ``source: text``; ``icm moderate``'s summary,
``icm eval``'s summary and the server's ``/metrics`` count such answers. The server is
tests/fake_openai.py's FakeOpenAIServer on 127.0.0.1, answering as Ollama does (text, no
logprobs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.backends.openai_compat import OpenAIBackend
from icm.moderation.engine import Moderator
from icm.moderation.job import JobSummary, read_records
from icm.moderation.record import ModerationRecord, TermScore

from fake_openai import MODEL, FakeOpenAIServer, Reply, text_body
from square_policy import square_policy

POLICY = square_policy("text-check")
runner = CliRunner()


@pytest.fixture()
def fake(vlm: tuple[FakeOpenAIServer, str]) -> FakeOpenAIServer:
    """Answers like a VLM behind Ollama: "The answer is yes." / "The answer is (B).", no logprobs."""
    vlm[0].reset()
    vlm[0].script("term", Reply(json=text_body("The answer is yes.")))
    vlm[0].script("hue", Reply(json=text_body("The answer is (B).")))
    return vlm[0]


@pytest.fixture()
def work(tmp_path: Path, vlm: tuple[FakeOpenAIServer, str]) -> dict[str, Any]:
    policy = tmp_path / "text-check.yaml"
    policy.write_text(POLICY)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (220, 20 + i, 20)).save(imgs / f"red{i}.png")
    out = tmp_path / "out.jsonl"
    args = ["moderate", str(imgs), "--policy", str(policy), "--backend", "openai", "--model", MODEL,
            "--base-url", vlm[1], "--out", str(out)]
    return {"args": args, "out": out, "imgs": imgs, "policy": policy, "url": vlm[1]}


def test_one_sampled_answer_counts_at_the_stated_confidence_with_source_text(fake, work):
    result = runner.invoke(app, work["args"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    records, _ = read_records(work["out"])
    assert len(records) == 3
    for r in records:
        assert r.term is not None and r.term.source == "text" and r.term.p_yes == 0.75  # not 1.0
        assert r.attribute_sources == {"hue": "text"} and r.attributes["hue"] == {"red": 0.75, "blue": 0.25}
        assert r.p_violation is not None and r.p_violation < 0.99
        assert r.text_answers() == ["term:red", "attr:hue"]
    assert "read from text: 3 records (6 answers" in result.output


def test_the_text_confidence_is_an_option(fake, work):
    result = runner.invoke(app, work["args"] + ["--text-confidence", "0.6"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    records, _ = read_records(work["out"])
    assert {r.term.p_yes for r in records if r.term} == {0.6}
    assert {r.verdict for r in records} == {"review"}  # 0.6 < the block threshold 0.7: a person looks

    bad = runner.invoke(app, work["args"] + ["--text-confidence", "0.3"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "--text-confidence" in bad.output


def test_records_of_earlier_versions_say_parsed_and_are_counted_as_read_from_text() -> None:
    old = ModerationRecord.model_validate_json(ModerationRecord(
        path="a.png", policy="icm-sexy", rules="icm-default", backend="openai",
        term=TermScore(term="sexy", question="Is it sexy?", p_yes=1.0, source="parsed"),
        attributes={"region": {"none": 1.0}}, attribute_sources={"region": "parsed", "exposure": "logprobs"},
        verdict="allow",
    ).model_dump_json())
    assert old.text_answers() == ["term:sexy", "attr:region"]
    summary = JobSummary()
    summary.count_text(old)
    assert (summary.text_records, summary.text_answers) == (1, 2)


def test_icm_eval_counts_answers_read_from_text(fake, work, tmp_path):
    from icm.evaluation.run import EvalRunConfig, run_evaluation

    ds = tmp_path / "set"
    ds.mkdir()
    for i in range(2):
        Image.new("RGB", (24, 24), (220, 20 + i, 20)).save(ds / f"red{i}.png")
    (ds / "dataset.jsonl").write_text('{"image": "red0.png", "label": "violate"}\n{"image": "red1.png", "label": "violate"}\n')
    backend = OpenAIBackend(MODEL, base_url=work["url"], max_retries=0)
    cfg = EvalRunConfig(dataset=str(ds), out_dir=str(tmp_path / "out"), policy=str(work["policy"]), qa=False,
                        explain=False, html=False, offline_metric="none")
    try:
        s = run_evaluation(cfg, moderator=Moderator(backend, policy=str(work["policy"])))
    finally:
        backend.close()
    assert s.meta["records_read_from_text"] == 2 and s.meta["answers_read_from_text"] == 4
    assert any("2 of 2 records have answers read from the answer text" in n for n in s.meta["notes"])


def test_metrics_count_answers_read_from_text(fake, work, tmp_path, monkeypatch):
    pytest.importorskip("sqlalchemy")
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from icm.serve import ServeConfig, create_app

    def metric(text: str, name: str, **labels: str) -> float:
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    backend = OpenAIBackend(MODEL, base_url=work["url"], max_retries=0)
    config = ServeConfig(allow_unauthenticated=True, db=str(tmp_path / "d.sqlite"), allowed_hosts=["testserver"],
                         policy=str(work["policy"]))
    app_ = create_app(config, moderator=Moderator(backend, policy=str(work["policy"])))
    with TestClient(app_, client=("127.0.0.1", 50123)) as c:
        data = (work["imgs"] / "red0.png").read_bytes()
        for _ in range(2):
            assert c.post("/v1/moderate", files={"image": ("red0.png", data, "image/png")}).status_code == 200
        text = c.get("/metrics").text
    assert metric(text, "icm_text_answers_total", kind="term") == 2
    assert metric(text, "icm_text_answers_total", kind="attr") == 2
    assert metric(text, "icm_text_decisions_total") == 2
