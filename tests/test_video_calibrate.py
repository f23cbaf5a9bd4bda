"""`icm eval calibrate --video`: min_run, window (and a per-frame block threshold) chosen on labelled videos.

Video records are built from their frames' scores (what `icm moderate` writes in
``frame_scores``): no media is decoded. Frames block at P >= 0.7 (synth-shapes ``general``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.labels import LabelResolver, read_labels
from icm.evaluation.results import read_results
from icm.evaluation.video_calibrate import calibrate_video, redecide_video
from icm.moderation.corroborate import aggregate_video
from icm.moderation.record import FrameScore, ModerationRecord
from icm.policy import load_policy
from icm.policy.model import Thresholds, VideoAggregation

runner = CliRunner()
POLICY = load_policy("synth-shapes")
CALM, HIT = 0.1, 0.9


def video(path: str, frames: list[float], aggregate: str = "worst") -> ModerationRecord:
    """A video record as the engine writes it under the worst frame (the kept frame is the worst)."""
    verdicts = ["block" if p >= 0.7 else "review" if p >= 0.3 else "allow" for p in frames]
    worst = max(range(len(frames)), key=lambda i: frames[i])
    return ModerationRecord(
        path=path, policy="synth-shapes", rules="general", backend="scripted", p_violation=frames[worst],
        verdict=verdicts[worst], label="violate" if frames[worst] >= 0.7 else "allow", product="whole_bare_still",  # type: ignore[arg-type]
        basis="products", aggregate=aggregate, frame=worst,  # type: ignore[arg-type]
        frame_scores=[FrameScore(frame=i, timestamp=float(i), p_violation=p, verdict=v) for i, (p, v) in enumerate(zip(frames, verdicts, strict=True))],  # type: ignore[arg-type]
    )


def frames_with(n: int, hits: dict[int, float]) -> list[float]:
    return [hits.get(i, CALM) for i in range(n)]


def corroboration_set() -> tuple[list[ModerationRecord], dict[str, bool]]:
    """20 clean and 20 violating videos of 12 sampled frames.

    Clean: 10 with one chance blocking frame, 3 with two blocking frames one apart (3 and 5),
    7 with none. Violating: 18 with a run of four blocking frames, 2 with three spaced ones
    (2, 4, 6). The worst frame blocks 13 clean videos; 3 of any 5 consecutive frames blocks
    none of them and every violating video; 2 in a row would lose the 2 spaced ones (10 points).
    """
    recs: list[ModerationRecord] = []
    truth: dict[str, bool] = {}
    for i in range(20):
        hits = {i % 12: HIT} if i < 10 else {3: HIT, 5: HIT} if i < 13 else {}
        recs.append(video(f"vids/c{i:02d}.mp4", frames_with(12, hits)))
        truth[f"c{i:02d}.mp4"] = False
    for i in range(20):
        hits = {j: HIT for j in range(4, 8)} if i < 18 else {2: HIT, 4: HIT, 6: HIT}
        recs.append(video(f"vids/v{i:02d}.mp4", frames_with(12, hits)))
        truth[f"v{i:02d}.mp4"] = True
    return recs, truth


def write_set(tmp_path: Path, recs: list[ModerationRecord], truth: dict[str, bool]) -> tuple[Path, Path]:
    res = tmp_path / "results.jsonl"
    res.write_text("".join(r.model_dump_json() + "\n" for r in recs))
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        for k, v in truth.items():
            w.writerow([k, "violate" if v else "allow"])
    return res, labels


def run_calibration(tmp_path: Path, recs: list[ModerationRecord], truth: dict[str, bool], **kw: object):  # type: ignore[no-untyped-def]
    res, labels = write_set(tmp_path, recs, truth)
    resolver = LabelResolver(POLICY, "general", labels=read_labels(labels))
    return calibrate_video(read_results(res), resolver, labels_source=str(labels), **kw)  # type: ignore[arg-type]


def test_chosen_setting_meets_the_recall_goal_and_redecides_the_records(tmp_path: Path) -> None:
    recs, truth = corroboration_set()
    rep = run_calibration(tmp_path, recs, truth)
    assert rep.ok and rep.goal == "recall_loss" and rep.recall_loss == 0.01
    assert (rep.n, rep.n_violations, rep.n_clean) == (40, 20, 20)
    assert (rep.baseline.min_run, rep.baseline.window, rep.baseline.clean_blocked, rep.baseline.violating_blocked) == (1, 1, 13, 20)
    assert rep.chosen is not None
    assert (rep.chosen.min_run, rep.chosen.window, rep.chosen.clean_blocked, rep.chosen.violating_blocked) == (3, 5, 0, 20)
    assert rep.video == VideoAggregation(aggregate="corroborate", min_run=3, window=5)
    # every setting searched is in the table: min_run 1..5, window min_run..min_run+3
    assert sorted((c.min_run, c.window) for c in rep.candidates) == [(m, w) for m in range(1, 6) for w in range(m, m + 4)]
    two_in_a_row = next(c for c in rep.candidates if (c.min_run, c.window) == (2, 2))
    assert (two_in_a_row.clean_blocked, two_in_a_row.violating_blocked, two_in_a_row.meets) == (0, 18, False)
    # no moderation again: each record's verdict from its frame_scores under the chosen setting
    got = {Path(r.path).name: redecide_video(r, rep.video) for r in recs}
    assert sum(1 for k, v in got.items() if v == "block" and not truth[k]) == 0
    assert sum(1 for k, v in got.items() if v == "block" and truth[k]) == 20
    assert {got[f"c{i:02d}.mp4"] for i in range(13)} == {"review"}  # a chance blocking frame still goes to a person
    assert sum(v == "review" for v in got.values()) == rep.chosen.reviewed == 13
    assert sum(redecide_video(r, None) == "block" and not truth[Path(r.path).name] for r in recs) == 13  # the worst frame


def test_redecided_verdict_is_the_engines(tmp_path: Path) -> None:
    """redecide_video from frame_scores gives what aggregate_video gives on the frames' own records."""
    def frame(p: float) -> ModerationRecord:
        return ModerationRecord(path="v.mp4", policy="synth-shapes", rules="general", backend="b", p_violation=p,
                                verdict="block" if p >= 0.7 else "review" if p >= 0.3 else "allow",
                                label="violate" if p >= 0.3 else "allow", product="x", basis="products")
    patterns = [[0.9, 0.1, 0.9, 0.1, 0.9], [0.9, 0.9], [0.1, 0.5, 0.1], [0.1, 0.1], [0.9, 0.1, 0.1, 0.9, 0.9, 0.9], [0.8, 0.95, 0.75]]
    for ps in patterns:
        rec = video("v.mp4", ps)
        for m in range(1, 6):
            for w in range(m, m + 4):
                cfg = VideoAggregation(aggregate="corroborate", min_run=m, window=w)
                assert redecide_video(rec, cfg) == aggregate_video([frame(p) for p in ps], cfg).verdict, (ps, m, w)


