"""`icm eval bench NAME DATA`: public benchmarks read from their publishers' layouts, scored at three operating points.

The fixtures under tests/fixtures/bench/ (rebuilt by tests/fixtures/bench/build.py) hold
each benchmark's layout with the safe sample photos and synthetic drawings only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.bench import benchmark_names, get_benchmark, register
from icm.evaluation.bench.records import BenchDataError, BenchItem, Benchmark
from icm.evaluation.bench.run import BenchConfig, load_items, run_bench
from icm.evaluation.bench.scoring import Judged, choose_threshold, predict

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bench"
NAMES = ["unsafebench", "llavaguard", "vlguard", "smid", "safeeditbench"]
runner = CliRunner()


def _by_split(items: list[BenchItem]) -> dict[str, list[BenchItem]]:
    out: dict[str, list[BenchItem]] = {}
    for it in items:
        out.setdefault(it.split, []).append(it)
    return out


# -- loaders on their fixtures -----------------------------------------------------------------


def test_unsafebench_loader_reads_the_parquet_files_with_their_splits_and_categories():
    info, items, issues = load_items("unsafebench", FIXTURES / "unsafebench")
    assert issues == []
    splits = _by_split(items)
    assert sorted(splits) == ["test", "train"] and len(splits["test"]) == 8
    first = splits["train"][0]
    assert (first.label, first.category) == ("safe", "Sexual") and first.image_bytes and first.image_bytes[:2] == b"\xff\xd8"
    assert first.mapped == {"openai": ["sexual"], "llavaguard": ["O3", "O4"], "mlcommons": ["S12"]}
    spam = next(it for it in items if it.category == "Spam")
    assert spam.mapped == {} and "no category" in next(c.note for c in info.categories if c.native == "Spam")
    assert {it.extra["source"] for it in items} == {"Laion5B", "Lexica"}
    from icm.evaluation.bench.loaders import _unsafebench_category

    assert [_unsafebench_category(v) for v in ("self harm", "ILLEGAL ACTIVITY", "Memes")] == ["Self-harm", "Illegal activity", "Memes"]


def test_llavaguard_loader_reads_a_save_to_disk_folder_and_keeps_the_category_code():
    _, items, issues = load_items("llavaguard", FIXTURES / "llavaguard")
    assert issues == []
    splits = _by_split(items)
    assert sorted(splits) == ["test", "train"] and len(splits["train"]) == 7
    assert [it.category for it in splits["test"]] == ["O3", "O3", "O2", "O2", "O1", "O1", "NA"]
    assert [it.label for it in splits["test"][:2]] == ["safe", "unsafe"]
    assert splits["test"][0].mapped == {"llavaguard": ["O3"]} and splits["test"][-1].mapped == {}
    assert all(it.image_bytes for it in items) and items[0].extra["rationale"]


def test_vlguard_loader_reads_the_json_and_image_folders():
    _, items, issues = load_items("vlguard", FIXTURES / "vlguard")
    assert issues == []
    test = _by_split(items)["test"]
    assert len(test) == 8 and all(Path(it.image_path or "").is_file() for it in test)
    unsafe = [it for it in test if it.label == "unsafe"]
    assert [it.category for it in unsafe] == ["risky behavior/sexually explicit", "risky behavior/violence",
                                              "discrimination/race", "deception/disinformation"]
    assert all(it.category is None for it in test if it.label == "safe")
    assert unsafe[2].mapped == {"openai": ["hate"], "llavaguard": ["O1"], "mlcommons": ["S10"]}


def test_smid_loader_turns_moral_ratings_into_labels_at_the_stated_cutoffs():
    info, items, issues = load_items("smid", FIXTURES / "smid")
    by_id = {it.id: it for it in items}
    assert len(items) == 10 and "N001_1" not in by_id  # moral_mean 3.0: ambiguous, left out
    assert by_id["H003_1"].label == "unsafe" and by_id["P005_1"].label == "safe"  # 2.2 < 2.5; 3.8 > 3.5
    assert by_id["H001_1"].category == "Care" and by_id["H001_1"].mapped["openai"] == ["violence"]
    assert [i.kind for i in issues] == ["note"] and "1 images with moral_mean between 2.5 and 3.5" in issues[0].problem
    assert "below 2.5 is unsafe, above 3.5 safe" in info.label_rule


def test_safeeditbench_loader_reads_the_class_labels_as_the_card_names_them():
    info, items, issues = load_items("safeeditbench", FIXTURES / "safeeditbench")
    assert issues == [] and len(items) == 10 and {it.split for it in items} == {"test"}
    assert [(it.label, it.category) for it in items[:3]] == [("safe", "Policy L1"), ("unsafe", "Policy L1"), ("safe", "Policy L2")]
    assert all(it.mapped == {} for it in items) and "not a content category" in info.categories[0].note


# -- bad input: the file named, the rest goes on -----------------------------------------------


def test_a_file_missing_a_column_is_named_and_the_other_split_still_loads(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "unsafebench"
    shutil.copytree(FIXTURES / "unsafebench", root)
    train = root / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pq.read_table(train).drop(["safety_label"]), train)
    _, items, issues = load_items("unsafebench", root)
    assert len(issues) == 1 and issues[0].file == str(train)
    assert "missing column 'safety_label'" in issues[0].problem and "image, category, source" in issues[0].problem
    assert {it.split for it in items} == {"test"} and len(items) == 8


def test_a_csv_without_its_rating_column_is_named_and_nothing_is_scored_from_it(tmp_path):
    root = tmp_path / "smid"
    shutil.copytree(FIXTURES / "smid", root)
    norms = root / "SMID_norms.csv"
    norms.write_text(norms.read_text().replace("moral_mean", "moral_avg"))
    _, items, issues = load_items("smid", root)
    assert items == [] and issues[0].file == str(norms) and "missing column 'moral_mean'" in issues[0].problem
    with pytest.raises(BenchDataError, match="moral_mean"):  # nothing usable: the error carries why
        run_bench(BenchConfig(name="smid", data=str(root), out_dir=str(tmp_path / "out")))


def test_no_data_of_the_layout_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(BenchDataError, match=str(tmp_path)):
        load_items("vlguard", tmp_path)
    with pytest.raises(BenchDataError, match="no parquet file"):
        load_items("unsafebench", tmp_path)


def test_cli_names_a_missing_image_file_and_scores_the_rest(tmp_path):
    root = tmp_path / "vlguard"
    shutil.copytree(FIXTURES / "vlguard", root)
    gone = root / "test" / "fixture" / "test_1.jpg"
    gone.unlink()
    r = runner.invoke(app, ["eval", "bench", "vlguard", str(root), "--backend", "detector", "--json",
                            "-o", str(tmp_path / "out"), "--bootstrap", "50"])
    assert r.exit_code == 1, r.output  # something was left out
    assert str(gone) in r.stderr and "does not exist" in r.stderr
    rep = json.loads(r.stdout)
    assert rep["images"]["test"] == 7 and rep["overall"]["positives"] + rep["overall"]["negatives"] == 7
    assert any(m["category"] == "overall" for m in rep["metrics"])


# -- operating points ----------------------------------------------------------------------------


def test_thresholds_hit_their_targets_on_the_tuning_labels():
    y = np.array([True] * 20 + [False] * 20)
    s = np.r_[np.linspace(0.5, 1.0, 20), np.linspace(0.0, 0.6, 20)]
    t = choose_threshold(y, s, "fpr5")
    assert t is not None and (s[~y] >= t).mean() <= 0.05
    assert (s[~y] >= s[s < t].max()).mean() > 0.05  # the smallest such threshold: one score lower breaks the target
    r = choose_threshold(y, s, "recall95")
    assert r is not None and (s[y] >= r).mean() >= 0.95 and (s[y] > r).mean() < 0.95


def _j(unsafe: bool, score: float) -> Judged:
    return Judged(unsafe=unsafe, score=score, blocked=False, review=False, judged=True)


def test_thresholds_come_from_the_tuning_split_never_from_the_reported_one():
    # on the reported split a threshold of 0.5 would separate perfectly; the tuning split says 0.9
    report = [_j(True, 0.6), _j(True, 0.7), _j(False, 0.1), _j(False, 0.2)]
    tune = [_j(True, 0.95), _j(True, 0.9), _j(False, 0.3), _j(False, 0.85)]
    pred, op = predict("recall95", report, tune)
    assert op.thresholds == [0.9] and pred is not None and not pred.any()
    pred, op = predict("recall95", report, None, folds=2)  # no tuning split: folds of the reported one
    assert len(op.thresholds) == 2 and "cross-validation" in op.note


def test_the_rules_point_counts_block_as_unsafe_and_says_how_many_went_to_review():
    rows = [Judged(True, 0.9, True, False, True), Judged(True, 0.6, False, True, True), Judged(False, 0.2, False, True, True)]
    pred, op = predict("rules", rows, None)
    assert pred is not None and pred.tolist() == [True, False, False] and op.review == 2


# -- registry --------------------------------------------------------------------------------------


def test_registry_is_lazy_and_names_the_known_benchmarks():
    code = ("import sys, icm.evaluation.bench as b; assert 'icm.evaluation.bench.loaders' not in sys.modules; "
            "b.get_benchmark('smid'); assert 'icm.evaluation.bench.loaders' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(NAMES) <= set(benchmark_names())
    with pytest.raises(KeyError, match=r"unknown benchmark 'nope'.*unsafebench"):
        get_benchmark("nope")

    @register(Benchmark(name="mine-test", title="t", source="s", layout="l"))
    def _load(root: Path):
        yield from ()

    assert get_benchmark("mine-test")[1] is _load


# -- end to end -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_cli_bench_on_each_fixture_with_the_detector(name, tmp_path):
    out = tmp_path / "out"
    html = tmp_path / "report.html"
    args = ["eval", "bench", name, str(FIXTURES / name), "--backend", "detector", "--json", "-o", str(out),
            "--bootstrap", "100", "--html", str(html)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["benchmark"] == name and rep["policy"] == "icm-standard" and rep["backend"] == "detector"
    assert (rep["split"], rep["tune_split"]) == {"smid": ("all", "cv-5"), "safeeditbench": ("test", "cv-5")}.get(name, ("test", "train"))
    overall = [m for m in rep["metrics"] if m["category"] == "overall"]
    assert {(m["operating_point"], m["metric"]) for m in overall} == {
        (p, k) for p in ("rules", "fpr5", "recall95") for k in ("precision", "recall", "f1", "fpr", "balanced_accuracy")}
    assert all(m["benchmark"] == name and m["split"] == rep["split"] for m in rep["metrics"])
    rec = next(m for m in overall if m["operating_point"] == "recall95" and m["metric"] == "recall")
    assert rec["interval"]["method"] == "wilson" and rec["interval"]["low"] <= rec["value"] <= rec["interval"]["high"]
    rules = next(o for o in rep["overall"]["operating_points"] if o["name"] == "rules")
    assert rules["review"] is not None  # the detector sends the policies it cannot judge to review: counted and said
    cats = {c["category"]: c for c in rep["categories"]}
    sexual = {"unsafebench": "Sexual", "llavaguard": "O3", "vlguard": "risky behavior/sexually explicit"}.get(name)
    if sexual:  # open_nsfw judges every image: scored
        assert cats[sexual]["status"] == "scored" and cats[sexual]["coverage"] == 1.0
        assert any(m["category"] == sexual for m in rep["metrics"])
    hate = {"unsafebench": "Hate", "llavaguard": "O1", "vlguard": "discrimination/race"}.get(name)
    if hate:  # the detector reads no hate in drawings: not judged, with its coverage, and not scored
        assert cats[hate]["status"] == "not_judged" and cats[hate]["coverage"] == 0.0
        assert not any(m["category"] == hate for m in rep["metrics"])
    page = html.read_text()
    assert rep["title"].split(" (")[0] in page and "recall 95%" in page
    if name == "smid":  # resumable: a second run moderates nothing again
        first = (out / "records.jsonl").read_text()
        assert runner.invoke(app, args).exit_code == 0
        assert (out / "records.jsonl").read_text() == first


def test_fixtures_stay_tiny():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 300_000
