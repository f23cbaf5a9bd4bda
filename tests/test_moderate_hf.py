"""`icm moderate --backend hf` on a tiny LLaVA with a LoRA adapter trained in the fixture.

The adapter learned to answer "Is the image red?" from the pixels; a two-product policy
whose term question is that question must block red squares and allow blue ones, through
the real CLI, the real backend and the real decision path.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.job import read_records

from square_policy import square_policy
from tiny_models import COLOR_P_CORRECT, held_out_squares, square_image

POLICY = square_policy("redness", tags=False, extra_rule_sets="""  - name: anything-goes
    audience: everyone
    rules: [{products: [red_square, blue_square], label: allow}]
""")


def test_moderate_with_a_tuned_adapter_through_the_cli(tmp_path, tiny_llava_path, color_adapter_path):
    policy = tmp_path / "redness.yaml"
    policy.write_text(POLICY)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    # The fixture trains until every question about these held-out squares is answered with
    # probability > COLOR_P_CORRECT (~0.94, see tiny_models): P(Yes) to "red?" is above it for
    # red and below 1 - it for blue; the hue's most likely option is the drawn colour with
    # P > it, so P(violation) under no-red is > 0.94 for red (>= block 0.7) and < 0.06 for
    # blue (< review 0.3): block and allow. That holds on any CPU and any ICM_TEST_SEED.
    for color in ("red", "blue"):
        for i, image in enumerate(held_out_squares(color, 3)):
            image.save(imgs / f"{color}{i}.png")  # PNG: lossless, the pixels the fixture checked
    out = tmp_path / "out.jsonl"
    args = ["moderate", str(imgs), "--policy", str(policy), "--backend", "hf", "--model", str(tiny_llava_path),
            "--adapter", str(color_adapter_path), "--out", str(out), "--batch-size", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records, _ = read_records(out)
    assert len(records) == 6
    for r in records:
        red = Path(r.path).name.startswith("red")
        assert r.term.source == "logits"
        assert (r.term.p_yes > COLOR_P_CORRECT) if red else (r.term.p_yes < 1 - COLOR_P_CORRECT), (r.path, r.term.p_yes)
        assert r.basis == "attributes" and set(r.attributes) == {"hue"}
        assert r.product == ("red_square" if red else "blue_square")
        assert r.verdict == ("block" if red else "allow")
        assert str(color_adapter_path) in r.model
    reds = [r.term.p_yes for r in records if Path(r.path).name.startswith("red")]
    blues = [r.term.p_yes for r in records if Path(r.path).name.startswith("blue")]
    assert min(reds) - max(blues) > 2 * COLOR_P_CORRECT - 1, (reds, blues)
    # the same model, another rule set: the evidence stays, the verdicts change
    out2 = tmp_path / "out2.jsonl"
    result = CliRunner().invoke(app, [*args[:-4], "--out", str(out2), "--rules", "anything-goes"])
    assert result.exit_code == 0, result.output
    records2, _ = read_records(out2)
    assert all(r.verdict == "allow" for r in records2)
    before = {r.path: r.term.p_yes for r in records}
    assert all(abs(before[r.path] - r.term.p_yes) < 1e-5 for r in records2)


def test_a_model_that_does_not_answer_with_the_labels_is_never_allowed(tmp_path, tiny_llava_path):
    """The untrained tiny LLaVA's next token is anything but Yes/No or B/C: every question is
    not judged (off-format, or refused when its top token starts a refusal), so no image is
    allowed, none gets a product, and the record says why."""
    policy = tmp_path / "redness.yaml"
    policy.write_text(POLICY)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        square_image("blue", seed=i).save(imgs / f"blue{i}.png")
    out = tmp_path / "out.jsonl"
    args = ["moderate", str(imgs), "--policy", str(policy), "--backend", "hf", "--model", str(tiny_llava_path),
            "--out", str(out), "--rules", "anything-goes"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records, _ = read_records(out)
    assert len(records) == 2
    for r in records:
        assert r.ok and r.verdict == "review" and r.product is None
        assert r.term.p_yes is None and r.attributes == {}
        assert set(r.unanswered) == {"term:red", "attr:hue"}
        assert all(v.startswith(("off-format", "refused")) and "< 0.5" in v for v in r.unanswered.values())
    # with the check off, the same model's noise would have been read as answers
    result = CliRunner().invoke(app, [*args[:-4], "--out", str(tmp_path / "lax.jsonl"), "--min-label-mass", "0"])
    lax, _ = read_records(tmp_path / "lax.jsonl")
    assert all(r.term.p_yes is not None and r.attributes for r in lax)
