"""`icm eval compare --published FILE`: a run beside peers' published figures (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.peers import RunFigure, RunFigures, compare_published, load_run
from icm.evaluation.published import PublishedFigure, PublishedFile, load_published

FIX = Path(__file__).resolve().parent / "fixtures" / "compare"
RUN = FIX / "unsafebench-test-run.json"
PEERS = FIX / "peers.yaml"
runner = CliRunner()

GOOD = {
    "model": "Peer", "benchmark": "unsafebench", "split": "test", "metric": "f1", "value": 50.0,
    "source": {"citation": "A paper", "url": "https://example.org", "where": "Table 1"},
    "verification": "paper", "checked": "by hand",
}


def test_the_shipped_figures_load_each_with_its_source_and_check():
    pub = load_published("builtin")
    assert pub.path.endswith("peers.yaml") and len(pub.figures) >= 20
    for f in pub.figures:
        assert f.source.url.startswith("https://") and f.source.where and f.checked
    keys = {(f.model, *f.key): f for f in pub.figures}
    # the figures issue 24 names, as checked: SafeGuard-VL's overall F1 (Table 2, from secondary copies) ...
    sgvl = keys[("SafeGuard-VL (Full, Qwen2.5-VL-7B)", "unsafebench", "test", "f1", "overall")]
    assert sgvl.value == 72.2 and sgvl.verification == "secondary" and "Table 2" in sgvl.source.where
    # ... and ShieldGemma 2's sexual accuracy 64.8, which is KidsNanny's measurement on an unstated split
    sg2 = keys[("ShieldGemma 2 (4B)", "unsafebench", "unstated-sexual-1054", "accuracy", "sexual")]
    assert sg2.value == 64.8 and "2603.16181" in sg2.source.url
    # ShieldGemma 2's own report: F1 on relabelled test examples, read in its LaTeX source
    own = keys[("ShieldGemma 2 (4B)", "unsafebench", "test-relabelled-sg2", "f1", "sexual")]
    assert own.value == 64.2 and own.verification == "paper"
    # the two the issue quotes that could not be checked are not shipped
    assert not any(f.model.startswith("Llama Guard") for f in pub.figures)
    assert not any(f.value == 63.4 for f in pub.figures)


def test_the_shipped_figures_are_package_data():
    """A wheel holds only what pyproject's package-data names: `--published builtin` must find its file installed."""
    import fnmatch

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    repo = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]["icm"]
    rel = Path(load_published("builtin").path).relative_to(repo / "src" / "icm").as_posix()
    assert rel == "evaluation/published/peers.yaml" and any(fnmatch.fnmatch(rel, p) for p in patterns)


def test_the_compared_with_page_shows_every_shipped_figure():
    page = (Path(__file__).resolve().parents[1] / "docs" / "compared.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    for f in load_published("builtin").figures:
        model = f.model.replace(" (size not stated in the abstract)", " (size not stated)")
        assert any(line.startswith(f"| {model} |") and (f" {f.value:.1f} " in line or f" {f.value:.2f} " in line)
                   for line in rows), f"docs/compared.md has no row with {f.model} {f.value}"


def _write(tmp_path: Path, figures: object, name: str = "pub.yaml") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(figures) if name.endswith(".json") else json.dumps({"figures": figures}))
    return p