def test_false_block_goal_and_zero_tolerance_video(tmp_path: Path) -> None:
    recs, truth = corroboration_set()
    rep = run_calibration(tmp_path, recs, truth, false_block=0.2)
    assert rep.ok and rep.chosen is not None and rep.goal == "false_block"
    assert (rep.chosen.min_run, rep.chosen.window, rep.chosen.clean_blocked, rep.chosen.violating_blocked) == (3, 5, 0, 20)
    # a clean video blocked as zero-tolerance is blocked whatever the setting: 0 false blocks is out of reach
    recs.append(video("vids/z.mp4", frames_with(12, {0: HIT}), aggregate="zero-tolerance"))
    truth["z.mp4"] = False
    rep = run_calibration(tmp_path, recs, truth, false_block=0.0)
    assert not rep.ok and rep.chosen is None and rep.video is None
    assert all(c.clean_blocked >= 1 for c in rep.candidates)
    assert "no setting blocks at most 0 of the clean videos" in rep.message


def test_frame_threshold_search_never_splits_equal_scores(tmp_path: Path) -> None:
    """Chance blocking frames score 0.75 (8 clean videos) or 0.9 (2 clean videos, 1e-12 apart); violations score 0.95.

    One violating video has a single blocking frame, so corroboration alone loses it (more
    than 1 point); raising the per-frame block threshold to 0.94 blocks no clean video and
    every violating one, and no threshold falls between the two 0.9 scores.
    """
    recs: list[ModerationRecord] = []
    truth: dict[str, bool] = {}
    for i in range(20):
        hits = {5: 0.75} if i < 8 else {5: 0.9} if i == 8 else {5: 0.9 + 1e-12} if i == 9 else {}
        recs.append(video(f"vids/c{i:02d}.mp4", frames_with(10, hits)))
        truth[f"c{i:02d}.mp4"] = False
    for i in range(11):
        hits = {3: 0.95, 4: 0.95} if i < 10 else {6: 0.95}
        recs.append(video(f"vids/v{i:02d}.mp4", frames_with(10, hits)))
        truth[f"v{i:02d}.mp4"] = True
    plain = run_calibration(tmp_path, recs, truth)
    assert plain.chosen is not None and (plain.chosen.min_run, plain.chosen.clean_blocked) == (1, 10)
    rep = run_calibration(tmp_path, recs, truth, frame_threshold=True)
    assert rep.frame_thresholds == [0.8, 0.94] and rep.n_searched == 20 * 3
    assert rep.chosen is not None
    assert (rep.chosen.min_run, rep.chosen.window, rep.chosen.frame_block) == (1, 1, 0.94)
    assert (rep.chosen.clean_blocked, rep.chosen.violating_blocked) == (0, 11)
    assert rep.video is not None and rep.video.thresholds is not None
    assert (rep.video.thresholds.review, rep.video.thresholds.block) == (0.3, 0.94)
    for c in rep.candidates:  # the two 0.9 videos always share a verdict
        for t in (None, *rep.frame_thresholds):
            cfg = VideoAggregation(aggregate="corroborate", min_run=c.min_run, window=c.window,
                                   thresholds=None if t is None else Thresholds(review=0.3, block=t))
            assert redecide_video(recs[8], cfg) == redecide_video(recs[9], cfg)
    assert [redecide_video(r, rep.video) for r in recs].count("block") == 11


