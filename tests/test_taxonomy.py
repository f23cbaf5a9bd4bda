"""The harm taxonomy: policies that map products onto standard categories, and their scores.

The category score is checked against a brute force written here (sum of the mapped
products' probabilities that the rule set labels violate), on random evidence over the
joint grid of every built-in policy.
"""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.policy import PolicyError, builtin_policy_names, decide, load_policy, parse_policy
from icm.policy.bundle import bundle_members, load_bundle
from icm.policy.taxonomy import SCHEMES, category_scores, flagged_categories, merge_scores

runner = CliRunner()

STANDARD_RULE_SETS = {"general-audience", "teen", "children", "adult-platform", "news"}
TAXONOMY = load_bundle("icm-standard")
assert TAXONOMY is not None


def _random_attributes(policy, rng: random.Random) -> dict[str, dict[str, float]]:
    out = {}
    for a in policy.attributes:
        weights = [rng.random() ** 3 for _ in a.values]
        out[a.id] = dict(zip(a.value_ids, weights, strict=True))
    return out


def test_the_schemes_have_their_published_categories():
    assert len(SCHEMES["openai"]) == 13
    assert list(SCHEMES["llavaguard"]) == [f"O{i}" for i in range(1, 10)]
    assert list(SCHEMES["mlcommons"]) == [f"S{i}" for i in range(1, 15)]


@pytest.mark.parametrize("name", TAXONOMY.policies)
def test_every_taxonomy_policy_validates_without_ties_or_unexplained_cells(name):
    policy = load_policy(name)
    assert not policy.grid.ties, name
    assert policy.grid.n_uncovered == 0 or policy.uncovered_positive is not None, (
        f"{name}: {policy.grid.n_uncovered} cells no product covers, and uncovered_positive does not say what they are")
    assert STANDARD_RULE_SETS <= set(policy.rule_set_map), (name, sorted(policy.rule_set_map))
    # a policy maps products onto categories, or says in its file that none fits (an explicit `taxonomy: []`)
    assert policy.standard_categories or "taxonomy" in policy.model_fields_set, f"{name} maps no product and says nothing"
    # no product outside the term is mapped: a category is an instance of the harm
    for scheme_name, cats in policy.standard_categories.items():
        for cat, ids in cats.items():
            assert all(policy.product(pid).positive for pid in ids), (name, scheme_name, cat)


def test_bundle_members_apply_one_rule_set_name_to_every_policy():
    members = bundle_members(TAXONOMY, "teen")
    assert [p.name for p, _ in members] == TAXONOMY.policies
    assert {r for _, r in members} == {"teen"}
    assert {r for _, r in bundle_members(TAXONOMY)} == {"general-audience"}
    with pytest.raises(KeyError, match="icm-default"):
        bundle_members(TAXONOMY, "icm-default")


@pytest.mark.parametrize("name", [n for n in builtin_policy_names() if load_policy(n).standard_categories])
def test_category_score_is_the_violating_mass_of_its_mapped_products(name):
    policy = load_policy(name)
    rng = random.Random(name)
    for _ in range(20):
        attrs = _random_attributes(policy, rng)
        p_term = rng.random() if rng.random() < 0.7 else None
        for rs in policy.rule_sets:
            d = decide(policy, rs, attributes=attrs, p_term=p_term)
            scores = category_scores(policy, rs, d)
            labels = policy.labels(rs)
            for scheme_name, cats in policy.standard_categories.items():
                for cat, ids in cats.items():
                    expected = sum(d.products[pid] for pid in ids if labels[pid].violates)
                    assert scores[scheme_name][cat] == pytest.approx(expected, abs=1e-12)
                    assert scores[scheme_name][cat] <= d.p_violation + 1e-9
                    # a subcategory whose products are a subset of another's never scores above it
                    for other, other_ids in cats.items():
                        if set(ids) < set(other_ids):
                            assert scores[scheme_name][cat] <= scores[scheme_name][other] + 1e-12, (cat, other)
            flagged = flagged_categories(scores, rs.thresholds.review)
            for scheme_name, cats in scores.items():
                assert flagged[scheme_name] == [c for c, p in cats.items() if p >= rs.thresholds.review]


def test_term_only_scores_spread_the_term_over_its_products_like_p_violation():
    policy = load_policy("icm-sexy")
    for rules in ("icm-default", "adult-platform"):
        d = decide(policy, rules, p_term=0.8)
        scores = category_scores(policy, rules, d)
        # every violating product of icm-sexy is mapped to `sexual`, so the category is P(violation)
        assert scores["openai"]["sexual"] <= d.p_violation + 1e-12
        assert scores["openai"]["sexual"] > 0 or d.p_violation == 0
    assert category_scores(policy, None, decide(policy, None)) == {}  # no evidence, no score


