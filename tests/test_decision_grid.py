"""The attribute grid's precedence, its validation, and conflicting or degenerate evidence."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.engine import _reason
from icm.policy import PolicyError, decide, load_policy, load_policy_file, parse_policy

runner = CliRunner()


def one_hot(**values: str) -> dict[str, dict[str, float]]:
    return {a: {v: 1.0} for a, v in values.items()}


# -- precedence on icm-sexy ---------------------------------------------------------------


def test_icm_sexy_grid_precedence_is_as_documented():
    policy = load_policy("icm-sexy")
    grid = policy.grid
    assert grid.n_cells == 4 * 9 * 11 * 6 and not grid.ties

    def owner(**cell: str) -> str | None:
        idx = tuple(grid.values[k].index(cell[a]) for k, a in enumerate(grid.attributes))
        o = int(grid.owner[idx])
        return None if o < 0 else policy.products[o].id

    # the more specific product wins: a region x exposure pair beats an action or a cue
    assert owner(region="upper", exposure="chest", action="kiss", cue="wet_clothes") == "upper_chest"
    # equally specific action and cue: the action wins (the cues have priority -1)
    assert owner(region="upper", exposure="normal", action="kiss", cue="wet_clothes") == "kiss"
    assert owner(region="whole", exposure="normal", action="none", cue="male_bare_torso") == "male_bare_torso"
    # an X_normal product owns exactly its one cell
    assert owner(region="whole", exposure="normal", action="none", cue="none") == "whole_normal"
    assert grid.cells_per_product()["whole_normal"] == 1
    # a region x exposure pair that is not a product, with no action and no cue: uncovered
    assert owner(region="upper", exposure="legs", action="none", cue="none") is None
    assert grid.n_uncovered == 16


def test_the_old_one_hot_failure_cannot_happen():
    """Old model: upper / legs / none / none scored every product 0, fell back to uniform and a
    lexicographic tie-break named whole_normal with P(violation) 0.886."""
    policy = load_policy("icm-sexy")
    evidence = one_hot(region="upper", exposure="legs", action="none", cue="none")
    d = decide(policy, "icm-default", attributes=evidence)
    assert d.product is None and d.basis == "attributes"
    assert d.p_uncovered > 0.9999 and d.cell == {"region": "upper", "exposure": "legs", "action": "none", "cue": "none"}
    assert d.label.rule == "default" and d.label.violates and d.verdict == "block"
    assert d.p_violation > 0.9999
    reason = _reason(policy, d)
    assert "no product covers" in reason and "exposure=legs" in reason
    # the adult platform's default allows them
    a = decide(policy, "adult-platform", attributes=evidence)
    assert a.product is None and not a.label.violates and a.verdict == "allow"
    # hard one-hot answers never zero the grid: every product keeps a little mass
    assert all(m > 0 for m in d.products.values())


# -- conflict ---------------------------------------------------------------------------------


def test_term_contradicting_the_attributes_is_a_conflict_sent_to_review():
    policy = load_policy("icm-sexy")
    attrs = one_hot(region="upper", exposure="normal", action="none")
    attrs["cue"] = {"none": 0.97, "wet_clothes": 0.03}
    d = decide(policy, "icm-default", attributes=attrs, p_term=0.99)
    assert d.basis == "conflict" and d.verdict == "review"
    assert d.product is None and d.label is None
    assert "says yes (P(Yes)=0.99)" in d.conflict and "upper_normal (P=0.97)" in d.conflict and "not sexy" in d.conflict
    # the range spans what each source says: the attributes' ~0.03 and the term's 0.99
    lo, hi = d.p_violation_range
    assert lo < 0.05 and hi >= 0.99 and lo <= d.p_violation <= hi
    assert abs(sum(d.products.values()) + d.p_uncovered - 1) < 1e-9
    reason = _reason(policy, d)
    assert reason.startswith("Conflicting evidence:") and "upper_normal" in reason
    # hard answers on both sides: still a conflict, never a named product
    hard = decide(policy, "icm-default", attributes=one_hot(region="upper", exposure="normal", action="none", cue="none"), p_term=1.0)
    assert hard.basis == "conflict" and hard.product is None and hard.verdict == "review"
    # the other direction: a confident "no" against confidently violating attributes
    no = decide(policy, "icm-default", attributes=one_hot(region="upper", exposure="chest", action="none", cue="none"), p_term=0.0)
    assert no.basis == "conflict" and "says no" in no.conflict and "upper_chest" in no.conflict and "which is sexy" in no.conflict


def test_agreeing_or_uncertain_evidence_is_no_conflict():
    policy = load_policy("icm-sexy")
    normal = one_hot(region="upper", exposure="normal", action="none", cue="none")
    assert decide(policy, attributes=normal, p_term=0.01).basis == "attributes"
    # a term answer between 0.05 and 0.95 can never conflict (Z >= min(p, 1 - p))
    d = decide(policy, attributes=normal, p_term=0.94)
    assert d.basis == "attributes" and d.product == "upper_normal"
    # uncovered cells of a policy whose positivity is unknown do not contradict the term
    unknown = load_policy("icm-sexy").model_copy(update={"uncovered_positive": None})
    legs = one_hot(region="upper", exposure="legs", action="none", cue="none")
    assert decide(unknown, attributes=legs, p_term=0.0).basis == "attributes"
    assert decide(policy, attributes=legs, p_term=0.0).basis == "conflict"  # icm-sexy: they are sexy


def test_fusion_follows_the_stated_formula():
    """P'(cell) = P(cell) L(cell) / Z with L = p_term on positive cells, 1 - p_term elsewhere."""
    policy = load_policy("icm-sexy")
    attrs = one_hot(region="upper", action="none", cue="none")
    attrs["exposure"] = {"normal": 0.5, "chest": 0.5}
    d = decide(policy, attributes=attrs, p_term=0.8)
    # two cells carry (almost) all the mass: upper_normal (not positive), upper_chest (positive)
    assert d.products["upper_chest"] == pytest.approx(0.8, abs=1e-4)
    assert d.products["upper_normal"] == pytest.approx(0.2, abs=1e-4)
    assert decide(policy, attributes=attrs, p_term=0.02).product == "upper_normal"
    assert decide(policy, attributes=attrs, p_term=0.98).product == "upper_chest"


