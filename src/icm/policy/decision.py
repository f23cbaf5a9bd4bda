"""From model evidence to a rule set's decision.

Evidence comes in three shapes, any of which may be missing:

* a distribution over each attribute's values (one multiple-choice question per attribute);
* a distribution over products directly;
* a direct term score ``p_term`` = P(Yes) for the term's yes/no question.

The model (docs/decisions.md states it):

1. **Clipping.** Each attribute's distribution is normalised, every value's probability is
   raised to at least ``EPS`` and the distribution renormalised; ``p_term`` is clipped to
   ``[EPS, 1 - EPS]`` for fusion. Hard parsed answers (exactly 0 or 1) therefore never
   zero the grid. An attribute whose probabilities sum to 0 is *degenerate*: basis
   ``conflict``.
2. **The grid.** Attributes are orthogonal, so the evidence is a distribution over the
   joint grid: ``P(cell) = prod_a P_a(cell[a])``. Each cell is owned by one product
   (:mod:`icm.policy.grid`: the most specific matching product, ties by ``priority``) or
   by none (*uncovered*).
3. **Fusion** with the term's answer, as independent evidence with likelihood
   ``L(cell) = p_term`` if the cell is positive, ``1 - p_term`` if not, ``1/2`` when
   unknown (uncovered cells without ``uncovered_positive``):
   ``P'(cell) = P(cell) L(cell) / Z`` with ``Z = sum_cells P(cell) L(cell)``.
   ``Z`` is the probability the attributes give to the term's answer; ``Z < CONFLICT_Z``
   means the two contradict each other: basis ``conflict``.
4. **Masses.** ``P(product) = sum of its cells``, ``p_uncovered = sum of the uncovered
   cells``; they sum to 1. ``P(violation) = sum over violating products (+ p_uncovered
   when the rule set's default violates)``, a probability. The decision's label is that of
   the most likely outcome (a product, or the uncovered cells: then no product is named and
   the label is the default's).
5. **Partial evidence.** When an attribute some product sets was not judged, nothing is
   guessed: no product is named, and with a term score P(violation) is a range: its lower
   end counts the term classes (positive / not positive) whose members *all* violate, its
   upper end those with *any* violating member (uncovered cells are a member of the class
   ``uncovered_positive`` names, of both when unknown). The point estimate spreads each
   class's probability uniformly over its members.
6. **The verdict** (allow / review / block): ``block`` when the decision violates and
   P(violation) >= the rule set's ``block`` threshold (with only a term score: the range's
   lower end); ``allow`` when it allows and P(violation) < ``review`` (upper end);
   ``review`` otherwise, and always on ``conflict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from icm.policy.model import Label, Policy, RuleSet

VerdictName = Literal["allow", "review", "block"]
Basis = Literal["attributes", "products", "term", "none", "conflict"]

EPS = 1e-6
"""Floor of every attribute value's probability (before renormalising) and clip of P(Yes)."""

CONFLICT_Z = 0.05
"""Below this, the attributes give the term's answer too little probability to fuse them.

``Z = P_attr(positive) * p_term + P_attr(not positive) * (1 - p_term)`` is at least
``min(p_term, 1 - p_term)``, so only a confident term answer (P(Yes) > 0.95 or < 0.05)
can conflict, and only with attributes that confidently say the opposite."""


class Decision(BaseModel):
    """A rule set's decision about one image, with everything needed to check it."""

    policy: str
    rules: str
    product: str | None = Field(description="Most likely attribute product; None when not identified")
    product_probability: float | None = None
    product_description: str | None = None
    label: Label | None = Field(description="The rule set's label of that product (or of the uncovered cells) and the rule that fired")
    p_violation: float = Field(ge=0.0, le=1.0)
    p_violation_range: tuple[float, float]
    p_term: float | None = None
    products: dict[str, float] = Field(default_factory=dict, description="Product distribution (after fusion); with p_uncovered it sums to 1")
    p_uncovered: float | None = Field(default=None, description="Mass of the grid cells no product covers (after fusion); None without a grid")
    cell: dict[str, str] | None = Field(default=None, description="The most likely cell of the attribute grid (after fusion)")
    conflict: str | None = Field(default=None, description="What conflicted, when basis is 'conflict'")
    verdict: VerdictName
    basis: Basis

    @property
    def violates(self) -> bool | None:
        return None if self.label is None else self.label.violates


def _check_dist(name: str, dist: Mapping[str, float]) -> None:
    for k, v in dist.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: probability of {k!r} is {v!r}, not a finite non-negative number")


def _clipped(values: np.ndarray) -> np.ndarray:
    """Normalise, floor every entry at EPS, renormalise (``values`` must have a positive sum)."""
    v = values / values.sum()
    v = np.maximum(v, EPS)
    return v / v.sum()


