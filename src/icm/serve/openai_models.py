"""What ``model`` names on ``POST /v1/moderations``: policies, bundles, OpenAI's model names.

``model`` is ``POLICY[:RULES][,POLICY[:RULES]...]``, a bundle ``BUNDLE[:RULES]``, or an
alias of the server's config (``model_aliases``): OpenAI's names (``omni-moderation-latest``,
``omni-moderation-2024-09-26``, ``text-moderation-latest``, ``text-moderation-stable``) are
the ``icm-standard`` bundle, the image harm taxonomy. No model is the server's default
policy and rule set.

A bundle without a rule set named takes the server's default rule set name (``--rules``)
where every member has one of that name, else the bundle's default (general-audience).

The server loads its bundles at start (the built-in ones and those its aliases name): a
bundle that cannot load (a member missing) is logged, and a request naming it gets a 400
that says why. Which policies the backend cannot judge here (the offline detector without
evidence that can clear an image) is worked out at start too, and logged with the openai
categories they leave unjudged (:func:`unjudged_policies`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from icm.policy import Policy
from icm.policy.bundle import Bundle, builtin_bundle_names, load_bundle
from icm.policy.loader import load_policy
from icm.serve.errors import APIError

if TYPE_CHECKING:
    from icm.moderation.engine import Moderator
    from icm.serve.config import ServeConfig
    from icm.serve.service import Service

log = logging.getLogger("icm.serve")


@dataclass
class ServedBundle:
    """A bundle the server can judge under (``members``), or why it cannot (``error``)."""

    name: str
    bundle: Bundle | None = None
    members: list[Policy] = field(default_factory=list)
    error: str | None = None


def _alias_heads(config: ServeConfig) -> list[str]:
    heads = []
    for target in config.model_aliases.values():
        for part in target.split(","):
            head = part.strip().partition(":")[0].strip()
            if head:
                heads.append(head)
    return heads


def load_served_bundles(config: ServeConfig) -> dict[str, ServedBundle]:
    """The built-in bundles and those the aliases name, each loaded or with its error."""
    out: dict[str, ServedBundle] = {}
    try:
        builtin = builtin_bundle_names()
    except OSError:  # no bundles folder in this install
        builtin = []
    for ref in [*builtin, *_alias_heads(config)]:
        if ref in out:
            continue
        try:
            bundle = load_bundle(ref)
        except Exception as exc:  # noqa: BLE001 - a bad bundle file: the bundle is unusable, the server is not
            out[ref] = ServedBundle(ref, error=f"bundle {ref!r} cannot load: {exc}")
            continue
        if bundle is None:
            continue  # a policy name or file, not a bundle
        served = ServedBundle(bundle.name, bundle)
        try:
            served.members = [load_policy(p) for p in bundle.policies]
        except Exception as exc:  # noqa: BLE001 - PolicyError, OSError: named in the start-up log and per request
            served.error = f"bundle {bundle.name!r} cannot load: {exc}"
            served.members = []
        out[ref] = served
        if bundle.name != ref:
            out.setdefault(bundle.name, served)
    for served in out.values():
        if served.error:
            log.warning("%s; /v1/moderations answers 400 for it", served.error)
    return out


def bundle_rules(svc: Service, served: ServedBundle, rules: str | None, model: str) -> str | None:
    """The rule set name every member is judged under (None: each member's default)."""
    assert served.bundle is not None
    if rules is None:
        if all(svc.default_rules in p.rule_set_map for p in served.members):
            return svc.default_rules
        rules = served.bundle.default_rules
    if rules is not None:
        missing = [f"{p.name} (has {', '.join(p.rule_set_map)})" for p in served.members if rules not in p.rule_set_map]
        if missing:
            raise APIError(400, "unknown_rules", f"model {model!r}: rule set {rules!r} is missing in {'; '.join(missing)}",
                           param="model")
    return rules


def resolve_model(svc: Service, model: str | None) -> tuple[str, list[tuple[str, str]]]:
    """The model name to echo and the (policy, rule set) pairs it names."""
    spec = (model or "").strip()
    aliases = svc.config.model_aliases
    if spec in aliases:
        spec = aliases[spec].strip()
    if not spec:
        return f"{svc.config_policy_name}:{svc.default_rules}", [(svc.config_policy_name, svc.default_rules)]
    targets: list[tuple[str, str]] = []
    echo: list[str] = []
    for part in spec.split(","):
        pname, sep, rname = part.strip().partition(":")
        if not pname or (sep and not rname):
            raise APIError(400, "bad_model", f"model {model!r}: write POLICY[:RULES][,POLICY[:RULES]...] or BUNDLE[:RULES]",
                           param="model")
        served = svc.bundles.get(pname)
        if served is not None:
            if served.error is not None or served.bundle is None:
                raise APIError(400, "model_unavailable", f"model {model!r}: {served.error}", param="model")
            rules = bundle_rules(svc, served, rname or None, str(model))
            pairs = [(p.name, rules or p.rule_set(None).name) for p in served.members]
            echo.append(f"{served.name}:{rules}" if rules else served.name)
        else:
            try:
                pairs = [svc.resolve(pname, rname or None)]
            except APIError as exc:
                raise APIError(400, exc.code, f"model {model!r}: {exc.detail}", param="model") from None
            echo.append(f"{pairs[0][0]}:{pairs[0][1]}")
        for target in pairs:
            if target not in svc.moderators:  # a member the server did not load (cannot happen for a loaded bundle)
                raise APIError(400, "model_unavailable", f"model {model!r}: {target[0]}:{target[1]} is not served here",
                               param="model")
            if target not in targets:
                targets.append(target)
    return ",".join(echo), targets


# --------------------------------------------------------------------------- what the backend can judge


def cannot_judge(moderator: Moderator, policy: Policy) -> str | None:
    """Why the server's backend cannot judge ``policy`` here, or None when it can.

    MLLM backends (no ``coverage``) judge every question, and a cascade sends what its first
    stage cannot judge to its MLLM. The offline detector judges a policy when its evidence
    can clear an image: the term, or every attribute the products use (as ``icm moderate``'s
    pre-flight check, :func:`icm.moderation.evidence.plan.judgeability`); evidence that can
    only flag an image leaves its categories unjudged (a clean answer would mean nothing).
    """
    if moderator.escalate_to is not None:
        return None
    cov = moderator.backend.coverage(policy)
    if cov is None:
        return None
    needed = sorted({a for p in policy.products for a in p.assignment})
    if cov["term"].reach == "clear" or all(cov[a].reach == "clear" for a in needed if a in cov):
        return None
    name = moderator.backend.name
    gaps = "; ".join(f"{t}: {c.describe()}" for t, c in cov.items() if t == "term" or t in needed)
    if all(c.reach == "none" for c in cov.values()):
        return f"the {name} backend cannot judge policy {policy.name!r} here ({gaps})"
    return f"the {name} backend can flag but not clear images under policy {policy.name!r} here ({gaps})"


def unjudged_policies(svc: Service) -> dict[str, str]:
    """Policy name -> why the backend cannot judge it, for every served policy it cannot;
    logs the openai categories each leaves unjudged."""
    out: dict[str, str] = {}
    moderator = svc.default_moderator
    for name, policy in svc.policies.items():
        why = cannot_judge(moderator, policy)
        if why is None:
            continue
        out[name] = why
        cats = sorted(policy.standard_categories.get("openai", {}))
        if cats:
            log.warning(
                "/v1/moderations: %s, so its categories %s are not judged (%s)", why, ", ".join(cats),
                "flagged on every image: --unjudged flag" if svc.config.unjudged == "flag"
                else "category_applied_input_types empty, not flagged; --unjudged flag fails closed",
            )
    return out
