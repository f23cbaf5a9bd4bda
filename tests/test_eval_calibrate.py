"""`icm eval calibrate`: thresholds for named targets, the trade-off table, the policy file it writes."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.calibrate import calibrate, verdict_at
from icm.evaluation.gaps import simplest_between
from icm.evaluation.labels import LabelResolver, read_labels
from icm.evaluation.results import read_results
from icm.policy import decide, load_policy

runner = CliRunner()
POLICY = load_policy("icm-sexy")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"

# A set whose right thresholds are known (term scores under icm-default, where P(violation) = P(sexy)):
#   30 clean images at 0.02 ... 0.31, one clean at 0.55 and one at 0.75 (a false alarm);
#   violations: one at 0.205 and one at 0.45 (hard to see), twenty at 0.80 ... 0.99.
# Block precision >= 0.95: blocking from 0.75 catches 20 violations and 1 clean (20/21 = 0.952);
#   from 0.55 down it would be 20/22 = 0.909; the gap (0.55, 0.75] is written as 0.7.
# Allow miss <= 0.05 (at most 1 of the 22 violations allowed): allowing below 0.45 misses only
#   the one at 0.205; above 0.45 it misses two; the gap (0.31, 0.45] is written as 0.4.
CLEAN = [round(0.02 + 0.01 * i, 3) for i in range(30)] + [0.55, 0.75]
VIOLATING = [0.205, 0.45] + [round(0.80 + 0.01 * i, 3) for i in range(20)]


def _record(path: str, p: float, rules: str = "icm-default") -> dict:
    d = decide(POLICY, rules, p_term=p)
    return {"path": path, "sha256": hashlib.sha256(path.encode()).hexdigest(), "policy": "icm-sexy", "rules": rules,
            "backend": "scripted", "model": "m",
            "term": {"term": "sexy", "question": "Is the image sexy?", "p_yes": p, "source": "logits"},
            "p_violation": d.p_violation, "p_violation_range": list(d.p_violation_range), "basis": d.basis,
            "label": d.label.verdict if d.label else None, "verdict": d.verdict}


def _dataset(tmp_path: Path, *, extra: list[dict] | None = None) -> tuple[Path, Path, dict[str, float], dict[str, bool]]:
    scores: dict[str, float] = {}
    truth: dict[str, bool] = {}
    for i, p in enumerate(CLEAN):
        scores[f"imgs/c{i:02d}.jpg"], truth[f"imgs/c{i:02d}.jpg"] = p, False
    for i, p in enumerate(VIOLATING):
        scores[f"imgs/v{i:02d}.jpg"], truth[f"imgs/v{i:02d}.jpg"] = p, True
    records = [_record(k, p) for k, p in scores.items()] + (extra or [])
    res = tmp_path / "results.jsonl"
    res.write_text("".join(json.dumps(r) + "\n" for r in records))
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        for k, v in truth.items():  # by file name, as a labelling tool exports them
            w.writerow([Path(k).name, "violate" if v else "allow"])
    return res, labels, scores, truth


def test_simplest_threshold_in_a_gap():
    # the decimal with the fewest digits strictly between the two scores, the closest to the upper one
    assert simplest_between(0.55, 0.75) == 0.7
    assert simplest_between(0.31, 0.45) == 0.4
    assert simplest_between(0.80, 0.81) == 0.809  # never a score itself: 0.81 is one
    assert simplest_between(0.8123, 0.8124) == 0.81239
    assert simplest_between(-1.0, 0.02) == 0.0
    assert simplest_between(0.62, 0.6261241772283035) == 0.626
    assert simplest_between(0.5999, 0.7) == 0.6


def test_verdict_rule_matches_decide():
    # term only: no product, so both ends of the range count
    for rules in ("icm-default", "general-audience", "children"):
        rs = POLICY.rule_set(rules)
        for p in (0.0, 0.1, 0.3, 0.5, 0.7, 0.95, 1.0):
            d = decide(POLICY, rs, p_term=p)
            assert verdict_at(d.violates, *d.p_violation_range, rs.thresholds.review, rs.thresholds.block) == d.verdict
    # a decision that allows is never blocked, one that violates never allowed
    assert verdict_at(False, 0.99, 0.99, 0.3, 0.7) == "review"
    assert verdict_at(True, 0.01, 0.01, 0.3, 0.7) == "review"


def test_calibrate_finds_the_known_thresholds_and_decide_keeps_the_promise(tmp_path):
    res, labels, scores, truth = _dataset(tmp_path)
    out = tmp_path / "calibrated.yaml"
    r = runner.invoke(app, ["eval", "calibrate", str(res), "--labels", str(labels), "--block-precision", "0.95",
                            "--allow-miss", "0.05", "--out", str(out)])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # rich wraps long lines
    assert "Block threshold varied" in said and "Review threshold varied" in said and "met: block precision >= 0.95 met at block 0.7" in said
    text = out.read_text()
    assert text.startswith("# Calibrated by `icm eval calibrate`")
    assert "thresholds review 0.3 -> 0.4, block 0.7 -> 0.7" in text and "--rules icm-default" in text
    # the written file is a whole policy that `--policy` loads, with the new thresholds of that rule set only
    pol = load_policy(str(out))
    assert pol.name == "icm-sexy"
    th = pol.rule_set("icm-default").thresholds
    assert (th.review, th.block) == (0.4, 0.7)
    assert pol.rule_set("children").thresholds == POLICY.rule_set("children").thresholds
    # decide() under the written policy gives the verdicts the table promised
    rep = json.loads(runner.invoke(app, ["eval", "calibrate", str(res), "--labels", str(labels), "--block-precision", "0.95",
                                         "--allow-miss", "0.05", "--dry-run", "--json"]).stdout)
    chosen = rep["chosen"]
    verdicts = {k: decide(pol, "icm-default", p_term=p).verdict for k, p in scores.items()}
    blocked = [k for k, v in verdicts.items() if v == "block"]
    allowed = [k for k, v in verdicts.items() if v == "allow"]
    assert (len(blocked), len(allowed), len(scores) - len(blocked) - len(allowed)) == (chosen["blocked"], chosen["allowed"], chosen["reviewed"]) == (21, 31, 2)
    assert sum(truth[k] for k in blocked) / len(blocked) == pytest.approx(chosen["block_precision"]) == pytest.approx(20 / 21)
    assert sum(truth[k] for k in allowed) == chosen["missed"] == 1 and chosen["allow_miss"] == pytest.approx(1 / 22)
    lo, hi = chosen["block_precision_ci"]
    assert lo < 20 / 21 < hi and rep["written"] is None and not (tmp_path / "icm-sexy-icm-default-calibrated.yaml").exists()
    assert rep["current"]["review"] == 0.3 and rep["current"]["blocked"] == 21  # block 0.7 already; review 0.3 allowed fewer
    assert rep["verdict_mismatches"] == 0


def test_another_rule_set_is_decided_again_and_a_calibrated_file_calibrates_again(tmp_path):
    res, labels, _, _ = _dataset(tmp_path)
    first = tmp_path / "children.yaml"
    r = runner.invoke(app, ["eval", "calibrate", str(res), "-l", str(labels), "--rules", "children", "--block-precision", "0.95",
                            "--allow-miss", "0.05", "-o", str(first), "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert j["rules"] == "children" and j["re_decided"] == 54 and (j["chosen"]["review"], j["chosen"]["block"]) == (0.4, 0.7)
    pol = load_policy(str(first))
    assert (pol.rule_set("children").thresholds.review, pol.rule_set("children").thresholds.block) == (0.4, 0.7)
    assert pol.rule_set("icm-default").thresholds == POLICY.rule_set("icm-default").thresholds
    # calibrating the calibrated file again keeps one header and the earlier calibration
    second = tmp_path / "again.yaml"
    r = runner.invoke(app, ["eval", "calibrate", str(res), "-l", str(labels), "--policy", str(first), "--rules", "icm-default",
                            "--allow-miss", "0.05", "-o", str(second), "--json"])
    assert r.exit_code == 0, r.output
    text = second.read_text()
    assert text.count("# Calibrated by") == 1 and "review 0.3 -> 0.4" in text
    assert load_policy(str(second)).rule_set("children").thresholds.review == 0.4  # the first calibration is kept
    # records written at review 0.3 do not get their verdicts at review 0.4 (0.30 and 0.31 were reviewed): flagged
    j = json.loads(runner.invoke(app, ["eval", "calibrate", str(res), "-l", str(labels), "--policy", str(second), "--allow-miss", "0.05",
                                       "--dry-run", "--json"]).stdout)
    assert j["verdict_mismatches"] == 2 and any("older decision model" in n for n in j["notes"])


def test_icm_moderate_runs_with_the_written_policy(tmp_path):
    res, labels, _, _ = _dataset(tmp_path)
    out = tmp_path / "calibrated.yaml"
    assert runner.invoke(app, ["eval", "calibrate", str(res), "-l", str(labels), "--allow-miss", "0.05", "-o", str(out)]).exit_code == 0
    recs = tmp_path / "mod.jsonl"
    r = runner.invoke(app, ["moderate", str(EXAMPLES), "--policy", str(out), "--rules", "icm-default", "--out", str(recs)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in recs.read_text().splitlines() if x.strip()]
    assert len(lines) == 3 and all(x["policy"] == "icm-sexy" and x["rules"] == "icm-default" for x in lines)
    th = load_policy(str(out)).rule_set("icm-default").thresholds
    for x in lines:  # the verdicts follow the written thresholds
        lo, hi = x["p_violation_range"]
        v = {"violate": True, "allow": False}.get(x["label"] or "")
        assert x["verdict"] == verdict_at(v, lo, hi, th.review, th.block)


def test_unreachable_target_says_so_and_exits_1(tmp_path):
    # the highest-scored image is clean: no block threshold blocks only violations
    res, labels, _, _ = _dataset(tmp_path, extra=[_record("imgs/c99.jpg", 0.999)])
    with labels.open("a") as f:
        f.write("c99.jpg,allow\n")
    out = tmp_path / "never.yaml"
    r = runner.invoke(app, ["eval", "calibrate", str(res), "-l", str(labels), "--block-precision", "1.0", "-o", str(out)])
    assert r.exit_code == 1
    said = " ".join(r.output.split())  # rich wraps long lines
    assert "NOT MET" in said and "block precision >= 1 cannot be met on this data" in said and "no policy file written" in said
    assert not out.exists()
    # with the whole interval, 22 violations cannot show a miss rate <= 0.01 even when nothing is allowed
    r = runner.invoke(app, ["eval", "calibrate", str(res), "-l", str(labels), "--allow-miss", "0.01", "--by", "bound", "-o", str(out)])
    assert r.exit_code == 1 and "even allowing nothing" in " ".join(r.output.split()) and not out.exists()
    # the point estimate can: allow nothing but the images below the first violation
    j = json.loads(runner.invoke(app, ["eval", "calibrate", str(res), "-l", str(labels), "--allow-miss", "0.01", "--json", "--dry-run"]).stdout)
    assert j["ok"] and j["chosen"]["missed"] == 0 and j["chosen"]["review"] == 0.204 and j["chosen"]["allowed"] == 19
    r = runner.invoke(app, ["eval", "calibrate", str(res), "-l", str(labels)])
    assert r.exit_code == 2 and "name a target" in r.output


def test_failed_and_not_judged_records_and_labels_by_sha256_or_folder(tmp_path):
    failed = {"path": "imgs/v90.jpg", "policy": "icm-sexy", "rules": "icm-default", "backend": "openai", "error": "term query: HTTP 503"}
    refused = {"path": "imgs/v91.jpg", "sha256": "ab" * 32, "policy": "icm-sexy", "rules": "icm-default", "backend": "openai",
               "basis": "refused", "unanswered": {"term:sexy": "refused: I can't help with that."}, "verdict": "review"}
    res, _, scores, truth = _dataset(tmp_path, extra=[failed, refused])
    # labels keyed by SHA-256 (the records carry it), JSONL
    labels = tmp_path / "labels.jsonl"
    rows = [{"sha256": hashlib.sha256(k.encode()).hexdigest(), "label": int(v)} for k, v in truth.items()]
    rows += [{"image": "v90.jpg", "label": 1}, {"image": "ab" * 32, "label": 1}]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = calibrate(read_results(res), LabelResolver(POLICY, labels=read_labels(labels)), block_precision=0.95, allow_miss=0.05)
    assert rep.ok and rep.n_failed == 1 and rep.n_not_judged == 1 and rep.n == len(scores) + 1
    assert rep.n_violations == 23  # the refused violation counts: it goes to review, never allowed
    assert rep.chosen is not None and rep.chosen.reviewed == 3 and rep.chosen.missed == 1
    assert any("1 failed record(s)" in n for n in rep.notes)
    # the folder convention: DIR/violate/*, DIR/allow/* matched by file name (and content hash)
    folder = tmp_path / "truth"
    for k, v in truth.items():
        d = folder / ("violate" if v else "allow")
        d.mkdir(parents=True, exist_ok=True)
        (d / Path(k).name).write_bytes(k.encode())
    rep2 = calibrate(read_results(res), LabelResolver(POLICY, labels=read_labels(folder)), block_precision=0.95, allow_miss=0.05)
    assert (rep2.chosen.review, rep2.chosen.block) == (0.4, 0.7) and rep2.n_unlabelled == 1  # v91's image is not in the folder


# -- issue 19: every verdict counts, equal scores are never split ---------------------------------------


def test_blocks_on_the_term_alone_count_in_block_precision(tmp_path):
    from says_yes import SAMPLE_PHOTOS, says_yes_records

    yes = [json.loads(r.model_dump_json()) for r in says_yes_records(tmp_path / "photos")]
    assert [r["verdict"] for r in yes] == ["block"] * 3  # attributes off-format: blocked on the term alone
    res, labels, _, _ = _dataset(tmp_path, extra=yes)
    with labels.open("a", newline="") as f:
        csv.writer(f).writerows([n, "allow"] for n in SAMPLE_PHOTOS)  # safe photographs
    rep = calibrate(read_results(res), LabelResolver(POLICY, labels=read_labels(labels)), block_precision=0.85)
    # at the current block 0.7: the 20 violations and the clean 0.75 as before, and the three photos
    assert rep.n_not_judged == 0 and rep.n == len(CLEAN) + len(VIOLATING) + 3
    assert (rep.current.blocked, rep.current.blocked_violating) == (24, 20)  # was 21 and 20: the photos vanished
    assert rep.current.block_precision == pytest.approx(20 / 24)
    # blocking from 0.8 keeps them and leaves out the clean 0.75: 20/23 >= 0.85 (0.7 would give 20/24 < 0.85)
    assert rep.ok and rep.chosen.block == 0.79 and rep.chosen.blocked == 23
    assert rep.chosen.block_precision == pytest.approx(20 / 23)
    # an off-format record that the rest would allow is reviewed (the engine's rule): judged, never allowed
    off = {**_record("imgs/o01.jpg", 0.1), "verdict": "review", "unanswered": {"attr:region": "off-format: answered 'No'"}}
    res2, labels2, _, _ = _dataset(tmp_path, extra=[off])
    with labels2.open("a", newline="") as f:
        csv.writer(f).writerow(["o01.jpg", "allow"])
    low = calibrate(read_results(res2), LabelResolver(POLICY, labels=read_labels(labels2)), allow_miss=0.05)
    assert low.n_not_judged == 0 and low.verdict_mismatches == 0  # review is what the rule gives it
    assert low.chosen.review == 0.4 and low.chosen.allowed == 31 and low.chosen.reviewed == 2 + 1


def test_scores_that_differ_by_float_noise_are_never_split(tmp_path):
    # five images of the same evidence (P = 0.6261241772283034 up to the last bits), two of them violations
    noise = [0.6261241772283033]
    for _ in range(4):
        noise.append(math.nextafter(noise[-1], 1.0))
    rows = ([(p, False) for p in (0.1, 0.2, 0.3, 0.5)] + list(zip(noise, [False, True, True, False, True], strict=True))
            + [(p, True) for p in (0.8, 0.85, 0.9, 0.95, 0.97)])
    records = [_record(f"imgs/i{i:02d}.jpg", p) for i, (p, _) in enumerate(rows)]
    res = tmp_path / "results.jsonl"
    res.write_text("".join(json.dumps(r) + "\n" for r in records))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\n" + "".join(f"i{i:02d}.jpg,{int(v)}\n" for i, (_, v) in enumerate(rows)))
    rep = calibrate(read_results(res), LabelResolver(POLICY, labels=read_labels(labels)), block_precision=1.0, allow_miss=0.0)
    # was review 0.6261241772283034 (allowing one of the five) and block 0.6261241772283037 (blocking another)
    assert rep.ok and (rep.chosen.review, rep.chosen.block) == (0.6, 0.7)
    th = rep.chosen
    verdicts = {verdict_at(None, p, p, th.review, th.block) for p in noise}
    assert verdicts == {"review"}  # the same evidence, the same verdict
    assert (th.allowed, th.blocked, th.missed, th.block_precision) == (4, 5, 0, 1.0)


def test_reasons_show_the_comparison_that_decided(tmp_path):
    import re

    from icm.moderation.backends.base import Backend, YesNoScore
    from icm.moderation.engine import Moderator, _reason

    def shown(reason: str) -> float:
        return float(re.search(r"P\(violation\)=([0-9.]+)", reason).group(1))

    # a violating product at P(violation) 0.6999 against block 0.7: was "P(violation)=0.70 -> review"
    attrs = {"region": {"upper": 1.0}, "exposure": {"chest": 0.6999, "normal": 0.3001}, "action": {"none": 1.0}, "cue": {"none": 1.0}}
    d = decide(POLICY, "icm-default", attributes=attrs, p_term=0.5)
    assert d.product == "upper_chest" and d.verdict == "review" and 0.6999 < d.p_violation < 0.7
    assert "P(violation)=0.6999 < block 0.7 -> review." in _reason(POLICY, d)
    # just above the threshold two digits are enough, and the printed number is still on its side
    d = decide(POLICY, "icm-default", attributes={**attrs, "exposure": {"chest": 0.70001, "normal": 0.29999}}, p_term=0.5)
    assert d.verdict == "block" and "P(violation)=0.70 >= block 0.7 -> block." in _reason(POLICY, d)
    d = decide(POLICY, "icm-default", attributes={**attrs, "exposure": {"chest": 0.29999, "normal": 0.70001}}, p_term=0.5)
    assert d.product == "upper_normal" and d.verdict == "review" and "P(violation)=0.30 >= review 0.3 -> review." in _reason(POLICY, d)

    class Says(Backend):  # P(Yes) = 0.699999 for the term, nothing else: the term alone decides
        name = "says"
        capabilities = frozenset({"score_yes_no"})

        def score_yes_no(self, images, questions):
            return [YesNoScore(p_yes=0.699999, source="logits") for _ in images]

    from PIL import Image

    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "red.png")
    (rec,) = Moderator(Says(), policy="icm-sexy").moderate_paths([str(tmp_path / "red.png")])
    assert rec.verdict == "review" and "P(violation)=0.699999 < block 0.7 -> review." in rec.reason
    assert shown(rec.reason) < 0.7 <= POLICY.rule_set("icm-default").thresholds.block
    # every verdict's reason shows a number on the side of each threshold that its verdict says
    for p in (0.0, 0.2999999, 0.3, 0.5, 0.6999, 0.7, 1.0):
        d = decide(POLICY, "icm-default", p_term=p)
        x = shown(_reason(POLICY, d))
        assert verdict_at(None, x, x, 0.3, 0.7) == d.verdict, (p, _reason(POLICY, d))
