"""What a run is checked for before any model loads: its settings, the policy or bundle and
rule set, the inputs and the output. Each problem is a ``ValueError`` (``KeyError`` or
:class:`~icm.policy.PolicyError` from the policy loader) whose message names the option or
file and what is wrong; ``icm moderate`` prints it and exits 2.

After the backends are built, :func:`judgeable` says what they cannot judge of each policy
(an error, unless allowed, or notes), for the CLI to print once, up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icm.policy import Policy
from icm.policy.model import RuleSet
from icm.run.config import ModerateConfig

ENGINES = ("local", "ray")


@dataclass
class Checked:
    """The policy side of a checked run: one policy and rule set, or a bundle (each member's policy and rule set name)."""

    policy: Policy | None = None
    rule_set: RuleSet | None = None
    bundle: Any = None
    """A :class:`~icm.policy.bundle.Bundle`, or None."""
    bundle_rules: str | None = None
    members: list[tuple[Policy, str]] = field(default_factory=list)


def check_settings(c: ModerateConfig) -> None:
    """The run's own numbers (the backend's are checked by its spec)."""
    if c.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if c.max_frames < 1:
        raise ValueError("--max-frames must be at least 1")
    if not (c.fps > 0 and math.isfinite(c.fps)):
        raise ValueError("--fps must be a positive number")


def check_policy(c: ModerateConfig) -> Checked:
    """The policy and rule set, or the bundle and each member's rule set, loaded (an unknown one is an error)."""
    from icm.moderation.bundle import parse_bundle_ref
    from icm.policy import load_policy
    from icm.policy.bundle import bundle_members

    parsed = parse_bundle_ref(c.policy, c.rules)
    if parsed is not None:
        bundle, rules = parsed
        return Checked(bundle=bundle, bundle_rules=rules, members=bundle_members(bundle, rules))
    policy = load_policy(c.policy)
    return Checked(policy=policy, rule_set=policy.rule_set(c.rules))


def check_output(c: ModerateConfig) -> None:
    """``--out`` can be written as asked (a JSONL file, or a ``*.parquet`` folder); ``--resume`` has one to read."""
    from icm.moderation.parquet import is_parquet_path

    if c.resume and not c.out:
        raise ValueError("--resume needs --out")
    if not c.out:
        return
    out = Path(c.out)
    if is_parquet_path(out):
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: parquet output is a folder of part files, and a file of that name exists")
    elif out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a JSONL file, or a name ending in .parquet for parquet parts")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder")


def preflight(c: ModerateConfig, *, engine: str = "local") -> Checked:
    """Every check of a run that needs no model, in the order a user fixes them."""
    if not c.inputs:
        raise ValueError("no input: give image files, folders, patterns, or - to read paths from stdin")
    if engine not in ENGINES:
        raise ValueError(f"unknown --engine {engine} (local or ray)")
    check_settings(c)
    checked = check_policy(c)
    if engine == "ray" and checked.bundle is not None:
        raise ValueError("a bundle runs on the local engine (--engine local)")
    check_output(c)
    return checked


def judgeable(runner: Any, *, allow_unjudged: bool) -> tuple[str | None, list[str], list[Any]]:
    """What the built backend cannot judge: ``(error, notes, members left out)``.

    One policy the backend can judge nothing of is an error (every image would go to
    review) unless ``allow_unjudged``; a bundle leaves such members out, each with a note.
    A runner without a backend that reports coverage (the MLLMs, a Ray run's driver) passes.
    """
    from icm.moderation.bundle import BundleModerator
    from icm.moderation.evidence.plan import judgeability

    bundle = isinstance(runner, BundleModerator)
    notes: list[str] = []
    left_out: list[Any] = []
    for m in runner.members if bundle else [runner]:
        unjudged, warnings = judgeability(m.policy, runner.backend, cascade=runner.escalate_to is not None)
        if unjudged and not allow_unjudged and bundle:
            # a bundle runs the members the backend can judge; the others are named, not silently passed
            cats = ", ".join(m.policy.standard_categories.get("openai", {})) or "no openai category"
            notes.append(f"left out of the bundle: {unjudged} Its categories ({cats}) are not judged in this run.")
            left_out.append(m)
            continue
        if unjudged and not allow_unjudged:
            return unjudged, notes, left_out
        notes.extend(warnings + ([unjudged] if unjudged else []))
    if bundle and left_out and len(left_out) == len(runner.members):
        return f"the {runner.backend_name} backend can judge no policy of the bundle here", notes, left_out
    return None, notes, left_out
