"""`icm moderate` end to end: the main job, bad input, resume after a kill, the cascade."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.engine import Moderator
from icm.moderation.job import ModerateConfig, read_records, run_job

from serve_helpers import ColourBackend

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
runner = CliRunner()


class RednessBackend(ColourBackend):
    """The scripted model of tests/serve_helpers.py (redness is its evidence: red images
    violate, others are "normal"/"none"), counting its calls and the images it saw."""

    name = "redness"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.images_seen = 0

    def score_yes_no(self, images, questions):
        self.calls += 1
        self.images_seen += len(images)
        return super().score_yes_no(images, questions)


def _solid(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_main_job_on_the_sample_photos(tmp_path):
    """The README's first command: every bundled safe photo is allowed, records are complete."""
    out = tmp_path / "results.jsonl"
    result = runner.invoke(app, ["moderate", str(EXAMPLES), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records, bad = read_records(out)
    assert bad == 0
    photos = sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    assert sorted(Path(r.path).name for r in records) == photos
    for r in records:
        assert r.ok and r.verdict == "allow", r
        assert r.term.p_yes is not None and r.term.p_yes < 0.2 and r.term.source == "open_nsfw"
        assert len(r.sha256) == 64 and r.width > 0 and r.bytes == (EXAMPLES / Path(r.path).name).stat().st_size
        assert r.policy == "icm-sexy" and r.rules == "icm-default" and r.backend == "detector"
        assert {"action", "cue"} <= set(r.not_judged)  # the detector never guesses actions
        assert r.reason
    assert "allow: 3" in result.output.replace("\n", " ")


def test_bad_inputs_are_errors_naming_the_file_and_the_batch_goes_on(tmp_path):
    good = _solid(tmp_path / "good.png", (0, 0, 255))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    data = (EXAMPLES / "china.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["moderate", str(tmp_path), str(tmp_path / "missing.jpg"), "--out", str(out)])
    assert result.exit_code == 1, result.output
    records, _ = read_records(out)
    by_name = {Path(r.path).name: r for r in records}
    assert set(by_name) == {"good.png", "empty.jpg", "notes.png", "truncated.jpg", "missing.jpg"}
    assert by_name["good.png"].ok and by_name["good.png"].verdict == "allow"
    assert "empty" in by_name["empty.jpg"].error and "empty.jpg" in by_name["empty.jpg"].error
    assert "notes.png" in by_name["notes.png"].error and "text" in by_name["notes.png"].error
    assert "truncated" in by_name["truncated.jpg"].error
    assert "missing.jpg" in by_name["missing.jpg"].error
    assert good.exists()


def test_usage_errors_exit_2():
    assert runner.invoke(app, ["moderate", str(EXAMPLES), "--policy", "nope"]).exit_code == 2
    r = runner.invoke(app, ["moderate", str(EXAMPLES), "--rules", "martian"])
    assert r.exit_code == 2 and "martian" in r.output
    r = runner.invoke(app, ["moderate", str(EXAMPLES), "--backend", "hf"])
    assert r.exit_code == 2 and "--model" in r.output
    assert runner.invoke(app, ["moderate", str(EXAMPLES), "--backend", "quantum"]).exit_code == 2
    assert runner.invoke(app, ["moderate"]).exit_code == 2
    assert runner.invoke(app, ["moderate", str(EXAMPLES), "--resume"]).exit_code == 2


def test_json_output_and_stdin_list(tmp_path):
    listing = "\n".join(str(p) for p in sorted(EXAMPLES.glob("*.jpg"))) + "\n"
    result = runner.invoke(app, ["moderate", "-", "--json", "--rules", "children"], input=listing)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(lines) == 3 and all(r["rules"] == "children" and r["verdict"] == "allow" for r in lines)


def test_rule_set_changes_the_verdict_not_the_evidence(tmp_path):
    """The same scripted evidence (a red image = first product), three rule sets."""
    img = _solid(tmp_path / "red.png", (250, 5, 5))
    verdicts = {}
    for rules in ("icm-default", "adult-platform", "general-audience"):
        mod = Moderator(RednessBackend(), policy="icm-sexy", rules=rules)
        (r,) = mod.moderate_paths([str(img)])
        verdicts[rules] = (r.product, r.label, r.verdict)
    # red -> region=upper (first), exposure=shoulders (first), action=kiss, cue=wet_clothes;
    # the most likely product is the same under every rule set, only its label changes
    products = {v[0] for v in verdicts.values()}
    assert len(products) == 1
    assert verdicts["icm-default"][1] == "violate"
    assert verdicts["adult-platform"][1] == "allow" and verdicts["adult-platform"][2] == "allow"


def test_explanations_and_blue_images_allowed(tmp_path):
    blue = _solid(tmp_path / "blue.png", (5, 5, 250))
    mod = Moderator(RednessBackend(), policy="icm-sexy", explain=True)
    (r,) = mod.moderate_paths([str(blue)])
    assert r.verdict == "allow" and r.product.endswith("_normal") and r.explanation == "Nothing red here."
    assert r.basis == "attributes" and not r.not_judged


def test_resume_after_an_interrupted_run_has_every_record_once(tmp_path):
    images = [_solid(tmp_path / f"img{i:02d}.png", (200 if i % 2 else 0, 0, 200)) for i in range(10)]
    out = tmp_path / "out.jsonl"

    class Interrupt(BaseException):
        pass

    class Dying(RednessBackend):
        def score_yes_no(self, images, questions):
            if self.images_seen >= 6:
                raise Interrupt("killed")
            return super().score_yes_no(images, questions)

    cfg = ModerateConfig(inputs=[str(tmp_path)], out=str(out), batch_size=2)
    with pytest.raises(Interrupt):
        run_job(cfg, moderator=Moderator(Dying(), policy="icm-sexy"))
    first, _ = read_records(out)
    assert 0 < len(first) < 10
    with open(out, "a") as fh:  # the kill came mid-write: a half line at the end
        fh.write('{"path": "img09.png", "poli')
    # a failure recorded earlier is retried on resume, not kept twice
    fresh = RednessBackend()
    cfg.resume = True
    summary = run_job(cfg, moderator=Moderator(fresh, policy="icm-sexy"))
    records, bad = read_records(out)
    assert bad == 0
    assert sorted(Path(r.path).name for r in records) == sorted(p.name for p in images)
    assert summary.skipped == len(first)
    assert fresh.images_seen == 10 - len(first)
    # a changed file is moderated again
    _solid(images[0], (1, 2, 3))
    again = RednessBackend()
    run_job(cfg, moderator=Moderator(again, policy="icm-sexy"))
    assert again.images_seen == 1
    records, _ = read_records(out)
    assert len([r for r in records if r.path.endswith("img00.png")]) == 2  # old and new content


def test_real_kill_and_resume_through_the_cli(tmp_path):
    """SIGKILL the CLI mid-run, resume it, and find each image exactly once."""
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(60):
        shutil.copy(EXAMPLES / ["china.jpg", "flower.jpg", "grace_hopper.jpg"][i % 3], src / f"p{i:03d}.jpg")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "icm.cli.main", "moderate", str(src), "--out", str(out), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:  # three complete records
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    partial, _ = read_records(out)
    done = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records, bad = read_records(out)
    assert bad == 0
    names = [Path(r.path).name for r in records]
    assert len(names) == len(set(names)) == 60
    assert all(r.ok for r in records)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 3 <= len(partial) < 60


def test_cascade_escalates_only_what_the_first_stage_cannot_clear(tmp_path):
    red = _solid(tmp_path / "red.png", (250, 5, 5))
    blue = _solid(tmp_path / "blue.png", (5, 5, 250))
    first, second = RednessBackend(), RednessBackend()
    first.name, second.name = "screen", "mllm"
    mod = Moderator(first, policy="icm-sexy", escalate_to=second)
    # the first stage only answers the term question, like a detector
    first.capabilities = frozenset({"score_yes_no"})
    r_blue, r_red = mod.moderate_paths([str(blue), str(red)])
    assert r_blue.stage == "screen" and r_blue.verdict == "allow"
    assert r_red.stage == "mllm" and r_red.product is not None and r_red.basis == "attributes"
    assert r_red.notes and "escalated" in r_red.notes[0]
    assert second.images_seen == 1 and r_red.backend == "cascade"


def test_a_failing_backend_fails_only_its_image(tmp_path):
    good = _solid(tmp_path / "a.png", (0, 0, 250))
    poison = _solid(tmp_path / "b.png", (0, 250, 0))

    class Fragile(RednessBackend):
        def score_yes_no(self, images, questions):
            if any(np.asarray(im)[..., 1].mean() > 200 for im in images):
                raise RuntimeError("CUDA out of memory")
            return super().score_yes_no(images, questions)

    records = Moderator(Fragile(), policy="icm-sexy").moderate_paths([str(good), str(poison)])
    assert records[0].ok and records[0].verdict == "allow"
    assert not records[1].ok and "CUDA out of memory" in records[1].error and records[1].path.endswith("b.png")


def test_library_api_matches_the_cli(tmp_path):
    import icm

    records = icm.moderate([str(EXAMPLES / "flower.jpg")], rules="general-audience")
    assert len(records) == 1 and records[0].ok and records[0].rules == "general-audience"
    assert records[0].verdict == "allow"


def test_paths_and_errors_with_brackets_are_printed_literally(tmp_path):
    """Rich markup must not eat '[...]' in file names or messages (e.g. 'icm-assistant[serve]')."""
    odd = tmp_path / "holiday [serve].png"
    odd.write_text("not an image")
    result = runner.invoke(app, ["moderate", str(odd)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "[serve].png" in result.output and "holiday" in result.output


class Scripted(RednessBackend):
    """Answers through RednessBackend, then replaces the answers of some queries."""

    def __init__(self, replace: dict[str, object]) -> None:
        super().__init__()
        self.replace = replace

    def ask(self, images, queries):
        out = super().ask(images, queries)
        for slot in out:
            slot.update({k: v for k, v in self.replace.items() if k in slot})
        return out


def test_one_failed_query_makes_the_image_an_error_not_a_verdict(tmp_path):
    from icm.moderation.backends.base import Failed

    red = _solid(tmp_path / "red.png", (250, 5, 5))
    mod = Moderator(Scripted({"attr:action": Failed("HTTP 503 from http://vlm/v1/chat/completions: busy (gave up after 4 attempts)", 503)}),
                    policy="icm-sexy")
    (r,) = mod.moderate_paths([str(red)])
    assert not r.ok and r.verdict is None and r.product is None and r.p_violation is None
    assert r.error.startswith("redness backend failed on 1 of 5 queries: attr:action: HTTP 503")
    assert r.failed_queries == {"attr:action": "HTTP 503 from http://vlm/v1/chat/completions: busy (gave up after 4 attempts)"}
    assert r.sha256 and r.width == 32  # the image is identified, so --resume retries it


def test_refused_and_off_format_answers_are_never_allowed(tmp_path):
    from icm.moderation.backends.base import NotJudged

    blue = _solid(tmp_path / "blue.png", (5, 5, 250))  # RednessBackend allows it when it answers everything
    (ok,) = Moderator(Scripted({}), policy="icm-sexy").moderate_paths([str(blue)])
    assert ok.verdict == "allow" and ok.unanswered == {}

    refused = NotJudged("refused", "answered \"I'm sorry, but I can't help with that.\"", {"text": "I'm sorry, but I can't help with that."})
    (r,) = Moderator(Scripted({"attr:cue": refused}), policy="icm-sexy").moderate_paths([str(blue)])
    assert r.ok and r.verdict == "review" and r.basis == "refused" and r.product is None and r.p_violation is None
    assert r.unanswered["attr:cue"].startswith("refused") and "I'm sorry" in r.reason
    assert r.attributes["region"] and "cue" in r.not_judged  # what was answered is kept as evidence

    (o,) = Moderator(Scripted({"attr:cue": NotJudged("off-format", "answered 'Maybe'")}), policy="icm-sexy").moderate_paths([str(blue)])
    assert o.ok and o.verdict == "review" and o.unanswered == {"attr:cue": "off-format: answered 'Maybe'"}

    # cannot-judge (a detector asked about an action) leaves the attribute out and decides on the rest
    (c,) = Moderator(Scripted({"attr:cue": NotJudged("cannot-judge")}), policy="icm-sexy").moderate_paths([str(blue)])
    assert c.ok and c.basis != "refused" and c.unanswered == {"attr:cue": "cannot-judge"}


def test_a_configuration_error_stops_the_job_and_keeps_what_was_done(tmp_path):
    from icm.moderation.backends.base import BackendConfigError

    for i in range(4):
        _solid(tmp_path / f"img{i}.png", (0, 0, 200))
    out = tmp_path / "out.jsonl"

    class Revoked(RednessBackend):
        def ask(self, images, queries):
            if self.calls >= 1:
                raise BackendConfigError("openai backend: the API key was rejected")
            self.calls += 1
            return super().ask(images, queries)

    with pytest.raises(BackendConfigError, match="API key"):
        run_job(ModerateConfig(inputs=[str(tmp_path)], out=str(out), batch_size=2), moderator=Moderator(Revoked(), policy="icm-sexy"))
    records, _ = read_records(out)
    assert len(records) == 2 and all(r.ok for r in records)  # the first batch; no error record per image


def test_resume_redoes_records_of_a_policy_whose_content_changed(tmp_path):
    """A calibrated policy keeps its name and rule-set names; its old records must not count as done."""
    from icm.policy import load_policy

    (tmp_path / "in").mkdir()
    for i in range(3):
        _solid(tmp_path / "in" / f"img{i}.png", (200, 0, 0))
    out = tmp_path / "out.jsonl"
    import icm.policies

    text = (Path(icm.policies.__file__).parent / "icm-sexy.yaml").read_text()
    policy_file = tmp_path / "icm-sexy.yaml"
    policy_file.write_text(text)
    cfg = ModerateConfig(inputs=[str(tmp_path / "in")], out=str(out), policy=str(policy_file), resume=True)
    first = RednessBackend()
    run_job(cfg, moderator=Moderator(first, policy=load_policy(str(policy_file))))
    assert first.images_seen == 3
    same = RednessBackend()  # the same file again: everything is done
    assert run_job(cfg, moderator=Moderator(same, policy=load_policy(str(policy_file)))).skipped == 3
    assert same.images_seen == 0
    # new thresholds of one rule set, same names: every image is decided again
    assert "thresholds: {review: 0.5, block: 0.9}" in text
    policy_file.write_text(text.replace("thresholds: {review: 0.5, block: 0.9}", "thresholds: {review: 0.45, block: 0.9}"))
    changed = load_policy(str(policy_file))
    assert changed.name == "icm-sexy"
    again = RednessBackend()
    summary = run_job(cfg, moderator=Moderator(again, policy=changed))
    assert summary.skipped == 0 and again.images_seen == 3
    records, _ = read_records(out)
    assert len({r.policy_digest for r in records}) == 2 and all(r.policy_digest for r in records)
