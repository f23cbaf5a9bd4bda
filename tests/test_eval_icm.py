"""`icm eval icm`: labels, rule sets, protocols, curves and the report on small made-up sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.icm_metrics import evaluate_icm
from icm.evaluation.labels import LabelResolver, read_labels_file
from icm.evaluation.results import parse_paper_json, read_results
from icm.policy import decide, load_policy

runner = CliRunner()
POLICY = load_policy("icm-sexy")


def _paper(tmp_path: Path, rows: list[tuple[str, float]], name: str = "results.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps([{"image_name": n, "logit_yes": 0.0, "logit_no": 0.0, "sexy_score": s, "sexy_conclusion": "?"} for n, s in rows]))
    return p


def _sharp(values: dict[str, str]) -> dict[str, dict[str, float]]:
    out = {}
    for a in POLICY.attributes:
        hit = values[a.id]
        out[a.id] = {v: (0.97 if v == hit else 0.03 / (len(a.values) - 1)) for v in a.value_ids}
    return out


def _record(path: str, attrs: dict[str, str], p_term: float, rules: str = "icm-default") -> dict:
    attributes = _sharp(attrs)
    d = decide(POLICY, rules, attributes=attributes, p_term=p_term)
    return {"path": path, "policy": "icm-sexy", "rules": rules, "backend": "scripted", "model": "m",
            "term": {"term": "sexy", "question": "Is the image sexy?", "p_yes": p_term, "source": "logits"},
            "attributes": attributes, "product": d.product, "p_violation": d.p_violation, "verdict": d.verdict,
            "label": d.label.verdict if d.label else None, "reason": f"scripted {d.product}",
            "explanation": f"An explanation of {Path(path).name}."}


# -- labels ------------------------------------------------------------------------------------


def test_categories_from_names_resolve_through_the_policy():
    r = LabelResolver(POLICY)
    assert r.category_of("bite_finger/bite_finger_20231122110742_1005.JPEG") == "bite_finger"
    assert r.category_of("lower_hips_2022072011061710062_v2.JPEG") == "lower_hips"
    assert r.category_of("sexy_imagetext_202401170000000021.jpg") == "sexy_imagetext"
    assert r.category_of("upper_bust/IMG_1.jpg") == "upper_bust"  # the folder names the category
    assert r.category_of("whole_normal-7.png") == "whole_normal"  # a known prefix
    assert r.category_of("holiday.jpg") is None
    t = r.truth("upper_bust_2022072011061710001_v2.jpg")
    assert (t.positive, t.product, t.source, t.from_name) == (True, "upper_chest", "category", True)
    assert r.truth("upper_normal_20220720110617100_v2.jpg").positive is False
    # the paper's ICM-Test names carry the term only
    assert r.truth("sexy_00001234.jpg").model_dump(include={"positive", "source"}) == {"positive": True, "source": "term-name"}
    assert r.truth("not-sexy_00007639.jpg").positive is False
    assert r.truth("holiday.jpg") is None


def test_a_different_rule_set_relabels_the_same_images():
    legs = "middle_leg_2022072011061710163_v2.JPEG"
    crotch = "middle_crotch_2022072011061710119_v2.JPEG"
    paper = LabelResolver(POLICY)
    general = LabelResolver(POLICY, "general-audience")
    adult = LabelResolver(POLICY, "adult-platform")
    assert paper.truth(legs).positive and paper.truth(crotch).positive
    assert general.truth(legs).positive is False  # beachwear-like exposure is allowed there
    assert general.truth(legs).rule == "beachwear-like exposure"
    assert general.truth(crotch).positive is True
    assert adult.truth(legs).positive is False and adult.truth(crotch).positive is True
    # the term target ignores the rules
    assert LabelResolver(POLICY, "adult-platform", target="term").truth(legs).positive is True


def test_labels_files_csv_json_jsonl(tmp_path):
    csv_ = tmp_path / "l.csv"
    csv_.write_text("image,label\na.jpg,violate\nb.jpg,0\n")
    assert {k: v.label for k, v in read_labels_file(csv_).items()} == {"a.jpg": True, "b.jpg": False}
    js = tmp_path / "l.json"
    js.write_text(json.dumps({"dir/a.jpg": "upper_bust", "b.jpg": "allow", "c.jpg": {"product": "kiss"}}))
    lab = read_labels_file(js)
    assert lab["dir/a.jpg"].category == "upper_bust" and lab["b.jpg"].label is False and lab["c.jpg"].product == "kiss"
    jl = tmp_path / "l.jsonl"
    jl.write_text('{"path": "x.png", "category": "whole_normal"}\n\n{"path": "y.png", "label": "yes"}\n')
    assert read_labels_file(jl)["x.png"].category == "whole_normal"
    r = LabelResolver(POLICY, labels=lab)
    assert r.truth("/data/dir/a.jpg").product == "upper_chest"  # matched by file name
    assert r.truth("c.jpg").positive is True and r.truth("c.jpg").source == "product"
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\na.jpg,maybe\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: label 'maybe'"):
        read_labels_file(bad)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("picture,label\na.jpg,1\n")
    with pytest.raises(ValueError, match="no image column"):
        read_labels_file(nocol)


# -- metrics ------------------------------------------------------------------------------------


def test_confusion_curves_and_sweep_by_hand(tmp_path):
    rows = [("upper_bust_2022072011061710001_v2.jpg", 0.9), ("upper_bust_2022072011061710002_v2.jpg", 0.8),
            ("upper_bust_2022072011061710003_v2.jpg", 0.4), ("upper_normal_2022072011061710004_v2.jpg", 0.7),
            ("upper_normal_2022072011061710005_v2.jpg", 0.2)]
    rep = evaluate_icm(read_results(_paper(tmp_path, rows)), LabelResolver(POLICY))
    c = rep.confusion
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 1, 1)
    assert rep.metrics["accuracy"] == pytest.approx(3 / 5)
    assert rep.metrics["precision"] == pytest.approx(2 / 3)
    assert rep.metrics["recall"] == pytest.approx(2 / 3)
    assert rep.metrics["f1"] == pytest.approx(2 / 3)
    assert rep.metrics["roc_auc"] == pytest.approx(5 / 6)  # 5 of the 6 (positive, negative) pairs are ordered right
    sweep = {s.threshold: s for s in rep.sweep}
    assert (sweep[0.75].tp, sweep[0.75].fp) == (2, 0) and sweep[0.75].precision == 1.0
    assert (sweep[0.3].tp, sweep[0.3].fp, sweep[0.3].fn) == (3, 1, 0)
    assert rep.best_f1 is not None and rep.best_f1.f1 == pytest.approx(6 / 7)  # threshold 0.4: TP 3, FP 1
    cats = {r.category: r for r in rep.per_category}
    assert cats["upper_bust"].accuracy == pytest.approx(2 / 3) and cats["upper_normal"].flagged == 1
    assert [e.id for e in rep.worst_errors] == ["upper_normal_2022072011061710004_v2.jpg", "upper_bust_2022072011061710003_v2.jpg"]
    assert rep.roc is not None and rep.roc.x[0] == 0.0 and rep.roc.y[-1] == 1.0


def test_paper_protocol_double_counts_and_flags_strictly(tmp_path):
    rows = [("stockings_20231207094755_1.jpg", 0.9), ("wearing_stockings_20231207094755_2.jpg", 0.3),
            ("upper_normal_2022072011061710004_v2.jpg", 0.5), ("holiday.jpg", 0.99)]
    rs = read_results(_paper(tmp_path, rows))
    rep = evaluate_icm(rs, LabelResolver(POLICY), protocol="paper")
    p = rep.paper
    assert p is not None and p.script == "icm-val"
    assert p.keywords == ["stockings", "upper_normal", "wearing_stockings"]
    assert (p.matches, p.images, p.double_counted, p.unmatched) == (4, 4, 1, 1)
    # wearing_stockings (0.3, positive) counts twice as FN; upper_normal at exactly 0.5 is not flagged (> 0.5)
    assert (p.confusion.tp, p.confusion.fn, p.confusion.tn, p.confusion.fp) == (1, 2, 1, 0)
    assert rep.metrics["accuracy"] == pytest.approx(2 / 4)
    # each image once: the tie at 0.5 is flagged (>=), holiday.jpg has no label
    pi = rep.per_image.confusion
    assert (pi.tp, pi.fn, pi.fp, pi.tn) == (1, 1, 1, 0) and rep.n_unlabelled == 1 and rep.n_ties == 1
    assert "'stockings' also matches 1 image(s) of 'wearing_stockings'" in p.difference
    assert any("score exactly 0.5" in n for n in rep.notes)


def test_our_records_are_re_decided_under_another_rule_set(tmp_path):
    legs = _record("shots/middle_leg_2022072011061710163_v2.jpg", {"region": "middle", "exposure": "legs", "action": "none", "cue": "none"}, 0.9)
    normal = _record("shots/middle_normal_2022072011061710066_v2.jpg", {"region": "middle", "exposure": "normal", "action": "none", "cue": "none"}, 0.1)
    crotch = _record("shots/middle_crotch_2022072011061710119_v2.jpg", {"region": "middle", "exposure": "crotch", "action": "none", "cue": "none"}, 0.95)
    broken = {"path": "shots/upper_bust_2022072011061710001_v2.jpg", "policy": "icm-sexy", "rules": "icm-default", "backend": "scripted", "error": "boom"}
    f = tmp_path / "results.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (legs, normal, crotch, broken)) + "\n{half a line")
    rs = read_results(f)
    assert rs.format == "icm-jsonl" and rs.bad_lines == 1 and len(rs.items) == 4
    paper = evaluate_icm(rs, LabelResolver(POLICY))
    c = paper.confusion
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 0, 1, 0) and paper.n_unscored == 1
    assert paper.unscored_reasons == {"moderation failed": 1}
    general = evaluate_icm(rs, LabelResolver(POLICY, "general-audience"))
    c = general.confusion
    assert (c.tp, c.fp, c.tn, c.fn) == (1, 0, 2, 0)  # legs: truth and score both relabelled
    assert "re-decided" in general.score
    stale = evaluate_icm(rs, LabelResolver(POLICY, "general-audience"), score="recorded")
    assert stale.confusion.fp == 1  # the recorded P(violation) is icm-default's
    worst = {e.id: e for e in stale.worst_errors}
    assert worst["shots/middle_leg_2022072011061710163_v2.jpg"].explanation.startswith("An explanation")


def test_cli_writes_summary_and_a_self_contained_html_report(tmp_path):
    rows = [(f"upper_bust_20220720110617{i:05d}_v2.jpg", 0.3 + i / 40) for i in range(20)]
    rows += [(f"whole_normal_20220720110617{i:05d}_v2.jpg", i / 40) for i in range(20)]
    res = _paper(tmp_path, rows)
    out, html = tmp_path / "s.json", tmp_path / "r.html"
    result = runner.invoke(app, ["eval", "icm", str(res), "--out", str(out), "--html", str(html), "--threshold", "0.45"])
    assert result.exit_code == 0, result.output
    assert "ICM accuracy" in result.output and "Per category" in result.output
    s = json.loads(out.read_text())
    assert s["icm"]["threshold"] == 0.45 and s["icm"]["n_evaluated"] == 40
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") >= 4
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "Worst errors" in page and "upper_bust" in page
    rerender = tmp_path / "again.html"
    assert runner.invoke(app, ["eval", "report", str(out), "--html", str(rerender)]).exit_code == 0
    assert rerender.read_text().count("data:image/png;base64,") == page.count("data:image/png;base64,")


def test_cli_usage_errors(tmp_path):
    res = _paper(tmp_path, [("holiday.jpg", 0.2), ("beach.jpg", 0.8)])
    r = runner.invoke(app, ["eval", "icm", str(res)])
    assert r.exit_code == 2 and "no image could be labelled" in r.output
    labelled = _paper(tmp_path, [("upper_bust_2022072011061710001_v2.jpg", 0.9)], "ok.json")
    r = runner.invoke(app, ["eval", "icm", str(labelled), "--rules", "no-such-rules"])
    assert r.exit_code == 2 and "no rule set 'no-such-rules'" in r.output
    r = runner.invoke(app, ["eval", "icm", str(labelled), "--protocol", "fancy"])
    assert r.exit_code == 2
    garbage = tmp_path / "g.json"
    garbage.write_text("hello")
    r = runner.invoke(app, ["eval", "icm", str(garbage)])
    assert r.exit_code == 2 and "not a results file" in r.output
    r = runner.invoke(app, ["eval", "icm", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "cannot read" in r.output


def test_paper_json_scores_fall_back_to_the_logits():
    rs = parse_paper_json([{"image_name": "a.jpg", "logit_yes": 2.0, "logit_no": 0.0}, {"image_name": "b.jpg", "sexy_score": 1.7}, "junk"])
    assert len(rs.items) == 1 and rs.bad_lines == 2
    assert rs.items[0].p_term == pytest.approx(1 / (1 + pytest.importorskip("math").exp(-2.0)))


# -- issue 19: every verdict counts --------------------------------------------------------------


def test_a_model_that_says_yes_to_everything_is_judged_and_its_blocks_counted(tmp_path):
    from says_yes import SAMPLE_PHOTOS, says_yes_records

    records = says_yes_records(tmp_path / "photos")
    # the term alone decides (every attribute answer is off-format): each safe photo is blocked
    assert [(r.verdict, r.basis) for r in records] == [("block", "term")] * 3
    assert all(v.startswith("off-format") for r in records for v in r.unanswered.values())
    res = tmp_path / "yes.jsonl"
    res.write_text("".join(r.model_dump_json() + "\n" for r in records))
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\n" + "".join(f"{n},allow\n" for n in SAMPLE_PHOTOS))
    r = runner.invoke(app, ["eval", "icm", str(res), "--labels", str(labels), "--json", "--bootstrap", "0"])
    assert r.exit_code == 0, r.output  # was: "no image has a usable score ...: 0 failed, 3 not judged of 3"
    j = json.loads(r.stdout)["icm"]
    assert (j["n_judged"], j["n_not_judged"], j["n_evaluated"]) == (3, 0, 3)
    assert j["confusion"] == {"tp": 0, "fp": 3, "tn": 0, "fn": 0}  # three false alarms, under the keys scripts read
    assert j["per_image"]["confusion"] == j["confusion"]
    assert j["metrics"]["accuracy"] == 0.0 and j["metrics"]["coverage"] == 1.0 and j["metrics"]["false_positive_rate"] == 1.0
