"""Standard harm categories: the schemes platforms, benchmarks and guard models speak.

A policy maps its attribute products onto categories of these schemes (its ``categories``
section, :class:`icm.policy.model.CategoryMap`). A category's probability is the sum over
its mapped products on the policy's joint grid, so a subcategory whose products are a
subset of its parent's (``sexual/minors`` of ``sexual``) never scores above it.

Several policies can feed one category (``violence`` from violence, gore and weapons): its
score is the largest over those policies (:func:`merge_scores`).

The schemes:

* ``openai``: the 13 categories of OpenAI's moderation API (``omni-moderation``), keys as
  its JSON spells them (the SDK's attribute names replace ``/`` and ``-`` with ``_``);
* ``llavaguard``: LlavaGuard's safety taxonomy O1-O9;
* ``mlcommons``: the MLCommons AI Safety hazards S1-S14 that Llama Guard 3 and 4 use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from icm.policy.decision import Decision
    from icm.policy.model import Policy

from icm.policy.model import RuleSet

SchemeName = Literal["openai", "llavaguard", "mlcommons"]

SCHEMES: dict[str, dict[str, str]] = {
    "openai": {
        "harassment": "Harassment",
        "harassment/threatening": "Harassment that also threatens violence or serious harm",
        "hate": "Hate based on a protected attribute",
        "hate/threatening": "Hate that also threatens violence or serious harm",
        "illicit": "Advice or instruction on committing illicit acts",
        "illicit/violent": "Illicit content that also involves violence or weapons",
        "self-harm": "Promotes, encourages or depicts acts of self-harm",
        "self-harm/intent": "The speaker is engaging in or intends to engage in self-harm",
        "self-harm/instructions": "Encourages or instructs how to commit self-harm",
        "sexual": "Meant to arouse sexual excitement, or promotes sexual services",
        "sexual/minors": "Sexual content that includes a person under 18",
        "violence": "Depicts death, violence or physical injury",
        "violence/graphic": "Depicts death, violence or physical injury in graphic detail",
    },
    "llavaguard": {
        "O1": "Hate, Humiliation, Harassment",
        "O2": "Violence, Harm, or Cruelty",
        "O3": "Sexual Content",
        "O4": "Nudity Content",
        "O5": "Criminal Planning",
        "O6": "Weapons or Substance Abuse",
        "O7": "Self-Harm",
        "O8": "Animal Cruelty",
        "O9": "Disasters or Emergencies",
    },
    "mlcommons": {
        "S1": "Violent Crimes",
        "S2": "Non-Violent Crimes",
        "S3": "Sex-Related Crimes",
        "S4": "Child Sexual Exploitation",
        "S5": "Defamation",
        "S6": "Specialized Advice",
        "S7": "Privacy",
        "S8": "Intellectual Property",
        "S9": "Indiscriminate Weapons",
        "S10": "Hate",
        "S11": "Suicide & Self-Harm",
        "S12": "Sexual Content",
        "S13": "Elections",
        "S14": "Code Interpreter Abuse",
    },
}
"""Every scheme's categories, in the scheme's own order, with their titles."""

OPENAI_IMAGE_CATEGORIES = ("sexual", "self-harm", "self-harm/intent", "self-harm/instructions", "violence", "violence/graphic")
"""The categories OpenAI's omni-moderation judges on images (the others are text only)."""


ZERO_TOLERANCE: dict[str, frozenset[str]] = {"openai": frozenset({"sexual/minors"}), "mlcommons": frozenset({"S4"})}
"""Categories one frame of which blocks a whole video, whatever the rule set's video aggregation."""


def zero_tolerance_products(policy: Policy) -> frozenset[str]:
    """The products the policy maps to a :data:`ZERO_TOLERANCE` category."""
    return frozenset(
        pid
        for name, cats in policy.standard_categories.items()
        for cat, ids in cats.items()
        if cat in ZERO_TOLERANCE.get(name, ())
        for pid in ids
    )


def scheme(name: str) -> dict[str, str]:
    """The categories of scheme ``name`` (KeyError naming the known schemes)."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise KeyError(f"unknown category scheme {name!r} (known: {', '.join(SCHEMES)})") from None


def merge_scores(scores: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Several policies' scores of one scheme as one: the largest per category."""
    out: dict[str, float] = {}
    for s in scores:
        for cat, p in s.items():
            out[cat] = max(out.get(cat, 0.0), float(p))
    return out


def category_scores(policy: Policy, rules: str | RuleSet | None, decision: Decision) -> dict[str, dict[str, float]]:
    """Per scheme, each mapped category's probability of a violation under the rule set.

    A category's score is the probability, on the decision's product distribution, of its
    mapped products that the rule set labels violate (a product the rule set allows counts
    nothing: under an adult platform's rules allowed nudity is not ``sexual``). With the term
    score alone (no product distribution) each term class's probability is spread evenly
    over its products, as the point estimate of P(violation) is. Empty without evidence.
    """
    mapping = policy.standard_categories
    if not mapping:
        return {}
    rs = rules if isinstance(rules, RuleSet) else policy.rule_set(rules)
    labels = policy.labels(rs)
    if decision.products:
        dist = decision.products
        weight = {pid: dist.get(pid, 0.0) for pid in policy.product_map}
    elif decision.p_term is not None:
        weight = {}
        for positive, mass in ((True, decision.p_term), (False, 1.0 - decision.p_term)):
            members = [p.id for p in policy.products if p.positive == positive]
            # the cells no product covers are a member too where they may be of this class
            # (as in the point estimate of P(violation)); they map to no category
            n = len(members) + (1 if policy.grid.n_uncovered and policy.uncovered_positive in (None, positive) else 0)
            for pid in members:
                weight[pid] = mass / n
    else:
        return {}
    return {
        name: {cat: min(1.0, max(0.0, sum(weight[pid] for pid in ids if labels[pid].violates))) for cat, ids in cats.items()}
        for name, cats in mapping.items()
    }


def flagged_categories(scores: Mapping[str, Mapping[str, float]], threshold: float) -> dict[str, list[str]]:
    """Per scheme, the categories whose score reaches ``threshold`` (the rule set's review threshold)."""
    return {name: [c for c, p in cats.items() if p >= threshold] for name, cats in scores.items()}