def test_sexual_minors_is_its_own_product_blocked_everywhere_and_below_sexual():
    policy = load_policy("sexual")
    cats = policy.standard_categories["openai"]
    minors = set(cats["sexual/minors"])
    assert minors and minors < set(cats["sexual"])
    for pid in minors:
        assert policy.product(pid).assignment.get("apparent_age") == "minor", pid
        for rs in policy.rule_sets:
            label = policy.labels(rs)[pid]
            assert label.violates and label.severity == "high", (pid, rs.name)
    # adult nudity: sexual, but an adult platform allows it, so it does not count as `sexual` there
    adult = [pid for pid in cats["sexual"] if pid not in minors and policy.labels("adult-platform")[pid].verdict == "allow"]
    assert adult, "adult-platform allows no adult sexual product"
    rng = random.Random(0)
    for _ in range(50):
        attrs = _random_attributes(policy, rng)
        for rs in policy.rule_sets:
            s = category_scores(policy, rs, decide(policy, rs, attributes=attrs))["openai"]
            assert s["sexual/minors"] <= s["sexual"] + 1e-12
    # one cell of the grid that the adult product owns, as certain evidence
    index = [p.id for p in policy.products].index(adult[0])
    cell = policy.grid.cell(int(list(policy.grid.owner_flat).index(index)))
    one_hot = {a.id: {v: float(v == cell[a.id]) for v in a.value_ids} for a in policy.attributes}
    ga = category_scores(policy, "general-audience", decide(policy, "general-audience", attributes=one_hot))["openai"]["sexual"]
    ap = category_scores(policy, "adult-platform", decide(policy, "adult-platform", attributes=one_hot))["openai"]["sexual"]
    assert ap < 0.01 < ga or policy.labels("general-audience")[adult[0]].verdict == "allow"


def test_merge_takes_the_largest_score_per_category():
    assert merge_scores([{"violence": 0.2, "sexual": 0.1}, {"violence": 0.6}]) == {"violence": 0.6, "sexual": 0.1}


def _policy_yaml(taxonomy: str) -> str:
    return f"""name: t
term: {{id: t, question: "Is it t?"}}
attributes:
  - id: kind
    question: Which?
    values: [{{id: a, description: A}}, {{id: b, description: B}}]
products:
  - {{id: a, assignment: {{kind: a}}, description: It is known that a.}}
  - {{id: b, assignment: {{kind: b}}, description: It is known that b., positive: false}}
rule_sets:
  - {{name: r, audience: all, rules: [{{products: [a], label: violate}}], default: allow}}
taxonomy:
{taxonomy}
"""


@pytest.mark.parametrize(("entry", "line", "message"), [
    ("  - {scheme: openia, category: sexual, products: [a]}", 13, "unknown category scheme 'openia'"),
    ("  - {scheme: openai, category: sexy, products: [a]}", 13, "scheme 'openai' has no category 'sexy'"),
    ("  - {scheme: llavaguard, category: O3, products: [c]}", 13, "maps unknown product 'c'"),
    ("  - {scheme: mlcommons, category: S12, when: {kind: c}}", 13, "selects unknown value 'c'"),
])
def test_unknown_categories_are_errors_at_file_and_line(entry, line, message):
    with pytest.raises(PolicyError) as exc:
        parse_policy(_policy_yaml(entry), "mine.yaml")
    issue = exc.value.issues[0]
    assert (issue.file, issue.line) == ("mine.yaml", line)
    assert message in issue.message


def test_cli_categories_lists_every_category_of_the_scheme_with_its_products():
    result = runner.invoke(app, ["policy", "categories", "--scheme", "openai", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["category"] for r in rows] == list(SCHEMES["openai"])
    by = {r["category"]: {(x["policy"], x["product"]) for x in r["products"]} for r in rows}
    for cat in ("sexual", "sexual/minors", "self-harm", "self-harm/intent", "self-harm/instructions", "violence", "violence/graphic"):
        assert by[cat], f"no product is mapped to {cat}"
    assert {p for p, _ in by["violence"]} >= {"violence", "gore"}
    assert by["sexual/minors"] <= by["sexual"]
    result = runner.invoke(app, ["policy", "categories", "--scheme", "llavaguard", "--json", "--policy", "gambling"])
    rows = json.loads(result.output)
    assert [r["category"] for r in rows] == [f"O{i}" for i in range(1, 10)]
    assert all(x["policy"] == "gambling" for r in rows for x in r["products"])
    llava = json.loads(runner.invoke(app, ["policy", "categories", "--scheme", "llavaguard", "--json"]).output)
    assert all(r["products"] for r in llava), [r["category"] for r in llava if not r["products"]]
    bad = runner.invoke(app, ["policy", "categories", "--scheme", "nope"])
    assert bad.exit_code == 2 and "unknown scheme 'nope'" in bad.output


def test_the_manuals_taxonomy_table_is_the_commands_output():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "taxonomy.md").read_text(encoding="utf-8")
    table = doc.split("<!-- taxonomy-table:start -->\n", 1)[1].split("\n<!-- taxonomy-table:end -->", 1)[0]
    result = runner.invoke(app, ["policy", "taxonomy"])
    assert result.exit_code == 0, result.output
    assert table.strip() == result.output.strip(), "docs/taxonomy.md is stale: paste the output of `icm policy taxonomy`"
    assert "docs/taxonomy.md" in (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
