"""The policy engine: terms, attributes, attribute products, rule sets and decisions."""

from icm.policy.decision import CONFLICT_Z, EPS, Decision, decide, product_distribution
from icm.policy.grid import CellGrid
from icm.policy.loader import builtin_policy_names, load_policy, load_policy_file, parse_policy, policy_ref
from icm.policy.model import Attribute, AttributeValue, Label, Policy, Product, Rule, RuleSet, Term, Thresholds
from icm.policy.prompts import compile_prompts, stage_prompts
from icm.policy.validate import Issue, PolicyError, check_policy

__all__ = [
    "CONFLICT_Z", "EPS", "Attribute", "AttributeValue", "CellGrid", "Decision", "Issue", "Label", "Policy", "PolicyError", "Product",
    "Rule", "RuleSet", "Term", "Thresholds", "builtin_policy_names", "check_policy", "compile_prompts",
    "decide", "load_policy", "load_policy_file", "parse_policy", "policy_ref", "product_distribution",
    "stage_prompts",
]
