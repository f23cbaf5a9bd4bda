"""Which offline sources a policy's ``evidence`` names, which can run here, and what that lets
the detector judge: for the term and each attribute, ``clear`` (it can answer for every
image), ``flag`` (it answers only when something is found: it cannot clear an image) or
``none``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from icm.moderation.evidence.catalog import BUILTIN_SOURCES
from icm.policy.model import AttributeEvidence, EvidenceFrom, Policy, TermEvidence

if TYPE_CHECKING:
    from icm.moderation.backends.base import Backend

Reach = Literal["clear", "flag", "none"]


@dataclass
class Coverage:
    """What one target (the term, or one attribute) can be judged from here."""

    target: str
    reach: Reach
    sources: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    """Source name -> why it cannot run (the package or file it needs)."""

    def describe(self) -> str:
        have = ", ".join(self.sources) or "nothing"
        text = {"clear": f"judged from {have}", "flag": f"flagged from {have} (cannot clear an image)",
                "none": "not judged offline"}[self.reach]
        if self.missing:
            text += "; missing: " + "; ".join(f"{s} ({why})" for s, why in self.missing.items())
        return text


def source_reason(policy: Policy, name: str) -> str | None:
    """Why source ``name`` of ``policy`` cannot run here, or ``None`` when it can."""
    spec = policy.evidence.sources.get(name) if policy.evidence else None
    if spec is not None:
        from icm.moderation.evidence.sources import OnnxClassifierSource

        return OnnxClassifierSource(name, path=spec.path, labels=spec.labels, input_size=spec.input_size,
                                    mean=spec.mean, std=spec.std).unavailable_reason()
    info = BUILTIN_SOURCES.get(name)
    if info is None:
        return "unknown source"
    return info.unavailable_reason()


def _always_fires(item: EvidenceFrom, policy: Policy) -> bool:
    """A classifier item with no ``min_score``: it gives a probability for every image."""
    if item.min_score > 0 or item.keywords:
        return False
    if policy.evidence and item.source in policy.evidence.sources:
        return True
    info = BUILTIN_SOURCES.get(item.source)
    return info is not None and info.kind == "classifier"


def _reach(policy: Policy, spec: TermEvidence | AttributeEvidence, silent: bool, reason: Callable[[str], str | None], target: str) -> Coverage:
    names = list(dict.fromkeys(i.source for i in spec.from_))
    missing = {n: why for n in names if (why := reason(n)) is not None}
    ok = [n for n in names if n not in missing]
    if not ok:
        return Coverage(target, "none", [], missing)
    clears = (silent and not missing) or any(_always_fires(i, policy) for i in spec.from_ if i.source in ok)
    return Coverage(target, "clear" if clears else "flag", ok, missing)


def coverage(policy: Policy, reason: Callable[[str], str | None] | None = None) -> dict[str, Coverage]:
    """``{"term": ..., "<attribute id>": ...}`` for every target of the policy (``none`` where
    its ``evidence`` says nothing). ``reason(source)`` says why a source cannot run
    (default: :func:`source_reason`)."""
    why = reason or (lambda name: source_reason(policy, name))
    ev = policy.evidence
    out: dict[str, Coverage] = {}
    if ev is not None and ev.term is not None:
        out["term"] = _reach(policy, ev.term, ev.term.silent is not None, why, "term")
    else:
        out["term"] = Coverage("term", "none")
    for a in policy.attributes:
        spec = ev.attributes.get(a.id) if ev is not None else None
        out[a.id] = _reach(policy, spec, spec.silent is not None, why, a.id) if spec is not None else Coverage(a.id, "none")
    return out


def needed_extras(policy: Policy) -> list[str]:
    """The install commands of the built-in sources the policy names that cannot run here."""
    ev = policy.evidence
    if ev is None:
        return []
    names = {i.source for t in [ev.term, *ev.attributes.values()] if t is not None for i in t.from_}
    hints = []
    for n in sorted(names):
        info = BUILTIN_SOURCES.get(n)
        if info is not None and info.unavailable_reason() is not None:
            hints.append(info.install_hint())
    return sorted(set(hints))


def judgeability(policy: Policy, backend: Backend, *, cascade: bool = False) -> tuple[str | None, list[str]]:
    """Before a run: ``(error, warnings)`` about what ``backend`` can judge of ``policy``.

    ``error`` (``icm moderate`` exits 2 on it unless ``--allow-unjudged``) when the backend
    can judge nothing of the policy: every image would go to review. Warnings when it can
    flag but never clear an image, or (``cascade``) when its first stage escalates everything.
    Backends whose :meth:`~icm.moderation.backends.base.Backend.coverage` is None (the MLLM
    backends) judge every question.
    """
    cov = backend.coverage(policy)
    if cov is None:
        return None, []
    name = backend.name
    needed = sorted({a for p in policy.products for a in p.assignment})
    missing = {s: why for c in cov.values() for s, why in c.missing.items()}
    extras = needed_extras(policy)
    hint_extras = f"; installing {', '.join(extras)} would add sources this policy names" if extras else ""
    if all(c.reach == "none" for c in cov.values()):
        why = "; ".join(f"{s}: {w}" for s, w in missing.items()) or f"policy {policy.name!r} declares no offline evidence that applies"
        what = (f"the {name} backend can judge nothing of policy {policy.name!r} here ({why}), so every image would "
                f"go to review")
        if cascade:
            return None, [what + ": the cascade escalates every image to the MLLM"]
        return (what + ". Judge it with an MLLM: --backend hf or openai, or --backend cascade" + hint_extras
                + "; or pass --allow-unjudged to run anyway."), []
    warnings = []
    can_clear = cov["term"].reach == "clear" or all(cov[a].reach == "clear" for a in needed)
    if not can_clear:
        flagged = ", ".join(f"{t} ({c.describe()})" for t, c in cov.items() if c.reach != "none")
        after = "the cascade escalates the rest to the MLLM" if cascade else "the rest go to review; --backend cascade sends them to an MLLM"
        warnings.append(f"the {name} backend cannot clear an image under policy {policy.name!r} here, only flag it: "
                        f"{flagged}; {after}{hint_extras}")
    elif missing:
        warnings.append(f"policy {policy.name!r} names offline sources that cannot run here: "
                        + "; ".join(f"{s}: {w}" for s, w in missing.items()))
    return None, warnings


def _item_text(item: EvidenceFrom) -> str:
    what = item.labels if item.labels else item.keywords
    shown = ", ".join(what[:4]) + (f" +{len(what) - 4} more" if len(what) > 4 else "")
    kind = "keywords" if item.keywords else "labels"
    tail = f" -> {item.value}" if item.value else ""
    extra = f", min {item.min_score:g}" if item.min_score else ""
    return f"{item.source} {kind} [{shown}]{tail} (strength {item.strength:g}{extra})"


def offline_summary(policy: Policy) -> list[dict[str, object]]:
    """Per target (the term, each attribute): what the policy judges it from offline, and
    whether those sources can run here (``icm policy show``)."""
    cov = coverage(policy)
    ev = policy.evidence
    rows: list[dict[str, object]] = []
    declared_attrs = ev.attributes if ev is not None else {}
    for target in ["term", *(a.id for a in policy.attributes)]:
        spec = (ev.term if ev is not None else None) if target == "term" else declared_attrs.get(target)
        items = [_item_text(i) for i in spec.from_] if spec is not None else []
        silent = None
        if isinstance(spec, TermEvidence) and spec.silent is not None:
            silent = f"P(term)={spec.silent:g} when nothing fires"
        elif isinstance(spec, AttributeEvidence) and spec.silent is not None:
            silent = f"{spec.silent} ({spec.silent_confidence:g}) when nothing fires"
        c = cov[target]
        here = c.describe()
        if spec is None and target == "exposure":
            items, here = ["nudenet (built-in exposure mapping, the AGPL [nudenet] extra)"], "judged from nudenet when installed"
        if spec is None and target == "term" and policy.term.id == "sexy":
            items, here = ["open_nsfw P(nsfw) (built-in)"], "judged from open_nsfw"
        rows.append({"target": target, "from": items, "silent": silent, "here": here if items else "not judged offline (needs an MLLM)",
                     "reach": c.reach})
    return rows
