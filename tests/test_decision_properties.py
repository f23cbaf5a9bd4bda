"""Property-based tests of decisions on random policies and random rule sets.

Every property is checked against a brute-force oracle written here from the README's
formulae (enumerate the grid cell by cell, find each cell's owner by precedence, weigh it),
independent of the vectorised code in icm.policy.decision and icm.policy.grid.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from icm.policy import Policy, PolicyError, decide, load_policy
from icm.policy.decision import CONFLICT_Z, EPS
from icm.policy.model import Attribute, AttributeValue, Product, Rule, RuleSet, Term

# -- the oracle ---------------------------------------------------------------------------


def top_level(products: list[Product], cell: dict[str, str]) -> list[Product]:
    """The matching products of the highest precedence: most specific, then highest priority."""
    matching = [p for p in products if all(cell[a] == v for a, v in p.assignment.items())]
    if not matching:
        return []
    top = max((len(p.assignment), p.priority) for p in matching)
    return [p for p in matching if (len(p.assignment), p.priority) == top]


def all_cells(attributes: list[Attribute]):
    ids = [a.id for a in attributes]
    for values in itertools.product(*[a.value_ids for a in attributes]):
        yield dict(zip(ids, values, strict=True))


def oracle_owner(policy: Policy, cell: dict[str, str]) -> str | None:
    """The product owning ``cell``; None if no product matches it."""
    level = top_level(policy.products, cell)
    assert len(level) <= 1, f"unresolved tie on {cell}: {[p.id for p in level]}"
    return level[0].id if level else None


def oracle_cells(policy: Policy):
    for cell in all_cells(policy.attributes):
        yield cell, oracle_owner(policy, cell)


def oracle(policy: Policy, rules: str, attributes: dict[str, dict[str, float]], p_term: float | None):
    """(masses by owner (None: uncovered), Z, P(violation)) by enumerating the grid."""
    dists = {}
    for a in policy.attributes:
        d = attributes.get(a.id) or {v: 1.0 for v in a.value_ids}
        total = sum(d.get(v, 0.0) for v in a.value_ids)
        floored = {v: max(d.get(v, 0.0) / total, EPS) for v in a.value_ids}
        s = sum(floored.values())
        dists[a.id] = {v: x / s for v, x in floored.items()}
    p = None if p_term is None else min(1 - EPS, max(EPS, p_term))
    weights: dict[str | None, float] = defaultdict(float)
    for cell, owner in oracle_cells(policy):
        mass = math.prod(dists[a][v] for a, v in cell.items())
        positive = policy.product(owner).positive if owner else policy.uncovered_positive
        if p is None:
            lik = 1.0
        elif positive is None:
            lik = 0.5
        else:
            lik = p if positive else 1 - p
        weights[owner] += mass * lik
    z = sum(weights.values())
    masses = {k: w / z for k, w in weights.items()}
    rs = policy.rule_set(rules)
    labels = policy.labels(rs)
    p_v = sum(m for k, m in masses.items() if (labels[k].violates if k else rs.default == "violate"))
    return masses, z, p_v


# -- random policies ----------------------------------------------------------------------


@st.composite
def policy_parts(draw, distinct_priorities: bool = True):
    """Attributes, products (distinct priorities resolve every tie) and rule sets."""
    n_attrs = draw(st.integers(1, 3))
    attrs = []
    for i in range(n_attrs):
        n_vals = draw(st.integers(2, 4))
        attrs.append(Attribute(id=f"a{i}", question=f"Which a{i}?", values=[AttributeValue(id=f"v{j}", description=f"value {j}") for j in range(n_vals)]))
    # candidate assignments: full ones and some that leave attributes unset
    candidates = []
    for subset_size in range(1, n_attrs + 1):
        for subset in itertools.combinations(attrs, subset_size):
            for values in itertools.product(*[a.value_ids for a in subset]):
                candidates.append(dict(zip([a.id for a in subset], values, strict=True)))
    chosen = draw(st.lists(st.sampled_from(range(len(candidates))), min_size=1, max_size=min(10, len(candidates)), unique=True))
    if distinct_priorities:
        priorities = draw(st.permutations(range(len(chosen))))
    else:
        priorities = draw(st.lists(st.integers(0, 1), min_size=len(chosen), max_size=len(chosen)))
    products = [
        Product(id=f"p{k}", assignment=candidates[c], description=f"product {k}", positive=draw(st.booleans()), priority=prio)
        for k, (c, prio) in enumerate(zip(chosen, priorities, strict=True))
    ]
    covered = all(top_level(products, cell) for cell in all_cells(attrs))
    rule_sets = []
    for r in range(draw(st.integers(1, 3))):
        labels = draw(st.lists(st.sampled_from(["allow", "violate"]), min_size=len(products), max_size=len(products)))
        rules = [Rule(products=[p.id], label=lab) for p, lab in zip(products, labels, strict=True)]
        # a rule set needs a default only when some cells are uncovered
        default = draw(st.sampled_from(["allow", "violate", None] if covered else ["allow", "violate"]))
        rule_sets.append(RuleSet(name=f"rs{r}", audience="test", rules=rules, default=default))
    return dict(
        name="random", term=Term(id="t", question="Is it t?"), attributes=attrs, products=products,
        rule_sets=rule_sets, uncovered_positive=draw(st.sampled_from([None, True, False])),
    )


@st.composite
def policies(draw):
    return Policy(**draw(policy_parts()))


def evidence(policy: Policy, floor: float = 0.0):
    return st.fixed_dictionaries({
        a.id: st.fixed_dictionaries({v: st.floats(floor, 1.0) for v in a.value_ids}) for a in policy.attributes
    })


@st.composite
def policy_and_evidence(draw, floor: float = 0.0):
    policy = draw(policies())
    attributes = draw(evidence(policy, floor))
    p_term = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    rs = draw(st.sampled_from([r.name for r in policy.rule_sets]))
    return policy, rs, attributes, p_term


def _flip(label: str) -> str:
    return "allow" if label == "violate" else "violate"


def _with_rule_set(policy: Policy, new_rs: RuleSet) -> Policy:
    return policy.model_copy(update={"rule_sets": [new_rs if r.name == new_rs.name else r for r in policy.rule_sets]})


def _relabel(policy: Policy, rs_name: str, product_id: str | None) -> Policy:
    """Flip one product's label (None: flip the default, i.e. the uncovered cells' label)."""
    rs = policy.rule_set(rs_name)
    rules = [Rule(products=r.products, label=_flip(r.label)) if r.products == [product_id] else r for r in rs.rules]
    default = _flip(rs.default) if product_id is None else rs.default
    return _with_rule_set(policy, RuleSet(name=rs.name, audience=rs.audience, rules=rules, default=default))


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(policy_and_evidence())
def test_masses_sum_to_one_and_match_the_brute_force_grid(case):
    policy, rs, attributes, p_term = case
    d = decide(policy, rs, attributes=attributes, p_term=p_term)
    if any(sum(dist.values()) == 0 for dist in attributes.values()):
        # no probability on any value of an attribute: degenerate evidence, never a guess
        assert d.basis == "conflict" and d.verdict == "review" and d.product is None and "no probability" in d.conflict
        return
    masses, z, p_v = oracle(policy, rs, attributes, p_term)
    assert abs(sum(d.products.values()) + d.p_uncovered - 1.0) < 1e-9
    assert all(m >= 0 for m in d.products.values()) and d.p_uncovered >= 0
    for pid, m in d.products.items():
        assert m == pytest.approx(masses.get(pid, 0.0), abs=1e-9), pid
    assert d.p_uncovered == pytest.approx(masses.get(None, 0.0), abs=1e-9)
    assert 0.0 <= d.p_violation <= 1.0 and d.p_violation == pytest.approx(p_v, abs=1e-9)
    low, high = d.p_violation_range
    assert 0.0 <= low <= d.p_violation <= high <= 1.0
    if p_term is not None and z < CONFLICT_Z:
        assert d.basis == "conflict" and d.verdict == "review" and d.product is None and d.label is None
        assert d.conflict and f"P(Yes)={p_term:.2f}" in d.conflict
        return
    assert d.basis == "attributes" and d.conflict is None
    best = max(d.products, key=lambda k: (d.products[k], k))
    if d.p_uncovered > d.products[best]:
        assert d.product is None and d.label == policy.rule_set(rs).default_label()
    else:
        assert d.product == best and d.product_probability == d.products[best]
    # term-only evidence gives a range, too
    if p_term is not None:
        t = decide(policy, rs, p_term=p_term)
        lo, hi = t.p_violation_range
        assert t.basis == "term" and 0.0 <= lo <= t.p_violation <= hi <= 1.0


@st.composite
def monotone_case(draw):
    """A policy, strictly positive evidence, and a value all of whose cells violate."""
    policy, rs_name, attributes, p_term = draw(policy_and_evidence(floor=0.01))
    attr = draw(st.sampled_from(policy.attributes))
    value = draw(st.sampled_from(attr.value_ids))
    # relabel so that every cell with attr=value violates; everything else keeps its label
    owners = {owner for cell, owner in oracle_cells(policy) if cell[attr.id] == value}
    rs = policy.rule_set(rs_name)
    rules = [Rule(products=r.products, label="violate") if r.products[0] in owners else r for r in rs.rules]
    default = "violate" if None in owners else rs.default
    policy = _with_rule_set(policy, RuleSet(name=rs.name, audience=rs.audience, rules=rules, default=default))
    t1, t2 = sorted(draw(st.lists(st.floats(0.0, 0.99), min_size=2, max_size=2)))
    return policy, rs_name, attributes, p_term, attr.id, value, t1, t2


@settings(max_examples=200, deadline=None)
@given(monotone_case())
def test_p_violation_is_monotone_in_the_evidence_for_a_violating_value(case):
    """Mixing an attribute's distribution towards a value all of whose cells violate never
    lowers P(violation), with or without fusion with the term score.

    The evidence is drawn strictly positive and mixed at most 99 % of the way, so that the
    EPS floor (a documented change of the evidence at its boundary) does not act."""
    policy, rs, attributes, p_term, attr, value, t1, t2 = case

    def mixed(t: float) -> dict:
        d = attributes[attr]
        total = sum(d.values())
        return {**attributes, attr: {v: (1 - t) * x / total + (t if v == value else 0.0) for v, x in d.items()}}

    a = decide(policy, rs, attributes=mixed(t1), p_term=p_term)
    b = decide(policy, rs, attributes=mixed(t2), p_term=p_term)
    assert b.p_violation >= a.p_violation - 1e-12
    # and the value's own grid slice is all violating: at t=0.99 nearly all mass violates
    if p_term is None:
        assert decide(policy, rs, attributes=mixed(0.99)).p_violation >= 0.99 - 1e-9


@settings(max_examples=200, deadline=None)
@given(policy_and_evidence(), st.data())
def test_relabelling_one_product_moves_p_violation_by_exactly_its_mass(case, data):
    policy, rs, attributes, p_term = case
    assume(all(sum(d.values()) > 0 for d in attributes.values()))
    target = data.draw(st.sampled_from([p.id for p in policy.products] + [None]))  # None: the default
    relabelled = _relabel(policy, rs, target)
    before = decide(policy, rs, attributes=attributes, p_term=p_term)
    after = decide(relabelled, rs, attributes=attributes, p_term=p_term)
    # labels never move the evidence
    assert before.products == after.products and before.p_uncovered == after.p_uncovered
    assert before.product == after.product and before.basis == after.basis and before.cell == after.cell
    mass = before.p_uncovered if target is None else before.products[target]
    now_violates = (relabelled.rule_set(rs).default == "violate") if target is None else relabelled.labels(rs)[target].violates
    assert after.p_violation - before.p_violation == pytest.approx(mass if now_violates else -mass, abs=1e-9)
    # the decision's label changes only where the relabelled mass is the named outcome
    if before.label is not None:  # the named outcome: a product, or the uncovered cells (product None)
        if before.product == target:
            assert before.label.verdict != after.label.verdict
        else:
            assert before.label == after.label
    else:
        assert after.label is None and before.basis == "conflict"


@settings(max_examples=200, deadline=None)
@given(policy_parts(distinct_priorities=False))
def test_a_policy_is_valid_exactly_when_no_cell_is_tied(parts):
    tied = [cell for cell in all_cells(parts["attributes"]) if len(top_level(parts["products"], cell)) > 1]
    if not tied:
        policy = Policy(**parts)
        assert not policy.grid.ties
        for cell in all_cells(parts["attributes"]):  # and the vectorised map agrees cell by cell
            idx = tuple(policy.grid.values[k].index(cell[a]) for k, a in enumerate(policy.grid.attributes))
            o = int(policy.grid.owner[idx])
            assert (policy.products[o].id if o >= 0 else None) == oracle_owner(policy, cell)
        return
    with pytest.raises(PolicyError) as info:
        Policy(**parts)
    messages = [i.message for i in info.value.issues]
    assert messages and all("priority" in m for m in messages)
    # every tied pair is named, with an example cell where the two are level
    pairs = {pair for cell in tied for pair in itertools.combinations(sorted(p.id for p in top_level(parts["products"], cell)), 2)}
    for a, b in pairs:
        assert any(f"'{a}' and '{b}'" in m for m in messages), (a, b, messages)


# -- the exact example of issue 10 ----------------------------------------------------------


@pytest.mark.parametrize("q", [0.9, 0.8, 0.7])
def test_icm_sexy_upper_normal_example_gives_the_grids_exact_values(q):
    """Every attribute's mass on upper / normal / none / none at q, the rest spread evenly.

    The old model (normalised products of set values) read 0.26, 0.49 and 0.69 here."""
    policy = load_policy("icm-sexy")
    top = {"region": "upper", "exposure": "normal", "action": "none", "cue": "none"}
    attributes = {
        a.id: {v: q if v == top[a.id] else (1 - q) / (len(a.values) - 1) for v in a.value_ids} for a in policy.attributes
    }
    for rs in policy.rule_sets:
        masses, z, p_v = oracle(policy, rs.name, attributes, None)
        d = decide(policy, rs.name, attributes=attributes)
        assert z == pytest.approx(1.0)
        assert d.p_violation == pytest.approx(p_v, abs=1e-12), rs.name
        assert d.p_uncovered == pytest.approx(masses[None], abs=1e-12)
        for pid, m in d.products.items():
            assert m == pytest.approx(masses.get(pid, 0.0), abs=1e-12), pid
    # icm-default allows exactly the four X_normal products, whose cells are
    # (any region, normal, none, none): P(allow) = q^3 (the region is summed out)
    d = decide(policy, "icm-default", attributes=attributes)
    assert d.p_violation == pytest.approx(1 - q**3, abs=1e-5)  # the EPS floor moves it by ~1e-6
    assert d.product == "upper_normal" and d.product_probability == pytest.approx(q**4, abs=1e-5)
