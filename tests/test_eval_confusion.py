"""The one confusion-metric table agrees with scikit-learn; metric paths are checked when registered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icm.evaluation.confusion import CONFUSION_METRICS, Confusion, metric_arrays
from icm.evaluation.icm_metrics import evaluate_icm
from icm.evaluation.labels import LabelResolver
from icm.evaluation.registry import METRICS, MetricSpec, register
from icm.evaluation.results import read_results
from icm.evaluation.summary import EvalSummary
from icm.policy import load_policy

skm = pytest.importorskip("sklearn.metrics")


def _sklearn(y: np.ndarray, f: np.ndarray) -> dict[str, float]:
    kw = {"zero_division": np.nan}
    rec = skm.recall_score(y, f, **kw)
    spec = skm.recall_score(y, f, pos_label=0, **kw)
    return {
        "accuracy": skm.accuracy_score(y, f),
        "precision": skm.precision_score(y, f, **kw),
        "recall": rec,
        "f1": skm.f1_score(y, f, **kw),
        "specificity": spec,
        "balanced_accuracy": skm.balanced_accuracy_score(y, f) if len(set(y.tolist())) == 2 else np.nan,
        "false_positive_rate": 1 - spec,
        "false_negative_rate": 1 - rec,
    }


@pytest.mark.parametrize("seed", range(40))
def test_every_figure_agrees_with_sklearn_on_random_labels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    y = rng.random(n) < rng.random()
    f = rng.random(n) < rng.random()  # small sets: some have no positive, no flag or no negative
    c = Confusion.of(y, f)
    tn, fp, fn, tp = skm.confusion_matrix(y, f, labels=[False, True]).ravel()
    assert (c.tp, c.fp, c.tn, c.fn) == (tp, fp, tn, fn)
    want = _sklearn(y, f)
    assert set(want) == set(CONFUSION_METRICS)
    arrays = metric_arrays(list(CONFUSION_METRICS), *(np.array([x], dtype=float) for x in (c.tp, c.fp, c.tn, c.fn)))
    for name, expected in want.items():
        got = c.value(name)
        if np.isnan(expected):
            assert got is None, name  # undefined (nothing to divide by): None, not 0
            assert not np.isfinite(arrays[name][0]), name
        else:
            assert got == pytest.approx(expected, abs=1e-12), name
            assert arrays[name][0] == pytest.approx(expected, abs=1e-12), name
    # the proportions' Wilson intervals count the same k of n the figure divides
    for name, spec in CONFUSION_METRICS.items():
        if spec.proportion and (iv := c.interval(name)) is not None:
            assert iv.k is not None and iv.n and iv.k / iv.n == pytest.approx(c.value(name)) and iv.low <= iv.k / iv.n <= iv.high


def _paper_json(tmp_path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    cats = ["upper_bust", "upper_normal", "middle_leg", "middle_normal", "middle_crotch", "bite_finger"]
    rows = [{"image_name": f"{cats[int(rng.integers(len(cats)))]}_2022072011061{i:05d}_v2.jpg", "logit_yes": 0.0, "logit_no": 0.0,
             "sexy_score": round(float(rng.random()), 2), "sexy_conclusion": "?"} for i in range(120)]
    p = tmp_path / "results.json"
    p.write_text(json.dumps(rows))
    return p


def test_the_report_and_its_sweep_agree_with_sklearn(tmp_path: Path) -> None:
    rs = read_results(_paper_json(tmp_path, 5))
    resolver = LabelResolver(load_policy("icm-sexy"))
    rep = evaluate_icm(rs, resolver, threshold=0.5, bootstrap=0)
    truth = {it.id: resolver.truth(it.id) for it in rs.items}
    y = np.array([truth[it.id].positive for it in rs.items])  # type: ignore[union-attr]
    s = np.array([it.p_term for it in rs.items], dtype=float)
    want = _sklearn(y, s >= 0.5)
    for name in rep.per_image.metrics:
        assert rep.metrics[name] == pytest.approx(want[name], abs=1e-12), name
    for row in rep.sweep:
        w = _sklearn(y, s >= row.threshold)
        for name in ("precision", "recall", "f1", "accuracy"):
            got = getattr(row, name)
            assert (got is None and np.isnan(w[name])) or got == pytest.approx(w[name], abs=1e-12), (row.threshold, name)


# -- typed metric access -------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "interval", "why"), [
    ("icm.metrcs.accuracy", None, "no field 'metrcs'"),
    ("icm.metrics.acuracy", None, "no key 'acuracy'"),
    ("icm.paper.metrics.acuracy", None, "no key 'acuracy'"),
    ("icm.metrics.accuracy", "icm.intervals.acuracy", "no key 'acuracy'"),
    ("meq.means.fluenc", None, "no key 'fluenc'"),
    ("mqa.mc.acuracy", None, "no field 'acuracy'"),
    ("icm.name", None, "not a number"),
])
def test_a_misspelled_metric_path_fails_at_registration(path: str, interval: str | None, why: str) -> None:
    before = dict(METRICS)
    with pytest.raises(ValueError, match=why):
        register(MetricSpec("test.misspelled", path.split(".")[0], "Misspelled", path, interval_path=interval))
    assert METRICS == before


@pytest.mark.parametrize("protocol", ["image", "paper"])
def test_every_registered_metric_reaches_its_value_in_a_real_summary(tmp_path: Path, protocol: str) -> None:
    rep = evaluate_icm(read_results(_paper_json(tmp_path, 6)), LabelResolver(load_policy("icm-sexy")), protocol=protocol,  # type: ignore[arg-type]
                       bootstrap=50)
    summary = EvalSummary(name="x", icm=rep)
    as_json = json.loads(summary.model_dump_json())  # what `icm eval compare` reads back
    for spec in METRICS.values():
        if spec.task != "icm":
            continue
        v = spec.get(summary)
        assert v is not None and spec.get(as_json) == v and spec.of_report(rep) == v, spec.name
        iv = spec.interval(rep)
        if protocol == "image" or spec.name not in ("icm.f1", "icm.balanced_accuracy"):  # the paper's matches are not bootstrapped
            assert iv is not None and iv.low <= iv.high, spec.name
            if iv.method == "wilson":
                assert iv.low <= v <= iv.high, spec.name
    assert rep.paper is not None
    assert METRICS["icm.paper_accuracy"].get(summary) == rep.paper.metrics["accuracy"]
    assert METRICS["icm.per_image_accuracy"].get(summary) == rep.per_image.metrics["accuracy"]
