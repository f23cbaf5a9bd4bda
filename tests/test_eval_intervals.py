"""Honest figures: Wilson and bootstrap intervals, failures and not-judged images counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.icm_metrics import evaluate_icm
from icm.evaluation.labels import LabelResolver
from icm.evaluation.results import read_results
from icm.evaluation.stats import bootstrap_curve_metrics, wilson
from icm.policy import decide, load_policy

runner = CliRunner()
POLICY = load_policy("icm-sexy")


# -- Wilson -------------------------------------------------------------------------------------


def test_wilson_known_values():
    assert tuple(round(x, 4) for x in wilson(8, 10)) == (0.4902, 0.9433)
    assert tuple(round(x, 4) for x in wilson(0, 10)) == (0.0, 0.2775)
    assert tuple(round(x, 4) for x in wilson(10, 10)) == (0.7225, 1.0)
    assert tuple(round(x, 4) for x in wilson(1411, 1863)) == (0.7374, 0.7763)
    # 99% is wider than 95%, which is wider than 80%
    w80, w95, w99 = (wilson(30, 60, c) for c in (0.8, 0.95, 0.99))
    assert w99[0] < w95[0] < w80[0] < 0.5 < w80[1] < w95[1] < w99[1]
    assert wilson(0, 0) is None
    with pytest.raises(ValueError, match="k <= n"):
        wilson(3, 2)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 2, 1.5)


# -- bootstrap ----------------------------------------------------------------------------------


def _sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2)  # rounded: ties, as real scores have
    return y, s


def test_bootstrap_auc_matches_sklearn_contains_the_point_and_narrows_with_more_data():
    sk = pytest.importorskip("sklearn.metrics")
    widths = []
    for n in (80, 800, 8000):
        y, s = _sample(n, 7)
        auc = sk.roc_auc_score(y, s)
        ap = sk.average_precision_score(y, s)
        iv = bootstrap_curve_metrics(y, s, threshold=0.5, resamples=500, seed=3)
        assert iv["roc_auc"].low <= auc <= iv["roc_auc"].high
        assert iv["average_precision"].low <= ap <= iv["average_precision"].high
        assert iv["f1"].low <= sk.f1_score(y, s >= 0.5) <= iv["f1"].high
        assert iv["roc_auc"].resamples == 500 and iv["roc_auc"].method == "bootstrap"
        widths.append(iv["roc_auc"].high - iv["roc_auc"].low)
    assert widths[0] > widths[1] > widths[2]
    # about 1/sqrt(n): ten times the data, about a third of the width
    assert 0.2 < widths[2] / widths[1] < 0.5


def test_bootstrap_is_seeded_and_needs_both_classes():
    y, s = _sample(300, 1)
    a = bootstrap_curve_metrics(y, s, resamples=200, seed=5)
    b = bootstrap_curve_metrics(y, s, resamples=200, seed=5)
    c = bootstrap_curve_metrics(y, s, resamples=200, seed=6)
    assert a == b and a["roc_auc"] != c["roc_auc"]
    assert bootstrap_curve_metrics(np.ones(5, bool), np.linspace(0, 1, 5)) == {}
    # a perfect separation stays perfect in every resample
    perfect = bootstrap_curve_metrics(np.array([0, 0, 1, 1], bool), np.array([0.1, 0.2, 0.8, 0.9]), resamples=50)
    assert (perfect["roc_auc"].low, perfect["roc_auc"].high) == (1.0, 1.0)


# -- failures and images not judged ------------------------------------------------------------------


def _sharp(values: dict[str, str]) -> dict[str, dict[str, float]]:
    out = {}
    for a in POLICY.attributes:
        out[a.id] = {v: (0.97 if v == values[a.id] else 0.03 / (len(a.values) - 1)) for v in a.value_ids}
    return out


def _record(path: str, exposure: str, p_term: float, **extra) -> dict:
    attributes = _sharp({"region": "upper", "exposure": exposure, "action": "none", "cue": "none"})
    d = decide(POLICY, "icm-default", attributes=attributes, p_term=p_term)
    rec = {"path": path, "policy": "icm-sexy", "rules": "icm-default", "backend": "scripted", "model": "m",
           "term": {"term": "sexy", "question": "Is the image sexy?", "p_yes": p_term, "source": "logits"},
           "attributes": attributes, "product": d.product, "p_violation": d.p_violation,
           "p_violation_range": list(d.p_violation_range), "basis": d.basis, "verdict": d.verdict,
           "label": d.label.verdict if d.label else None}
    rec.update(extra)
    return rec


def _mixed_results(tmp_path: Path) -> Path:
    bust = "shots/upper_bust_20220720110617{:05d}_v2.jpg"
    normal = "shots/upper_normal_20220720110617{:05d}_v2.jpg"
    records = [
        _record(bust.format(1), "chest", 0.95),   # right
        _record(bust.format(2), "chest", 0.90),   # right
        _record(bust.format(3), "normal", 0.05),  # wrong: a violation scored low
        _record(normal.format(4), "normal", 0.05),  # right
        _record(normal.format(5), "normal", 0.10),  # right
        # a failure: an error record (a 503 after the retries)
        {"path": bust.format(6), "policy": "icm-sexy", "rules": "icm-default", "backend": "openai", "error": "term query: HTTP 503"},
        # a refusal: the model answered "I'm sorry ..." (a review that is no verdict, whatever P(violation) remained)
        _record(bust.format(7), "chest", 0.5, verdict="review", notes=["term: refused (valid-label mass 0.02 < 0.5)"]),
        # an off-format answer: the rest decided, so the record has a verdict and is judged (issue 19)
        _record(normal.format(8), "normal", 0.5, verdict="review", not_judged=["exposure: off-format"]),
        # nothing to decide from, and contradicting answers
        {"path": normal.format(9), "policy": "icm-sexy", "rules": "icm-default", "backend": "openai", "basis": "none",
         "p_violation": 0.0, "p_violation_range": [0.0, 1.0], "verdict": "review"},
        {"path": bust.format(10), "policy": "icm-sexy", "rules": "icm-default", "backend": "openai", "basis": "conflict",
         "p_violation": 0.5, "p_violation_range": [0.0, 1.0], "verdict": "review", "attributes": _sharp(
             {"region": "upper", "exposure": "chest", "action": "none", "cue": "none"})},
        # the engine's refusal record: no product, basis refused, verdict review
        {"path": bust.format(12), "policy": "icm-sexy", "rules": "icm-default", "backend": "openai", "basis": "refused",
         "unanswered": {"term:sexy": "refused: I'm sorry, but I can't help with that."}, "verdict": "review"},
        # a query the backend cannot ask is not a refusal: judged on the rest
        _record(normal.format(11), "normal", 0.05, unanswered={"attr:action": "cannot-judge: the detector has no action question"}),
        # a failure no label can be found for: counted as failed, not in strict accuracy
        {"path": "shots/holiday.jpg", "policy": "icm-sexy", "rules": "icm-default", "backend": "openai", "error": "timeout"},
    ]
    f = tmp_path / "results.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f


def test_strict_accuracy_and_coverage_count_failures_and_images_not_judged(tmp_path):
    rs = read_results(_mixed_results(tmp_path))
    statuses = [it.status()[0] for it in rs.items]
    assert statuses.count("judged") == 7 and statuses.count("failed") == 2 and statuses.count("not_judged") == 4
    rep = evaluate_icm(rs, LabelResolver(POLICY), bootstrap=200)
    assert (rep.n_judged, rep.n_failed, rep.n_not_judged) == (7, 2, 4)
    assert rep.not_judged_reasons == {"refused": 2, "basis none": 1, "basis conflict": 1}
    assert rep.n_evaluated == 7 and rep.n_strict == 7 + 1 + 4  # holiday.jpg has no label
    assert rep.metrics["accuracy"] == pytest.approx(6 / 7)
    assert rep.metrics["strict_accuracy"] == pytest.approx(6 / 12)
    assert rep.metrics["coverage"] == pytest.approx(7 / 12)
    acc, strict, cov = rep.intervals["accuracy"], rep.intervals["strict_accuracy"], rep.intervals["coverage"]
    assert (acc.k, acc.n) == (6, 7) and (round(acc.low, 4), round(acc.high, 4)) == tuple(round(x, 4) for x in wilson(6, 7))
    assert (strict.k, strict.n, cov.k, cov.n) == (6, 12, 7, 12)
    assert rep.intervals["precision"].n == 2 and rep.intervals["recall"].n == 3
    assert rep.intervals["roc_auc"].low <= rep.metrics["roc_auc"] <= rep.intervals["roc_auc"].high
    assert any("count as wrong in strict accuracy" in n for n in rep.notes)
    assert "shots/holiday.jpg" in rep.failed_examples


def test_cli_prints_and_saves_counts_and_intervals(tmp_path):
    res = _mixed_results(tmp_path)
    out, html = tmp_path / "s.json", tmp_path / "r.html"
    r = runner.invoke(app, ["eval", "icm", str(res), "--out", str(out), "--html", str(html), "--bootstrap", "100", "--confidence", "0.9"])
    assert r.exit_code == 0, r.output
    assert "Strict accuracy" in r.output and "Coverage" in r.output and "90% interval" in r.output
    assert "7 / 2 / 4" in r.output  # judged / failed / not judged
    s = json.loads(out.read_text())["icm"]
    assert (s["n_failed"], s["n_not_judged"], s["confidence"], s["bootstrap"]) == (2, 4, 0.9, 100)
    assert s["intervals"]["coverage"]["low"] < 0.5 < s["intervals"]["coverage"]["high"]
    assert s["intervals"]["roc_auc"]["method"] == "bootstrap"
    page = html.read_text()
    assert "Strict accuracy" in page and "failed 2, not judged 4" in page and "90% interval" in page
    j = json.loads(runner.invoke(app, ["eval", "icm", str(res), "--json", "--bootstrap", "0"]).stdout)["icm"]
    assert "roc_auc" not in j["intervals"] and j["metrics"]["coverage"] == pytest.approx(7 / 12)
    bad = runner.invoke(app, ["eval", "icm", str(res), "--confidence", "95"])
    assert bad.exit_code == 2 and "confidence level" in bad.output


def test_mqa_accuracies_carry_wilson_intervals(tmp_path):
    truth, pred = tmp_path / "gt.txt", tmp_path / "pred.txt"
    answers = ["A", "B", "C", "D", "A", "B", "C", "D", "A", "B"]
    truth.write_text("".join(f"img{i}.jpg\n{a}\n" for i, a in enumerate(answers)))
    pred.write_text("".join(f"img{i}.jpg\n{a if i < 8 else 'D'}. because\n" for i, a in enumerate(answers)))  # 8 of 10 right
    m = json.loads(runner.invoke(app, ["eval", "mqa", "--mc", str(truth), str(pred), "--json"]).stdout)["mqa"]
    assert (m["mc"]["correct"], m["mc"]["total"]) == (8, 10)
    assert [round(x, 4) for x in m["mc"]["accuracy_ci"]] == [0.4902, 0.9433] and m["confidence"] == 0.95
    m90 = json.loads(runner.invoke(app, ["eval", "mqa", "--mc", str(truth), str(pred), "--json", "--confidence", "0.9"]).stdout)["mqa"]
    assert m90["all"]["accuracy_ci"][0] > m["all"]["accuracy_ci"][0] and m90["confidence"] == 0.9


def test_meq_means_and_failure_share_carry_intervals():
    from statistics import NormalDist, stdev

    from icm.evaluation.meq import MEQItem, aggregate

    acc = [80, 90, 70, 85, 95, 60, 75, 88]
    items = [MEQItem(id=f"i{i}", scores={"accuracy": a, "preciseness": a, "comprehensiveness": a, "fluency": a}) for i, a in enumerate(acc)]
    items.append(MEQItem(id="failed", scores={}, error="judge reply unreadable"))  # counted 0 in the paper's mean
    rep = aggregate(items, name="t", source="t", mode="judgements")
    vals = [*acc, 0]
    m, half = sum(vals) / 9, NormalDist().inv_cdf(0.975) * stdev(vals) / 9 ** 0.5
    assert rep.means["accuracy"] == pytest.approx(m)
    assert rep.means_ci["accuracy"] == pytest.approx((m - half, m + half))
    assert rep.failed_ci == pytest.approx(wilson(1, 9))


def test_error_records_of_a_real_moderation_run_are_counted(tmp_path):
    """`icm moderate` (offline detector) over a folder with a broken file, then `icm eval icm`
    with the folder convention for labels: the failure is in coverage and strict accuracy."""
    import shutil

    examples = Path(__file__).resolve().parents[1] / "examples" / "images"
    clean = tmp_path / "truth" / "allow"
    clean.mkdir(parents=True)
    for f in sorted(examples.glob("*.jpg")):
        shutil.copy(f, clean / f.name)
    (clean / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    recs = tmp_path / "recs.jsonl"
    r = runner.invoke(app, ["moderate", str(clean), "--out", str(recs)])
    assert r.exit_code == 1, r.output  # one image failed
    s = json.loads(runner.invoke(app, ["eval", "icm", str(recs), "--labels", str(tmp_path / "truth"), "--json"]).stdout)["icm"]
    assert (s["n_judged"], s["n_failed"], s["n_not_judged"]) == (3, 1, 0)
    assert s["metrics"]["accuracy"] == 1.0  # the three photos are allowed, rightly
    assert s["metrics"]["coverage"] == 0.75 and s["metrics"]["strict_accuracy"] == 0.75
    assert s["intervals"]["strict_accuracy"]["n"] == 4 and s["failed_examples"] == [str(clean / "broken.jpg")]
