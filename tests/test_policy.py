"""The policy engine on the built-in policies, malformed fixtures and the paper's data."""

from __future__ import annotations

import csv
import json
import re
from importlib import resources
from pathlib import Path

import pytest
from conftest import FIXTURES
from typer.testing import CliRunner

from icm.cli.main import app
from icm.policy import PolicyError, builtin_policy_names, decide, load_policy, load_policy_file, parse_policy
from icm.policy.diff import diff_rule_sets
from icm.policy.prompts import compile_prompts, stage_prompts

runner = CliRunner()
POLICY_FIXTURES = FIXTURES / "policies"


def test_builtin_policies_load_and_validate_cleanly():
    names = builtin_policy_names()
    assert {"icm-sexy", "horrifying", "gambling"} <= set(names)
    for name in names:
        policy = load_policy(name)
        assert len(policy.rule_sets) >= 3, name
        # every product gets exactly one label under every rule set
        for rs in policy.rule_sets:
            labels = policy.labels(rs)
            assert set(labels) == set(policy.product_map)
    files = [str(f) for f in resources.files("icm.policies").iterdir() if f.name.endswith(".yaml")]
    result = runner.invoke(app, ["policy", "validate", "--strict", *files])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "fixture",
    sorted(p.name for p in POLICY_FIXTURES.glob("*.yaml") if "# ERROR" in p.read_text()),
)
def test_malformed_fixture_fails_with_file_and_line(fixture):
    path = POLICY_FIXTURES / fixture
    expected_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if "# ERROR" in line)
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    lines = {i.line for i in info.value.issues}
    assert expected_line in lines, str(info.value)
    assert all(i.file == str(path) for i in info.value.issues)
    # the CLI says the same, as FILE:LINE, and fails
    result = runner.invoke(app, ["policy", "validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:{expected_line}:" in result.output.replace("\n", "")


def test_unused_value_is_a_warning_not_an_error():
    path = POLICY_FIXTURES / "unused_value.yaml"
    policy, warnings = load_policy_file(path)
    assert policy.name == "tiny"
    assert [w.level for w in warnings] == ["warning"]
    assert "'large'" in warnings[0].message
    assert warnings[0].line == next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "# WARNING" in ln)
    assert runner.invoke(app, ["policy", "validate", str(path)]).exit_code == 0
    assert runner.invoke(app, ["policy", "validate", "--strict", str(path)]).exit_code == 1


def test_missing_file_and_non_mapping_are_clear_errors(tmp_path):
    with pytest.raises(PolicyError, match="no such file"):
        load_policy_file(tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(PolicyError, match=r"list\.yaml:1: error: a policy file must be a YAML mapping"):
        load_policy_file(f)


def test_icm_sexy_contains_the_papers_33_combinations(seed_dir):
    policy = load_policy("icm-sexy")
    with open(seed_dir / "rule_definition.csv", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 33
    sources = {p.source.split('"')[1]: p for p in policy.products if p.source and p.source.startswith("rule_definition.csv")}

    def norm(s: str) -> str:
        return s.replace("\u2019", "'").strip()

    for row in rows:
        product = sources[row["Attribute combination"]]
        assert norm(product.description).rstrip(".") == norm(row["Explicit description"]).rstrip(".")
        assert product.positive == ("normal" not in row["Attribute combination"])


def _categories_in(seed_dir: Path) -> dict[str, set[str]]:
    """Category names of every image named in the seed data, by where they appear."""
    pat = re.compile(r"^(.+?)_\d{6,}")
    found: dict[str, set[str]] = {}

    def add(name: str, where: str) -> None:
        m = pat.match(Path(name).name)
        assert m, f"{where}: cannot read a category from {name!r}"
        found.setdefault(m.group(1), set()).add(where)

    for sub in ("mc", "qa", "reason/1"):
        for f in (seed_dir / "icm-instruct-raw" / sub).iterdir():
            add(f.name, f"icm-instruct-raw/{sub}")
    for rec in json.loads((seed_dir / "eval/icm_val/llava-v1.5-7b-after-baseline.json").read_text()):
        add(rec["image_name"], "eval/icm_val")
    for f in ("mc_gt.txt", "openqa_gt.txt"):
        lines = (seed_dir / "eval/mqa" / f).read_text(encoding="utf-8").splitlines()
        for line in lines[0::2]:
            if line.strip():
                add(line.strip(), f"eval/mqa/{f}")
    lines = (seed_dir / "eval/meq/gt_description.txt").read_text(encoding="utf-8").splitlines()
    for line in lines[0::2]:
        if line.strip():
            add(line.strip(), "eval/meq")
    for f in (seed_dir / "eval/meq/judgements").iterdir():
        add(f.name, "eval/meq/judgements")
    return found


def test_every_category_of_the_published_data_resolves_to_exactly_one_product(seed_dir):
    policy = load_policy("icm-sexy")
    found = _categories_in(seed_dir)
    assert len(found) == 35, sorted(found)
    resolved = {}
    for category in found:
        claimants = [p.id for p in policy.products if category in p.categories or category == p.id]
        assert len(claimants) == 1, (category, claimants)
        resolved[category] = policy.resolve_category(category).id
        assert resolved[category] == claimants[0]
    # the paper's convention: categories with "normal" are the not-sexy ones
    for category, pid in resolved.items():
        assert policy.product(pid).positive == ("normal" not in category), category
    # 35 categories, 35 distinct products: no two categories collapse into one
    assert len(set(resolved.values())) == 35


def test_icm_test_binary_names_are_term_labels_not_products(seed_dir):
    """ICM-Test names only the term (sexy_/not-sexy_), so it resolves to no product."""
    policy = load_policy("icm-sexy")
    names = {r["image_name"].split("_")[0] for r in json.loads((seed_dir / "eval/icm_test/llava-v1.5-7b-after-baseline.json").read_text())}
    assert names == {"sexy", "not-sexy"}
    for n in names:
        with pytest.raises(KeyError):
            policy.resolve_category(n)


def test_rule_sets_relabel_products_as_documented():
    policy = load_policy("icm-sexy")
    default = policy.labels("icm-default")
    assert {p for p, lab in default.items() if not lab.violates} == {"upper_normal", "middle_normal", "lower_normal", "whole_normal"}
    general = policy.labels("general-audience")
    for pid in ("whole_legs", "upper_back", "middle_belly", "male_bare_torso"):
        assert not general[pid].violates, pid
    for pid in ("upper_chest", "middle_hips", "middle_crotch", "lower_hips"):
        assert general[pid].violates and general[pid].severity == "high", pid
    children = policy.labels("children")
    assert all(lab.violates == policy.product(p).positive for p, lab in children.items())


def test_diff_lists_exactly_the_relabelled_products():
    policy = load_policy("icm-sexy")
    d = diff_rule_sets(policy, "icm-default", policy, "general-audience")
    a, b = policy.labels("icm-default"), policy.labels("general-audience")
    expected = {p for p in a if (a[p].verdict, a[p].severity) != (b[p].verdict, b[p].severity)}
    assert {c.product for c in d.changes} == expected
    assert d.unchanged == len(policy.products) - len(expected)
    assert d.verdict_changes == sum(a[p].verdict != b[p].verdict for p in expected) == 10
    c = diff_rule_sets(policy, "icm-default", policy, "children")
    assert c.verdict_changes == 0 and len(c.changes) == 31  # stricter severity, same verdicts
    assert (c.thresholds_after.review, c.thresholds_after.block) == (0.15, 0.5)
    result = runner.invoke(app, ["policy", "diff", "icm-sexy:icm-default", "icm-sexy:general-audience", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {c["product"] for c in data["changes"]} == expected
    assert runner.invoke(app, ["policy", "diff", "icm-sexy:nope", "icm-sexy:children"]).exit_code == 2


def test_policy_cli_list_show_prompts_json():
    out = json.loads(runner.invoke(app, ["policy", "list", "--json"]).output)
    assert {r["name"] for r in out} >= {"icm-sexy", "horrifying", "gambling"}
    shown = json.loads(runner.invoke(app, ["policy", "show", "icm-sexy", "--json"]).output)
    assert shown["labels"]["children"]["kiss"]["verdict"] == "violate"
    prompts = json.loads(runner.invoke(app, ["policy", "prompts", "gambling", "--json"]).output)
    assert prompts["term"]["prompt"].startswith("Is the image related to gambling?")
    assert len(prompts["stages"]) == 11
    table = runner.invoke(app, ["policy", "show", "horrifying"])
    assert table.exit_code == 0 and "horror-fandom" in table.output


def test_compiled_prompts_cover_every_attribute_and_product():
    policy = load_policy("icm-sexy")
    c = compile_prompts(policy)
    assert c.term.prompt == "Is the image sexy?\nAnswer with Yes or No."
    assert [a.attribute for a in c.attributes] == ["region", "exposure", "action", "cue"]
    exposure = c.attributes[1]
    assert exposure.letters == list("BCDEFGHJK")  # moderation option labels skip A, I and O
    assert "K. Nothing notable" in exposure.prompt
    stage = next(s for s in c.stages if s.product == "upper_chest")
    assert "cleavage" in stage.explicit and "The image is sexy" in stage.explanation
    assert "3. Is the image sexy?" in stage.combined


def test_decision_from_attributes_term_and_rules():
    policy = load_policy("icm-sexy")
    attrs = {
        "region": {"upper": 0.9, "middle": 0.05, "lower": 0.03, "whole": 0.02},
        "exposure": {"chest": 0.85, "normal": 0.1, "shoulders": 0.05},
        "action": {"none": 0.95, "kiss": 0.05},
        "cue": {"none": 1.0},
    }
    d = decide(policy, "icm-default", attributes=attrs)
    assert d.product == "upper_chest" and d.label.violates and d.basis == "attributes"
    assert d.verdict == "block" and 0.7 <= d.p_violation <= 1.0
    assert abs(sum(d.products.values()) + d.p_uncovered - 1.0) < 1e-9  # products and the uncovered cells
    # the same evidence under another rule set: same product, other label
    d2 = decide(policy, "adult-platform", attributes=attrs)
    assert d2.product == "upper_chest" and not d2.label.violates and d2.verdict == "allow"
    # a normal image
    normal = dict(attrs, exposure={"normal": 0.97, "chest": 0.03})
    d3 = decide(policy, "icm-default", attributes=normal)
    assert d3.product == "upper_normal" and d3.verdict == "allow" and d3.label.rule == "normal exposure"
    # a strong "No" from the term question pulls an ambiguous image towards normal
    ambiguous = dict(attrs, exposure={"normal": 0.5, "chest": 0.5})
    assert decide(policy, attributes=ambiguous, p_term=0.02).product == "upper_normal"
    assert decide(policy, attributes=ambiguous, p_term=0.98).product == "upper_chest"


def test_decision_with_partial_attributes_names_no_product():
    policy = load_policy("icm-sexy")
    d = decide(policy, attributes={"exposure": {"chest": 1.0}})
    assert d.product is None and d.basis == "none" and d.verdict == "review"


def test_term_only_decision_gives_a_range_that_depends_on_the_rule_set():
    policy = load_policy("icm-sexy")
    d = decide(policy, "icm-default", p_term=0.9)
    assert d.basis == "term" and d.product is None
    assert d.p_violation_range == pytest.approx((0.9, 0.9)) and d.verdict == "block"
    # general audience allows some positive products: the detector alone cannot block
    g = decide(policy, "general-audience", p_term=0.9)
    assert g.p_violation_range == pytest.approx((0.0, 0.9)) and g.verdict == "review"
    assert decide(policy, "general-audience", p_term=0.01).verdict == "allow"
    assert decide(policy, "children", p_term=0.6).verdict == "block"


def test_bad_evidence_is_rejected_clearly():
    policy = load_policy("icm-sexy")
    with pytest.raises(ValueError, match="no values"):
        decide(policy, attributes={"exposure": {"nose": 1.0}})
    with pytest.raises(KeyError, match="no attribute"):
        decide(policy, attributes={"mood": {"happy": 1.0}})
    with pytest.raises(ValueError, match="probability"):
        decide(policy, p_term=1.5)
    with pytest.raises(ValueError, match="not a finite"):
        decide(policy, products={"kiss": float("nan")})


def test_policy_round_trips_through_yaml():
    import yaml

    policy = load_policy("horrifying")
    text = yaml.safe_dump(policy.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    again, warnings = parse_policy(text, "roundtrip.yaml")
    assert again == policy and not warnings


def test_verdict_statements_read_naturally_for_noun_terms():
    gambling = load_policy("gambling")
    assert gambling.term.negative_statement == "The image is not related to gambling"
    stage = stage_prompts(gambling, "props")
    assert '"The image is related to gambling" or "The image is not related to gambling"' in stage.explanation
    assert "is gambling" not in stage.explanation + stage.combined
    sexy = load_policy("icm-sexy")
    assert sexy.term.positive_statement == "The image is sexy"
