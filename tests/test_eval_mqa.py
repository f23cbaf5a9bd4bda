"""`icm eval mqa`: first-letter scoring on the paper's two-line files and on our records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.mqa import QARecord, evaluate_paper_folder, evaluate_two_line, first_letter, is_correct, score_records

runner = CliRunner()


def _two_line(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{img}\n{ans}\n" for img, ans in rows), encoding="utf-8")
    return path


def _paper_layout(root: Path) -> Path:
    img = "upper_bust/upper_bust_2022072011061710001_v2.jpg"
    img2 = "whole_normal/whole_normal_2022072011061710002_v2.jpg"
    _two_line(root / "mc_gt.txt", [(img, "A."), (img, "B."), (img2, "."), (img2, "D.")])
    _two_line(root / "openqa_gt.txt", [(img, "Yes."), (img2, "No."), (img2, "No.")])
    _two_line(root / "eval_mc_data" / "good.txt", [(img, "A."), (img, "b) second"), (img2, "A."), (img2, "C.")])
    _two_line(root / "eval_qa_data" / "good.txt", [(img, "Yes, it is."), (img2, "no"), (img2, "Color.")])
    _two_line(root / "eval_mc_data" / "bad.txt", [(img, "D."), (img, "D."), (img2, "D."), (img2, "D.")])
    _two_line(root / "eval_qa_data" / "bad.txt", [(img, "No."), (img2, "No."), (img2, "No.")])
    return root


def test_first_letter_rules():
    assert first_letter("B. the second") == "B" and first_letter("  yes") == "Y" and first_letter("") is None
    assert is_correct("mc", "b", "B.") and not is_correct("mc", "Yes", "Y")  # Y is no option letter
    assert is_correct("yes_no", "Yes.", "Yes") and not is_correct("yes_no", "Color.", "C")
    assert not is_correct("mc", None, "A")
    assert is_correct("mc", "E", "E.", n_options=5) and not is_correct("mc", "E", "E.")


def test_paper_folder_three_ways(tmp_path):
    reports = {r.name: r for r in evaluate_paper_folder(_paper_layout(tmp_path / "mqa"))}
    assert set(reports) == {"bad", "good"}
    g = reports["good"]
    assert (g.mc.correct, g.mc.total) == (2, 4)  # the '.' truth can never be matched
    assert g.mc.invalid_truth == 1 and g.mc.accuracy_valid_truth == pytest.approx(2 / 3)
    assert (g.yes_no.correct, g.yes_no.total, g.yes_no.invalid_answers) == (2, 3, 1)
    assert (g.all.correct, g.all.total) == (4, 7) and g.all.accuracy == pytest.approx(4 / 7)
    assert set(g.per_category) == {"upper_bust", "whole_normal"}
    assert g.per_category["upper_bust"].correct == 3
    b = reports["bad"]
    assert (b.mc.correct, b.yes_no.correct, b.all.correct) == (1, 2, 3)
    only = evaluate_paper_folder(tmp_path / "mqa", model="bad")
    assert [r.name for r in only] == ["bad"]
    with pytest.raises(ValueError, match="no answers of model 'nope'"):
        evaluate_paper_folder(tmp_path / "mqa", model="nope")


def test_misaligned_and_short_files(tmp_path):
    t = _two_line(tmp_path / "t.txt", [("a.jpg", "A."), ("b.jpg", "B.")])
    p = _two_line(tmp_path / "p.txt", [("b.jpg", "A."), ("a.jpg", "B.")])
    rep = evaluate_two_line(mc=(t, p))
    assert rep.misaligned == 2 and any("different image" in n for n in rep.notes)
    short = _two_line(tmp_path / "s.txt", [("a.jpg", "A.")])
    with pytest.raises(ValueError, match=r"has 1 answers but .* has 2 questions"):
        evaluate_two_line(mc=(t, short))
    odd = tmp_path / "odd.txt"
    odd.write_text("a.jpg\nA.\nb.jpg\n")
    with pytest.raises(ValueError, match="not an even number"):
        evaluate_two_line(mc=(t, odd))


def test_our_records_and_the_cli(tmp_path):
    recs = [
        QARecord(image="x/upper_bust_1.jpg", kind="mc", question="Which part?", options=["chest", "legs", "back", "none"], truth="A", answer="A. chest"),
        QARecord(image="x/upper_bust_1.jpg", kind="yes_no", question="Is the chest exposed?", truth="Yes", answer="No."),
        QARecord(image="x/upper_bust_1.jpg", kind="yes_no", question="Is it sexy?", truth="Yes", answer=None, error="timeout"),
    ]
    f = tmp_path / "qa.jsonl"
    f.write_text("\n".join(r.model_dump_json() for r in recs) + "\nnot json\n")
    r = runner.invoke(app, ["eval", "mqa", str(f), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["mqa"]
    assert (m["mc"]["correct"], m["yes_no"]["correct"], m["yes_no"]["missing_answers"]) == (1, 0, 1)
    assert m["format"] == "icm-jsonl" and any("unreadable" in n for n in m["notes"])
    folder = _paper_layout(tmp_path / "mqa")
    out = tmp_path / "s.json"
    r = runner.invoke(app, ["eval", "mqa", str(folder), "--model", "good", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "0.5714" in r.output and json.loads(out.read_text())["mqa"]["all"]["correct"] == 4
    r = runner.invoke(app, ["eval", "mqa"])
    assert r.exit_code == 2 and "nothing to score" in r.output
    r = runner.invoke(app, ["eval", "mqa", str(tmp_path)])
    assert r.exit_code == 2 and "not the paper's MQA layout" in r.output
    with pytest.raises(ValueError, match="no questions"):
        score_records([], name="x", source="y", fmt="icm-jsonl")