@pytest.mark.parametrize(("bad", "says"), [
    ({"metric": "f2"}, "metric: unknown metric 'f2'"),
    ({"value": 172.0}, "outside 0-100"),
    ({"source": {"citation": "A paper", "url": "https://example.org"}}, "source.where: Field required"),
    ({"verification": "hearsay"}, "verification"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
])
def test_a_bad_entry_is_named_with_the_file_and_its_position(tmp_path, bad, says):
    p = _write(tmp_path, [GOOD, {**GOOD, "model": "Broken peer", **bad}])
    with pytest.raises(ValueError) as e:
        load_published(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: entry 2 (model 'Broken peer'): ") and says in msg


def test_bad_files_say_which_file_and_why(tmp_path):
    p = _write(tmp_path, [GOOD, "not a mapping"], "pub.json")
    with pytest.raises(ValueError, match=r"pub\.json: entry 2: expected a mapping"):
        load_published(p)
    (tmp_path / "dup.yaml").write_text(json.dumps([GOOD, {**GOOD, "value": 51.0}]))
    with pytest.raises(ValueError, match=r"dup\.yaml: entry 2 \(model 'Peer'\): the same model, .* as entry 1"):
        load_published(tmp_path / "dup.yaml")
    (tmp_path / "empty.yaml").write_text("figures: []\n")
    with pytest.raises(ValueError, match=r"empty\.yaml: expected a non-empty list"):
        load_published(tmp_path / "empty.yaml")
    (tmp_path / "broken.yaml").write_text("figures: [\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: not valid YAML"):
        load_published(tmp_path / "broken.yaml")
    with pytest.raises(ValueError, match=r"cannot read published figures .*nowhere\.yaml: No such file"):
        load_published(tmp_path / "nowhere.yaml")


def test_comparable_only_on_the_same_benchmark_split_metric_and_category():
    run = RunFigures(name="ours", source="run.json", benchmark="unsafebench", split="test", figures=[
        RunFigure(metric="f1", value=0.5, interval=(0.45, 0.55)),
        RunFigure(metric="f1", category="Sexual", value=0.8),
    ])
    rows = {(r.model, r.category): r for r in compare_published(run, load_published(PEERS)).rows}
    a = rows[("Peer A", "overall")]  # "UnsafeBench", "F1-score": the same benchmark and metric, spelt differently
    assert a.comparable and a.ours == pytest.approx(50.0) and a.delta == pytest.approx(-12.5)
    assert a.ours_interval == pytest.approx((45.0, 55.0))
    assert rows[("Peer A", "Sexual")].comparable and rows[("Peer A", "Sexual")].delta == pytest.approx(10.0)
    b = rows[("Peer B", "overall")]  # the same metric on another split is not comparable
    assert not b.comparable and b.ours is None and b.reason == "other split: published on validation, the run on test"
    c = rows[("Peer C", "overall")]
    assert not c.comparable and c.reason.startswith("other metric: the run has no accuracy")
    d = rows[("Peer D", "Self-harm")]
    assert not d.comparable and "category 'Self-harm' not in the run" in d.reason
    e = rows[("Peer E", "overall")]
    assert not e.comparable and e.reason == "other benchmark: the run is on unsafebench" and e.published == pytest.approx(66.6)
    # the comparable rows come first
    flags = [r.comparable for r in compare_published(run, load_published(PEERS)).rows]
    assert flags == sorted(flags, reverse=True)


def test_a_run_that_names_no_split_is_compared_with_nothing():
    run = RunFigures(name="ours", source="s.json", benchmark="unsafebench", figures=[RunFigure(metric="f1", value=0.5)])
    rows = compare_published(run, load_published(PEERS)).rows
    assert not any(r.comparable for r in rows)
    assert {r.reason for r in rows if r.benchmark.lower() == "unsafebench"} == {"the run names no split (give --split)"}


def test_a_bench_run_is_read_at_the_chosen_operating_point():
    rules = load_run(RUN)  # the shape of `icm eval bench --json`: rows of benchmark, split, operating point, category, metric
    assert (rules.benchmark, rules.split, rules.operating_point) == ("unsafebench", "test", "rules")
    assert rules.find("f1", "sexual").interval == (0.74, 0.85)
    assert rules.find("recall", "overall").interval == (0.39, 0.47)
    assert rules.find("f1", "political") is None  # not judged: no figure
    spec = rules.find("specificity", "overall")  # 1 - FPR, as some papers print it
    assert spec.value == pytest.approx(0.9) and spec.interval == pytest.approx((0.883, 0.915))
    fpr5 = load_run(RUN, operating_point="fpr5")
    assert fpr5.find("f1", "overall").value == 0.45 and fpr5.find("f1", "sexual") is None
    with pytest.raises(ValueError, match="no operating point 'nope'; the run has rules, fpr5, recall95"):
        load_run(RUN, operating_point="nope")


def test_the_output_of_icm_eval_bench_is_read_as_it_is_written():
    """The JSON of `icm eval bench unsafebench tests/fixtures/bench/unsafebench --backend detector --json`
    (branch i24-bench at 791c695; stand-in labels, so the values mean nothing): its metrics rows are the join."""
    run = load_run(FIX / "bench-unsafebench-fixture.json")
    assert (run.name, run.benchmark, run.split, run.operating_point) == ("bench-unsafebench-fixture (detector)", "unsafebench", "test", "rules")
    assert {f.category for f in run.figures} == {"overall", "Sexual", "Violence"}  # Hate was not judged: no figures
    assert run.find("precision", "overall") is None  # nothing flagged: precision undefined, not a figure
    assert run.find("false_positive_rate", "overall").value == 0.0  # the bench's "fpr"
    spec = run.find("specificity", "overall")
    assert spec.value == 1.0 and spec.interval == pytest.approx((0.5101, 1.0), abs=1e-4) and spec.n == 8
    pub = [{**GOOD, "metric": "1 - FPR", "value": 95.9}]
    (row,) = compare_published(run, load_published_rows(pub)).rows
    assert row.comparable and row.ours == pytest.approx(100.0) and row.delta == pytest.approx(4.1)


def load_published_rows(figures: list[dict]) -> PublishedFile:
    return PublishedFile(path="-", figures=[PublishedFigure.model_validate(f) for f in figures])


def test_cli_puts_a_bench_run_beside_the_published_figures(tmp_path):
    html = tmp_path / "peers.html"
    r = runner.invoke(app, ["eval", "compare", str(RUN), "--published", str(PEERS), "--json", "--html", str(html)])
    assert r.exit_code == 0, r.output
    (c,) = json.loads(r.stdout)["published"]
    assert (c["run"], c["benchmark"], c["split"], c["operating_point"]) == ("icm-detector (detector)", "unsafebench", "test", "rules")
    got = {(x["model"], x["category"]): (x["comparable"], x["ours"], x["reason"]) for x in c["rows"]}
    assert got[("Peer A", "overall")] == (True, pytest.approx(50.0), "")
    assert got[("Peer A", "Sexual")] == (True, pytest.approx(80.0), "")
    assert got[("Peer B", "overall")][:2] == (False, None) and "other split" in got[("Peer B", "overall")][2]
    page = html.read_text(encoding="utf-8")
    assert "icm-detector (detector) beside published figures" in page and "other split: published on validation" in page
    assert "Peer A paper, Table 1 (https://example.org/a)" in page
    # the terminal table, at the run's other operating point
    r = runner.invoke(app, ["eval", "compare", str(RUN), "--published", str(PEERS), "--operating-point", "fpr5"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert "icm-detector (detector) on unsafebench, split test, fpr5: 1 of 6 published figures comparable" in r.output
    assert "[1] Peer A paper, Table 1 (https://example.org/a)" in r.output


def test_cli_reads_a_summary_of_today_with_the_benchmark_and_split_given():
    summary = FIX / "detector-sample-summary.json"  # `icm eval run` of the three sample photos, detector backend
    pub = FIX / "samples-published.yaml"
    r = runner.invoke(app, ["eval", "compare", str(summary), "--published", str(pub), "--json"])
    assert r.exit_code == 0, r.output
    (c,) = json.loads(r.stdout)["published"]
    assert {x["reason"] for x in c["rows"]} == {"the run names no benchmark (give --benchmark)"}
    r = runner.invoke(app, ["eval", "compare", str(summary), "--published", str(pub), "--benchmark", "icm-samples",
                            "--split", "all", "--json"])
    assert r.exit_code == 0, r.output
    (c,) = json.loads(r.stdout)["published"]
    rows = {(x["metric"], x["category"]): x for x in c["rows"]}
    assert rows[("accuracy", "overall")]["comparable"] and rows[("accuracy", "overall")]["ours"] == pytest.approx(100.0)
    assert rows[("accuracy", "upper-normal")]["comparable"]  # the summary's per-category accuracy, upper_normal
    assert rows[("accuracy", "upper-normal")]["ours_interval"][0] == pytest.approx(34.238, abs=1e-3)
    assert not rows[("f1", "overall")]["comparable"]  # undefined with no positives: not a figure
    # two summaries: side by side as before, and each beside the published figures
    r = runner.invoke(app, ["eval", "compare", str(summary), str(summary), "--published", str(pub), "--benchmark", "icm-samples",
                            "--split", "all", "--json"])
    assert r.exit_code == 0, r.output
    both = json.loads(r.stdout)
    assert len(both["published"]) == 2 and both["runs"]["rows"] and len(both["runs"]["runs"]) == 2


def test_cli_errors_name_the_file(tmp_path):
    bad = _write(tmp_path, [GOOD, {**GOOD, "model": "Broken peer", "metric": "f2"}])
    r = runner.invoke(app, ["eval", "compare", str(RUN), "--published", str(bad)])
    assert r.exit_code == 2 and "entry 2 (model 'Broken peer')" in r.output and "pub.yaml" in r.output
    r = runner.invoke(app, ["eval", "compare", str(RUN), "--split", "test"])
    assert r.exit_code == 2 and "go with --published" in r.output
    notrun = tmp_path / "x.json"
    notrun.write_text('{"not": "a run"}')
    r = runner.invoke(app, ["eval", "compare", str(notrun), "--published", str(PEERS)])
    assert r.exit_code == 2 and "x.json: neither" in r.output


def test_a_run_on_other_images_than_the_published_figure_is_not_comparable(tmp_path):
    """A trial run (--limit) or a partial copy of the data judges fewer images than the source
    measured: its figure sits beside the published one but is not called comparable."""
    pub = tmp_path / "p.yaml"
    pub.write_text(
        "figures:\n"
        "  - {model: Peer, benchmark: unsafebench, split: test, metric: f1, value: 60, n: 2000,\n"
        "     source: {citation: c, url: u, where: w}, verification: paper, checked: k}\n",
        encoding="utf-8",
    )
    def row(n):
        run = RunFigures(name="ours", source="run.json", benchmark="unsafebench", split="test",
                         figures=[RunFigure(metric="f1", value=0.5, n=n)])
        return compare_published(run, load_published(pub)).rows[0]
    assert row(2000).comparable and row(2000).delta == pytest.approx(-10.0)
    partial = row(8)
    assert not partial.comparable and partial.ours is None
    assert partial.reason == "other images: the run's f1 is on 8 images, the published one on 2000"
    assert row(None).comparable  # a run that does not say how many images: compared, as before