def test_cli_writes_the_video_block_and_ignores_stills(tmp_path: Path) -> None:
    recs, truth = corroboration_set()
    still = ModerationRecord(path="vids/still.jpg", policy="synth-shapes", rules="general", backend="scripted", p_violation=0.9,
                             verdict="block", label="violate", product="whole_bare_still", basis="products")
    res, labels = write_set(tmp_path, [*recs, still], {**truth, "still.jpg": False})
    out = tmp_path / "calibrated.yaml"
    r = runner.invoke(app, ["eval", "calibrate", str(res), "--labels", str(labels), "--video", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "min_run 3, window 5" in r.output and "1 record(s) are not videos" in r.output
    calibrated = load_policy(str(out))
    assert calibrated.rule_set("general").video == VideoAggregation(aggregate="corroborate", min_run=3, window=5)
    assert calibrated.rule_set("teen").video is None
    assert calibrated.rule_set("general").thresholds == POLICY.rule_set("general").thresholds
    text = out.read_text()
    assert text.startswith("# Calibrated by `icm eval calibrate` --video") and "clean videos blocked 0/20 (worst frame 13)" in text
    # calibrating the calibrated policy again replaces the block (and the header), it does not add one
    r = runner.invoke(app, ["eval", "calibrate", str(res), "--labels", str(labels), "--video", "--policy", str(out),
                            "--false-block", "0.2", "--json", "--out", str(tmp_path / "again.yaml")])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["n_stills"] == 1 and data["video"]["min_run"] == 3 and data["written"]
    again = (tmp_path / "again.yaml").read_text()
    assert again.count("video:") == 1 and again.count("# Calibrated by") == 1
    # an unmeetable goal writes nothing and exits 1 (a clean video blocked as zero-tolerance blocks whatever the setting)
    zt = video("vids/z.mp4", frames_with(12, {0: HIT}), aggregate="zero-tolerance")
    res, labels = write_set(tmp_path, [*recs, zt], {**truth, "z.mp4": False})
    r = runner.invoke(app, ["eval", "calibrate", str(res), "--labels", str(labels), "--video", "--false-block", "0",
                            "--out", str(tmp_path / "none.yaml")])
    assert r.exit_code == 1 and "cannot be met" in r.output and not (tmp_path / "none.yaml").exists()
    # mixing the stills' targets in is refused
    r = runner.invoke(app, ["eval", "calibrate", str(res), "--labels", str(labels), "--video", "--block-precision", "0.9"])
    assert r.exit_code != 0 and "--video chooses the video setting only" in r.output


@pytest.mark.parametrize("bad", [["--recall-loss", "2"], ["--recall-loss", "0.1", "--false-block", "0.1"], ["--by", "bound"]])
def test_bad_video_goals_are_refused(tmp_path: Path, bad: list[str]) -> None:
    recs, truth = corroboration_set()
    res, labels = write_set(tmp_path, recs, truth)
    r = runner.invoke(app, ["eval", "calibrate", str(res), "--labels", str(labels), "--video", *bad, "--dry-run"])
    assert r.exit_code == 2 and any(w in r.output for w in ("between 0 and 1", "name one video goal", "point estimates only"))
