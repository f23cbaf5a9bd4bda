"""The whole loop, shortened for CI: `icm demo e2e` on a small synthetic set.

The full run (bench/e2e.py: 1080 training images, 1500 steps) must reach an ICM accuracy
of 0.95 in under 10 minutes; this one trains on 270 images until the training loss is
below TARGET_LOSS (at most MAX_STEPS steps, else it fails naming the loss reached): a fixed
step count trains a different model on each CPU (issue 25). That is enough to be far above
the majority class (0.56 under the `general` rules) but not to be perfect.
What must hold exactly at any size: after switching the rule set, the decision changes
for precisely the images whose most likely product the new rule set relabels, with the
same adapter and no retraining.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from icm.cli.main import app
from icm.moderation.job import read_records
from icm.policy import load_policy

from tiny_models import test_seed

runner = CliRunner()

# The target: the logged training loss (mean over 25 steps of 16 examples, all examples:
# free-text conversations and general data too, so it never nears 0). Seed 0 on a 2-core
# Xeon went 0.62 at 500 steps, 0.41 at 575, 0.29 at 900; the cap leaves twice the steps.
TARGET_LOSS = 0.45
MAX_STEPS = 1200
# Held-out ICM accuracy is not implied by a training loss: this gate rests on measurement,
# and only says the model learned from the pixels (the majority class scores 0.56). At the
# target, seed 0 gave 0.759 (575 steps, with 1 or 2 threads and deterministic kernels alike),
# seed 1 0.887 (600 steps), seed 2 1.000 (650 steps); 0.65 is 6 of 54 images below the lowest seen.
MIN_ACCURACY = 0.65


@pytest.mark.slow
def test_demo_e2e_short(tmp_path: Path) -> None:
    work = tmp_path / "e2e"
    threads = int(os.environ.get("ICM_TEST_THREADS", "1"))  # as conftest.test_threads: 1 unless checking
    result = runner.invoke(app, [
        "demo", "e2e", "--workdir", str(work), "--train-images", "270", "--test-images", "54",
        "--general-examples", "100", "--max-steps", str(MAX_STEPS), "--target-loss", str(TARGET_LOSS),
        "--threads", str(threads), "--min-accuracy", str(MIN_ACCURACY), "--seed", str(test_seed()),
    ])
    report = work / "e2e.json"
    if report.exists():
        trained = json.loads(report.read_text())["train"]
        if not trained.get("reached_target_loss"):
            pytest.fail(f"e2e training reached its cap of {MAX_STEPS} steps before the target loss {TARGET_LOSS}: "
                        f"last logged loss {trained.get('last_loss')} after {trained.get('steps')} steps")
    assert result.exit_code == 0, result.output[-4000:]
    for stage in ("synth", "tiny model", "generate", "export", "train", "moderate", "eval", "relabel"):
        assert re.search(rf"^\[{stage}\] \d+\.\ds$", result.stderr, re.M), f"no time printed for {stage}"
    assert f"torch threads: {threads}" in result.stderr
    last = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"ICM accuracy: (0\.\d{4}|1\.0000)", last)
    assert m, last
    rep = json.loads((work / "e2e.json").read_text())
    assert abs(rep["icm_accuracy"] - float(m.group(1))) < 1e-4 and rep["icm_accuracy"] >= MIN_ACCURACY
    assert f"attribute-product accuracy: {rep['product_accuracy']:.4f}" in result.stdout

    # the data went through the real pipeline
    records = (work / "instruct" / "records.jsonl").read_text().splitlines()
    assert len(records) == 270
    assert rep["train"]["examples"]["general"] == 100 and 0 < rep["train"]["steps"] <= MAX_STEPS
    assert rep["train"]["reached_target_loss"] and rep["train"]["last_loss"] < TARGET_LOSS
    assert f"target training loss {TARGET_LOSS}: reached" in result.stdout

    # relabelling: recomputed here from the two moderation runs and the policy
    policy = load_policy("synth-shapes")
    general, teen = policy.labels("general"), policy.labels("teen")
    relabelled = {p for p in general if general[p].verdict != teen[p].verdict}
    assert set(rep["relabelled_products"]) == relabelled and len(relabelled) == 6
    before, _ = read_records(work / "moderate-general.jsonl")
    after, _ = read_records(work / "moderate-teen.jsonl")
    assert len(before) == len(after) == 54 and all(r.ok for r in before + after)
    after_by_path = {r.path: r for r in after}
    changed = {r.path for r in before if r.label != after_by_path[r.path].label}
    predicted_relabelled = {r.path for r in before if r.product in relabelled}
    assert changed == predicted_relabelled, "decisions must change exactly for images of relabelled products"
    assert all(after_by_path[r.path].attributes == r.attributes for r in before)  # same model, same evidence
    assert rep["relabel_exact"] is True and rep["decisions_changed"] == len(changed)
    assert all(r.rules == "teen" for r in after)
    assert all(r.label == teen[r.product].verdict for r in after if r.product)
    # no product (seed 1: the term and the attributes disagree, basis "conflict"): no decision, a person reviews
    assert all(r.label is None and r.verdict == "review" for r in after if not r.product)
