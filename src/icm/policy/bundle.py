"""Bundles: several policies judged as one, under one rule set name.

A platform moderates a taxonomy, not a term. A bundle names policies (``icm-standard``:
every taxonomy policy); ``BUNDLE:RULES`` applies each member's rule set of that name, so
the taxonomy policies share their rule set names (general-audience, teen, children,
adult-platform, news). The members' standard categories merge by the largest score
(:func:`icm.policy.taxonomy.merge_scores`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from icm.policy.loader import BUILTIN_PACKAGE, load_policy
from icm.policy.model import Ident, Policy
from icm.policy.validate import Issue, PolicyError

BUNDLE_FOLDER = "bundles"


class Bundle(BaseModel):
    """Policies judged together (a built-in bundle file or the user's own YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Ident
    description: str = ""
    policies: list[str] = Field(min_length=1, description="Built-in policy names or policy file paths")
    default_rules: str | None = Field(default=None, description="The rule set name used when none is named")


def builtin_bundle_names() -> list[str]:
    folder = resources.files(BUILTIN_PACKAGE).joinpath(BUNDLE_FOLDER)
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def _parse(text: str, source: str) -> Bundle:
    try:
        data = yaml.safe_load(text)
        return Bundle.model_validate(data)
    except (yaml.YAMLError, ValueError) as exc:
        raise PolicyError([Issue("error", (), f"not a policy bundle: {exc}", source)]) from None


def load_bundle(name_or_path: str | Path) -> Bundle | None:
    """A built-in bundle by name, a bundle file (YAML with ``policies:``) by path, else None."""
    name = str(name_or_path)
    if name in builtin_bundle_names():
        res = resources.files(BUILTIN_PACKAGE).joinpath(BUNDLE_FOLDER).joinpath(f"{name}.yaml")
        return _parse(res.read_text(encoding="utf-8"), f"<builtin>/bundles/{name}.yaml")
    path = Path(name)
    if path.suffix.lower() in {".yaml", ".yml"} and path.is_file():
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        if isinstance(data, dict) and "policies" in data and "term" not in data:
            return _parse(text, str(path))
    return None


def bundle_members(bundle: Bundle, rules: str | None = None) -> list[tuple[Policy, str]]:
    """(policy, rule set name) of every member under ``rules`` (the bundle's default when None).

    A member without a rule set of that name is an error naming it: a bundle applies one
    audience's rules to every member, never a silent fallback to another audience's.
    """
    wanted = rules or bundle.default_rules
    out: list[tuple[Policy, str]] = []
    missing: list[str] = []
    for ref in bundle.policies:
        policy = load_policy(ref)
        if wanted is None:
            out.append((policy, policy.rule_set(None).name))
        elif wanted in policy.rule_set_map:
            out.append((policy, wanted))
        else:
            missing.append(f"{policy.name} (has {', '.join(policy.rule_set_map)})")
    if missing:
        raise KeyError(f"bundle {bundle.name!r}: rule set {wanted!r} is missing in {'; '.join(missing)}")
    return out