def _check_attributes(policy: Policy, attributes: Mapping[str, Mapping[str, float]]) -> None:
    for attr_id, dist in attributes.items():
        attr = policy.attribute(attr_id)
        unknown = set(dist) - set(attr.value_ids)
        if unknown:
            raise ValueError(f"attribute {attr_id!r} has no values {sorted(unknown)}")
        _check_dist(f"attribute {attr_id!r}", dist)


def _needed(policy: Policy) -> set[str]:
    return {a for p in policy.products for a in p.assignment}


def _grid_mass(policy: Policy, attributes: Mapping[str, Mapping[str, float]]) -> np.ndarray:
    """P(cell) over the flattened grid; attributes no product sets may be missing (uniform)."""
    mass = np.ones(())
    for a in policy.attributes:
        d = attributes.get(a.id)
        if d is None:
            vec = np.full(len(a.values), 1.0 / len(a.values))
        else:
            vec = _clipped(np.array([float(d.get(v, 0.0)) for v in a.value_ids]))
        mass = np.multiply.outer(mass, vec)
    return mass.reshape(-1)


def _likelihood(positive: np.ndarray, p_term: float | None) -> np.ndarray | float:
    """L = p_term on positive cells, 1 - p_term on the others, 1/2 where unknown."""
    if p_term is None:
        return 1.0
    p = min(1.0 - EPS, max(EPS, p_term))
    return positive * p + (1.0 - positive) * (1.0 - p)


def product_distribution(policy: Policy, attributes: Mapping[str, Mapping[str, float]]) -> dict[str, float] | None:
    """P(product) from per-attribute distributions, without fusion (steps 1-2, 4 above).

    The products alone sum to ``1 - p_uncovered``. Returns None when an attribute that some
    product sets was not judged, or when an attribute has no mass at all.
    """
    _check_attributes(policy, attributes)
    if not _needed(policy) <= set(attributes) or any(sum(d.values()) <= 0 for d in attributes.values()):
        return None
    grid = policy.grid
    masses = np.bincount(grid.owner_flat + 1, weights=_grid_mass(policy, attributes), minlength=len(policy.products) + 1)
    return {p.id: float(masses[i + 1]) for i, p in enumerate(policy.products)}


def _labels(policy: Policy, rs: RuleSet) -> tuple[dict[str, Label], Label | None, np.ndarray]:
    """Products' labels, the uncovered cells' label and the violating mask (index 0: uncovered).

    Cached on the policy per rule set object (``Policy.model_copy`` drops the cache).
    """
    cache = policy.__dict__.setdefault("decision_labels", {})
    hit = cache.get(rs.name)
    if hit is not None and hit[0] is rs:
        return hit[1]
    labels = policy.labels(rs)
    uncovered = policy.uncovered_label(rs)
    violating = np.array([uncovered is not None and uncovered.violates] + [labels[p.id].violates for p in policy.products])
    cache[rs.name] = (rs, (labels, uncovered, violating))
    return labels, uncovered, violating


def _verdict(rs: RuleSet, violates: bool | None, low: float, high: float) -> VerdictName:
    t = rs.thresholds
    if violates is not False and low >= t.block:
        return "block"
    if violates is not True and high < t.review:
        return "allow"
    return "review"


