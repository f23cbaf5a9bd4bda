"""`icm eval run`: moderate an evaluation set, answer its questions, explain, score, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.run import EvalRunConfig, load_dataset, run_evaluation
from icm.moderation.backends.base import Backend, Choice, YesNoScore
from icm.moderation.engine import Moderator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
runner = CliRunner()


class ScriptedVLM(Backend):
    """Looks at the image (its red share) and answers like a small VLM would, as text."""

    name = "scripted"
    capabilities = frozenset({"score_yes_no", "choose", "generate"})

    def __init__(self) -> None:
        self.prompts: list[str] = []

    @staticmethod
    def red(im: Image.Image) -> bool:
        a = np.asarray(im.convert("RGB"), dtype=float)
        return float((a[..., 0] / (a.sum(axis=-1) + 1e-9)).mean()) > 0.5

    def score_yes_no(self, images, questions):
        return [YesNoScore(p_yes=0.95 if self.red(im) else 0.05, source="scripted") for im in images]

    def choose(self, images, question, options):
        out = []
        for im in images:
            probs = [0.01] * len(options)
            probs[0 if self.red(im) else -1] = 1.0
            out.append(Choice(probs=probs, source="scripted"))
        return out

    def generate(self, images, messages, *, max_new_tokens=256):
        out = []
        for im, conv in zip(images, messages, strict=True):
            prompt = conv[-1]["content"]
            self.prompts.append(prompt)
            red = self.red(im)
            if "option's letter" in prompt:
                out.append("A." if red else "D.")
            elif "Yes or No" in prompt:
                out.append("Yes." if red else "No.")
            else:
                out.append("The woman wears a red low-cut dress that shows her cleavage, which is sexy." if red
                           else "A calm blue picture of the sea with nothing suggestive in it.")
        return out


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 48), (220, 20, 20)).save(root / "upper_bust_2022072011061710001_v2.png")
    Image.new("RGB", (48, 48), (20, 40, 220)).save(root / "whole_normal_2022072011061710002_v2.png")
    (root / "broken.jpg").write_bytes(b"not an image")
    items = [
        {"image": "upper_bust_2022072011061710001_v2.png",
         "reference_explanation": "A woman in a red dress with a low neckline shows her cleavage; the image is sexy.",
         "qa": [{"question": "Which part of the body is exposed?", "options": ["chest", "legs", "back", "nothing"], "answer": "A"},
                {"question": "Is the cleavage visible?", "answer": "Yes"}]},
        {"image": "whole_normal_2022072011061710002_v2.png", "category": "whole_normal",
         "reference_explanation": "A blue seascape; nothing in it is suggestive, so it is not sexy.",
         "qa": [{"question": "What does the clothing expose?", "options": ["chest", "nothing", "back", "legs"], "answer": "B"},
                {"question": "Is anything suggestive?", "answer": "No"}]},
        {"image": "broken.jpg", "label": "allow"},
    ]
    (root / "dataset.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    return root


def test_run_with_a_text_generating_backend(tmp_path):
    ds = _dataset(tmp_path / "set")
    assert len(load_dataset(ds).items) == 3
    backend = ScriptedVLM()
    out = tmp_path / "out"
    cfg = EvalRunConfig(dataset=str(ds), out_dir=str(out), offline_metric="lexical", name="scripted-run", confidence=0.9)
    s = run_evaluation(cfg, moderator=Moderator(backend, policy="icm-sexy"))
    # moderation: the red image is flagged, the blue one passes, the broken file is an error record
    icm = s.icm
    assert icm is not None and icm.n_evaluated == 2 and icm.n_unscored == 1
    assert (icm.confusion.tp, icm.confusion.tn, icm.confusion.fp, icm.confusion.fn) == (1, 1, 0, 0)
    assert s.meta["moderation_errors"] == 1
    # the broken file is a failure: out of accuracy, in coverage and strict accuracy (the manifest labels it)
    assert (icm.n_failed, icm.n_strict, icm.metrics["coverage"], icm.confidence) == (1, 3, 2 / 3, 0.9)
    assert icm.intervals["coverage"].confidence == 0.9 and (icm.intervals["coverage"].k, icm.intervals["coverage"].n) == (2, 3)
    # Q-A: answers read from the generated text; the blue image's multiple-choice answer "D" is wrong
    m = s.mqa
    assert m is not None and (m.mc.correct, m.mc.total, m.yes_no.correct, m.yes_no.total) == (1, 2, 2, 2)
    assert m.confidence == 0.9 and m.mc.accuracy_ci is not None and m.mc.accuracy_ci[0] < 0.5 < m.mc.accuracy_ci[1]
    qa = [json.loads(line) for line in (out / "qa.jsonl").read_text().splitlines()]
    assert len(qa) == 4 and {q["answer_source"] for q in qa} == {"generate"}
    assert any("A. chest" in p and "option's letter" in p for p in backend.prompts)
    # explanations: the model's, against the references, offline
    meq = s.meq
    assert meq is not None and meq.mode == "offline" and meq.n_items == 2 and meq.offline is not None
    assert all(it.offline is not None and 0 < it.offline.score < 100 for it in meq.items)
    assert meq.worst and meq.worst[0].candidate.startswith(("The woman", "A calm"))
    # outputs
    saved = json.loads((out / "summary.json").read_text())
    assert saved["name"] == "scripted-run" and saved["mqa"]["all"]["correct"] == 3
    page = (out / "report.html").read_text()
    for section in ("ICM accuracy", "Moderation Q-A", "Moderation explanation quality", "Lowest-scored explanations"):
        assert section in page
    records = (out / "records.jsonl").read_text().splitlines()
    assert len(records) == 3 and sum(1 for r in records if json.loads(r)["explanation"]) == 2


def test_cli_run_offline_detector_on_the_sample_photos_and_resume(tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLES, photos, ignore=shutil.ignore_patterns("*.md"))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,category\nchina.jpg,whole_normal\nflower.jpg,upper_normal\ngrace_hopper.jpg,upper_normal\n")
    out = tmp_path / "run"
    args = ["eval", "run", str(photos), "--labels", str(labels), "--out-dir", str(out), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["meta"]["backend"] == "detector" and s["icm"]["n_evaluated"] == 3
    c = s["icm"]["confusion"]
    assert (c["tn"], c["fp"]) == (3, 0)  # the safe photos pass
    assert s["mqa"] is None and s["meq"] is None
    assert (out / "summary.json").exists() and (out / "report.html").exists()
    first = (out / "records.jsonl").read_text()
    # a second run resumes: nothing is moderated again, the figures are the same
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0, r2.output
    assert (out / "records.jsonl").read_text() == first
    assert json.loads(r2.stdout)["icm"]["confusion"] == c
    # the two runs side by side
    a = out / "summary.json"
    r3 = runner.invoke(app, ["eval", "compare", str(a), str(a), "--html", str(tmp_path / "cmp.html")])
    assert r3.exit_code == 0, r3.output
    assert "Runs compared" in r3.output and "Runs compared" in (tmp_path / "cmp.html").read_text()


def test_cli_run_on_a_relative_folder_loads_every_image(tmp_path, monkeypatch):
    """``icm eval run examples/images``: a folder named relative to the working directory (the
    images were read from examples/images/examples/images/... and every one failed)."""
    shutil.copytree(EXAMPLES, tmp_path / "examples" / "images", ignore=shutil.ignore_patterns("*.md"))
    (tmp_path / "labels.csv").write_text("image,category\nchina.jpg,whole_normal\nflower.jpg,upper_normal\n"
                                         "grace_hopper.jpg,upper_normal\n")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["eval", "run", "examples/images", "--labels", "labels.csv", "--out-dir", "run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["icm"]["n_evaluated"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert sorted(rec["path"] for rec in records) == [f"examples/images/{n}" for n in ("china.jpg", "flower.jpg", "grace_hopper.jpg")]
    assert [rec["error"] for rec in records] == [None] * 3 and {rec["verdict"] for rec in records} == {"allow"}


def test_cli_run_notes_what_the_detector_cannot_do(tmp_path):
    ds = _dataset(tmp_path / "set")
    r = runner.invoke(app, ["eval", "run", str(ds), "--out-dir", str(tmp_path / "o")])
    assert r.exit_code == 1  # the broken file is a moderation error
    assert "Q-A not scored" in r.output and "explanation quality not scored" in r.output
    r = runner.invoke(app, ["eval", "run", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no such evaluation set" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg", "label": "perhaps"}\n')
    r = runner.invoke(app, ["eval", "run", str(bad), "--out-dir", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "perhaps" in r.output


@pytest.mark.parametrize("bad", ['{"not": "a summary"}', "[1, 2]", "{"])
def test_compare_rejects_what_is_not_a_summary(tmp_path, bad):
    f = tmp_path / "x.json"
    f.write_text(bad)
    r = runner.invoke(app, ["eval", "compare", str(f)])
    assert r.exit_code == 2 and "x.json" in r.output