def test_an_attribute_without_any_mass_is_a_conflict():
    policy = load_policy("icm-sexy")
    attrs = one_hot(region="upper", action="none", cue="none")
    attrs["exposure"] = {"normal": 0.0, "chest": 0.0}
    d = decide(policy, attributes=attrs)
    assert d.basis == "conflict" and d.verdict == "review" and d.product is None
    assert "'exposure'" in d.conflict and "no probability" in d.conflict
    assert d.p_violation_range == (0.0, 1.0)
    # with a term score, its range is still reported, but the verdict stays review
    t = decide(policy, "icm-default", attributes=attrs, p_term=0.99)
    assert t.basis == "conflict" and t.verdict == "review" and t.p_violation_range == pytest.approx((0.99, 0.99))
    assert decide(policy, products={"kiss": 0.0}).basis == "conflict"


def test_partial_attributes_still_name_no_product_and_keep_the_term_range():
    policy = load_policy("icm-sexy")
    d = decide(policy, "general-audience", attributes={"exposure": {"chest": 1.0}}, p_term=0.9)
    assert d.product is None and d.basis == "term" and d.p_uncovered is None
    assert d.p_violation_range == pytest.approx((0.0, 0.9)) and d.verdict == "review"


def test_products_evidence_has_no_uncovered_mass():
    policy = load_policy("gambling")
    d = decide(policy, products={"casino_table": 3.0, "none": 1.0}, p_term=0.5)
    assert d.basis == "products" and d.product == "casino_table" and d.p_uncovered is None
    assert sum(d.products.values()) == pytest.approx(1.0) and d.products["casino_table"] == pytest.approx(0.75, abs=1e-4)


# -- validation ---------------------------------------------------------------------------------