def _clamp(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


def _predicate(policy: Policy) -> str:
    """'sexy', 'related to gambling': the term as it follows 'is' in its statement."""
    s = policy.term.positive_statement
    return s[len("The image is "):] if s.startswith("The image is ") else policy.term.id


def _term_range(policy: Policy, rs: RuleSet, labels: Mapping[str, Label], p_term: float) -> tuple[float, float, float]:
    """(low, high, point) of P(violation) from the term score alone (step 5)."""
    grid = policy.grid
    uncovered = policy.uncovered_label(rs) if grid.n_uncovered else None
    low = high = point = 0.0
    for positive, mass in ((True, p_term), (False, 1.0 - p_term)):
        members = [labels[p.id].violates for p in policy.products if p.positive == positive]
        if uncovered is not None and policy.uncovered_positive in (None, positive):
            members.append(uncovered.violates)
        if not members:
            continue
        violating = sum(members)
        low += mass if violating == len(members) else 0.0
        high += mass if violating > 0 else 0.0
        point += mass * violating / len(members)
    low, high = _clamp(low), _clamp(high)
    return low, high, min(high, max(low, point))  # equal in exact arithmetic at the ends; keep rounding inside


def decide(
    policy: Policy,
    rules: str | RuleSet | None = None,
    *,
    attributes: Mapping[str, Mapping[str, float]] | None = None,
    products: Mapping[str, float] | None = None,
    p_term: float | None = None,
) -> Decision:
    """The rule set's decision from whatever evidence there is (see the module docstring)."""
    rs = rules if isinstance(rules, RuleSet) else policy.rule_set(rules)
    labels, uncovered_label, violating = _labels(policy, rs)
    if p_term is not None and not (0.0 <= p_term <= 1.0):
        raise ValueError(f"p_term must be a probability, got {p_term!r}")
    base: dict[str, Any] = dict(policy=policy.name, rules=rs.name, p_term=p_term)

    def term_only(basis: Basis, conflict: str | None = None) -> Decision:
        if p_term is None:
            return Decision(**base, product=None, label=None, p_violation=0.0, p_violation_range=(0.0, 1.0),
                            verdict="review", basis=basis, conflict=conflict)
        low, high, point = _term_range(policy, rs, labels, p_term)
        verdict = "review" if basis == "conflict" else _verdict(rs, None, low, high)
        return Decision(**base, product=None, label=None, p_violation=point, p_violation_range=(low, high),
                        verdict=verdict, basis=basis, conflict=conflict)

    # -- what evidence is there ------------------------------------------------------------
    ids = [p.id for p in policy.products]
    if products:
        unknown = set(products) - set(policy.product_map)
        if unknown:
            raise ValueError(f"unknown products {sorted(unknown)}")
        _check_dist("products", products)
        raw = np.array([float(products.get(pid, 0.0)) for pid in ids])
        if raw.sum() <= 0:
            return term_only("conflict", "the product distribution gives no probability to any product")
        prior = np.concatenate([[0.0], _clipped(raw)])  # index 0: the uncovered cells, none here
        positive = np.array([0.5] + [1.0 if p.positive else 0.0 for p in policy.products])
        basis: Basis = "products"
        owner = np.arange(-1, len(ids))
        cell_of = None
    elif attributes:
        _check_attributes(policy, attributes)
        empty = [a for a, d in attributes.items() if sum(float(x) for x in d.values()) <= 0]
        if empty:
            what = ", ".join(repr(a) for a in empty)
            return term_only("conflict", f"the answer to the {what} question gives no probability to any of its values")
        if not _needed(policy) <= set(attributes):  # partial evidence: guess nothing
            return term_only("term" if p_term is not None else "none")
        grid = policy.grid
        prior = _grid_mass(policy, attributes)
        positive = grid.positive
        owner = grid.owner_flat
        basis = "attributes"
        cell_of = grid.cell
    else:
        return term_only("term" if p_term is not None else "none")

    # -- fusion and masses -----------------------------------------------------------------
    n = len(ids) + 1
    weights = prior * _likelihood(positive, p_term)
    z = float(weights.sum())
    post = weights / z
    masses = np.bincount(owner + 1, weights=post, minlength=n)
    masses = masses / masses.sum()
    p_uncovered = float(masses[0])
    dist = {pid: float(masses[i + 1]) for i, pid in enumerate(ids)}
    p_v = _clamp(float(masses[violating].sum()))
    cell = cell_of(int(np.argmax(post))) if cell_of is not None else None
    extra: dict[str, Any] = dict(products=dist, p_uncovered=p_uncovered if basis == "attributes" else None, cell=cell)

    if p_term is not None and z < CONFLICT_Z:
        prior_masses = np.bincount(owner + 1, weights=prior / prior.sum(), minlength=n)
        says_yes = p_term >= 0.5
        # the outcomes that contradict the answer: not positive when it says yes, and vice versa
        contra = (np.array([policy.uncovered_positive is not None and policy.uncovered_positive != says_yes]
                           + [p.positive != says_yes for p in policy.products]))
        k = int(np.argmax(np.where(contra, prior_masses, -1.0)))
        what = ids[k - 1] if k > 0 else "cells no product covers"
        pred = _predicate(policy)
        neg = "not " if says_yes else ""
        conflict = (
            f"the term question says {'yes' if says_yes else 'no'} (P(Yes)={p_term:.2f}) but the attributes point to "
            f"{what} (P={prior_masses[k]:.2f}), which {'is' if k > 0 else 'are'} {neg}{pred} "
            f"(P={float(prior_masses[contra].sum()):.2f} in all for what is {neg}{pred})"
        )
        p_attr = _clamp(float(prior_masses[violating].sum()))
        low, high, _ = _term_range(policy, rs, labels, p_term)
        rng = (min(p_attr, low, p_v), max(p_attr, high, p_v))
        return Decision(**base, **extra, product=None, label=None, p_violation=p_v, p_violation_range=rng,
                        verdict="review", basis="conflict", conflict=conflict)

    # the most likely outcome: a product (ties: the larger id, as before) or the uncovered cells
    best = max(dist, key=lambda k: (dist[k], k))
    if p_uncovered > dist[best]:
        label = uncovered_label
        if label is None:  # only reachable for rule sets built outside a Policy
            raise ValueError(f"rule set {rs.name!r} has no default for the cells no product covers")
        return Decision(**base, **extra, product=None, label=label, p_violation=p_v, p_violation_range=(p_v, p_v),
                        verdict=_verdict(rs, label.violates, p_v, p_v), basis=basis)
    label = labels[best]
    return Decision(
        **base, **extra,
        product=best,
        product_probability=dist[best],
        product_description=policy.product(best).description,
        label=label,
        p_violation=p_v,
        p_violation_range=(p_v, p_v),
        verdict=_verdict(rs, label.violates, p_v, p_v),
        basis=basis,
    )