TINY = """\
name: tiny
term: {id: bad, question: "Is the image bad?"}
attributes:
  - id: colour
    question: Which colour dominates?
    values:
      - {id: red, description: Red}
      - {id: blue, description: Blue}
  - id: shape
    question: Which shape is shown?
    values:
      - {id: square, description: A square}
      - {id: circle, description: A circle}
products:
  - {id: red, assignment: {colour: red}, description: Red.}
  - {id: square, assignment: {shape: square}, description: A square.}%s
  - {id: blue_circle, assignment: {colour: blue, shape: circle}, description: A blue circle., positive: false}
rule_sets:
  - name: strict
    audience: everyone
    rules:
      - {products: [blue_circle], label: allow}%s
"""


def test_an_unresolved_tie_is_an_error_at_file_and_line(tmp_path):
    f = tmp_path / "tie.yaml"
    f.write_text(TINY % ("  # ERROR tie", "\n    default: violate"))
    with pytest.raises(PolicyError) as info:
        load_policy_file(f)
    (issue,) = info.value.issues
    assert issue.line == 16 and issue.file == str(f)
    assert "'red' and 'square'" in issue.message and "colour=red, shape=square" in issue.message and "priority" in issue.message
    result = runner.invoke(app, ["policy", "validate", str(f)])
    assert result.exit_code == 1 and f"{f}:16:" in result.output.replace("\n", "")
    # a priority resolves it, and the cell goes to the higher one
    f.write_text((TINY % ("", "\n    default: violate")).replace("description: A square.}", "description: A square., priority: 1}"))
    policy, _ = load_policy_file(f)
    d = decide(policy, attributes=one_hot(colour="red", shape="square"))
    assert d.product == "square"


def test_uncovered_cells_without_a_default_are_an_error_naming_a_cell(tmp_path):
    f = tmp_path / "uncovered.yaml"
    text = (TINY % ("", "")).replace("{id: square, assignment: {shape: square}", "{id: red_square, assignment: {colour: red, shape: square}")
    text = text.replace("  - name: strict\n", "  - name: strict  # ERROR no default\n")
    allow_blue = "      - {products: [blue_circle], label: allow}"
    text = text.replace(allow_blue, allow_blue + "\n      - {products: [red, red_square], label: violate}")
    f.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy_file(f)
    (issue,) = info.value.issues
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "# ERROR" in ln)
    assert issue.line == line and "colour=blue, shape=square" in issue.message and "no default" in issue.message
    # with a default the same policy is valid, and validate reports the cells as info
    f.write_text(text + "    default: violate\n")
    policy, warnings = load_policy_file(f)
    assert not warnings and policy.grid.n_uncovered == 1
    result = runner.invoke(app, ["policy", "validate", "--strict", str(f)])
    assert result.exit_code == 0 and "info: 1 of 4 cells" in result.output.replace("\n", " ")
    data = json.loads(runner.invoke(app, ["policy", "validate", "--json", str(f)]).output)
    assert data[0]["ok"] and data[0]["grid"] == {"cells": 4, "uncovered": 1, "uncovered_example": {"colour": "blue", "shape": "square"}}


def test_builtin_policies_resolve_every_tie_in_their_yaml():
    sexy = resources.files("icm.policies").joinpath("icm-sexy.yaml").read_text()
    without = "\n".join(ln for ln in sexy.splitlines() if "priority: -1" not in ln)
    with pytest.raises(PolicyError) as info:
        parse_policy(without, "icm-sexy.yaml")
    # each of the 10 actions ties with each of the 5 cues
    assert len(info.value.issues) == 50 and all("priority" in i.message for i in info.value.issues)
    for name in ("icm-sexy", "horrifying", "gambling", "synth-shapes"):
        assert not load_policy(name).grid.ties


def test_policy_show_prints_cells_and_precedence():
    shown = json.loads(runner.invoke(app, ["policy", "show", "icm-sexy", "--json"]).output)
    assert shown["grid"]["cells"] == 2376 and shown["grid"]["uncovered"] == 16
    assert sum(shown["grid"]["cells_per_product"].values()) + 16 == 2376
    assert shown["grid"]["uncovered_labels"]["adult-platform"]["verdict"] == "allow"
    table = runner.invoke(app, ["policy", "show", "icm-sexy"])
    out = " ".join(table.output.split())
    assert table.exit_code == 0 and "Precedence: each of the 2376 cells" in out and "(uncover" in out
