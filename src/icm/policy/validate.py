"""Semantic checks of a policy, each problem reported with its location.

Locations are paths into the policy document (``("products", 3, "assignment", "region")``)
so that :mod:`icm.policy.loader` can turn them into ``file:line`` for the user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

    from icm.policy.model import Policy

from icm.prompting import OPTION_LABELS

Loc = tuple[str | int, ...]
MAX_OPTIONS = len(OPTION_LABELS)
"""Most values an attribute may have: its question labels each with one of :data:`OPTION_LABELS`."""


@dataclass(frozen=True)
class Issue:
    level: Literal["error", "warning", "info"]
    loc: Loc
    message: str
    file: str | None = None
    line: int | None = None

    def where(self) -> str:
        if self.file and self.line:
            return f"{self.file}:{self.line}"
        if self.file:
            return self.file
        return ".".join(str(p) for p in self.loc) or "<policy>"

    def __str__(self) -> str:
        path = ".".join(str(p) for p in self.loc)
        at = f" (at {path})" if path and (self.file or self.line) else ""
        return f"{self.where()}: {self.level}: {self.message}{at}"


@dataclass
class PolicyError(Exception):
    """A policy that cannot be used; ``issues`` lists every problem found.

    Deliberately not a ``ValueError``: raised from a pydantic validator it propagates as
    itself, with its locations, instead of being folded into a generic validation error.
    """

    issues: list[Issue] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(i) for i in self.issues) or "invalid policy"


def check_policy(policy: Policy) -> list[Issue]:
    """Every error, warning and info about ``policy``: cross-references, then the grid.

    The grid checks (:mod:`icm.policy.grid`) run only when the cross-references are sound:
    a tie of precedence is an error at the later of the two products; cells no product
    covers are an error for each rule set without a ``default``, else an ``info``.
    """
    issues: list[Issue] = []

    def err(loc: Loc, msg: str) -> None:
        issues.append(Issue("error", loc, msg))

    def warn(loc: Loc, msg: str) -> None:
        issues.append(Issue("warning", loc, msg))

    # attributes and their values
    attrs: dict[str, set[str]] = {}
    for i, a in enumerate(policy.attributes):
        if a.id in attrs:
            err(("attributes", i, "id"), f"attribute {a.id!r} is defined twice")
        seen: set[str] = set()
        for j, v in enumerate(a.values):
            if v.id in seen:
                err(("attributes", i, "values", j, "id"), f"attribute {a.id!r} has value {v.id!r} twice")
            seen.add(v.id)
        attrs[a.id] = seen
        if len(a.values) > MAX_OPTIONS:  # the multiple-choice question could not be asked (icm moderate refused it)
            err(("attributes", i, "values", MAX_OPTIONS),
                f"attribute {a.id!r} has {len(a.values):,} values: its question can offer at most {MAX_OPTIONS} "
                f"options (labelled {OPTION_LABELS[0]}..{OPTION_LABELS[-1]}); split it into attributes of fewer values")

    # products
    product_ids: dict[str, int] = {}
    assignments: dict[tuple[tuple[str, str], ...], str] = {}
    categories: dict[str, str] = {}
    used: dict[str, set[str]] = {a: set() for a in attrs}
    for i, p in enumerate(policy.products):
        if p.id in product_ids:
            err(("products", i, "id"), f"product {p.id!r} is defined twice")
        product_ids[p.id] = i
        ok = True
        for attr, value in p.assignment.items():
            if attr not in attrs:
                err(("products", i, "assignment", attr), f"product {p.id!r} uses unknown attribute {attr!r} (known: {', '.join(attrs)})")
                ok = False
            elif value not in attrs[attr]:
                known = ", ".join(sorted(attrs[attr]))
                err(("products", i, "assignment", attr), f"product {p.id!r} uses unknown value {value!r} of attribute {attr!r} (known: {known})")
                ok = False
            else:
                used[attr].add(value)
        if ok:
            if p.key in assignments:
                err(("products", i, "assignment"), f"products {assignments[p.key]!r} and {p.id!r} have the same assignment {dict(p.key)}")
            else:
                assignments[p.key] = p.id
        for j, c in enumerate(p.categories):
            if c in categories and categories[c] != p.id:
                err(("products", i, "categories", j), f"category {c!r} is claimed by products {categories[c]!r} and {p.id!r}")
            categories[c] = p.id
    for c, pid in categories.items():
        if c in product_ids and c != pid:
            i = product_ids[pid]
            err(("products", i, "categories"), f"category {c!r} of product {pid!r} is also the id of product {c!r}")

    for i, a in enumerate(policy.attributes):
        for j, v in enumerate(a.values):
            if v.id not in used.get(a.id, set()):
                warn(("attributes", i, "values", j), f"value {v.id!r} of attribute {a.id!r} is used by no product")

    # rule sets
    names: set[str] = set()
    for r, rs in enumerate(policy.rule_sets):
        if rs.name in names:
            err(("rule_sets", r, "name"), f"rule set {rs.name!r} is defined twice")
        names.add(rs.name)
        for k, rule in enumerate(rs.rules):
            for j, pid in enumerate(rule.products):
                if pid not in product_ids:
                    err(("rule_sets", r, "rules", k, "products", j), f"rule set {rs.name!r} labels unknown product {pid!r}")
            for attr, wanted in rule.when.items():
                if attr not in attrs:
                    err(("rule_sets", r, "rules", k, "when", attr), f"rule set {rs.name!r} selects on unknown attribute {attr!r}")
                    continue
                for value in [wanted] if isinstance(wanted, str) else wanted:
                    if value not in attrs[attr]:
                        err(("rule_sets", r, "rules", k, "when", attr), f"rule set {rs.name!r} selects unknown value {value!r} of attribute {attr!r}")
            if not any(rule.matches(p) for p in policy.products):
                warn(("rule_sets", r, "rules", k), f"rule {k + 1} of rule set {rs.name!r} matches no product")
        if rs.default is None:
            uncovered = [p.id for p in policy.products if rs.label_for(p) is None]
            if uncovered:
                err(("rule_sets", r), f"rule set {rs.name!r} has no default and labels no rule for products: {', '.join(uncovered)}")
    if policy.default_rules is not None and policy.default_rules not in names:
        err(("default_rules",), f"default_rules names unknown rule set {policy.default_rules!r}")
    issues.extend(_check_evidence(policy))
    issues.extend(_check_taxonomy(policy, attrs, product_ids))
    if not any(i.level == "error" for i in issues):
        issues.extend(_check_grid(policy))
    return issues


def _check_grid(policy: Policy) -> list[Issue]:
    """Ties of precedence and uncovered cells of the attribute grid."""
    from icm.policy.grid import MAX_CELLS, MAX_TIES, MAX_WORK, describe_cell, grid_size, grid_work

    n = grid_size(policy)
    if n > MAX_CELLS:
        return [Issue("error", ("attributes",),
                      f"the attribute grid has {n} cells (one value per attribute), more than {MAX_CELLS}: use fewer attributes or values")]
    if grid_work(policy) > MAX_WORK:
        return [Issue("error", ("products",),
                      f"{len(policy.products)} products over a grid of {n} cells are too many to map (more than {MAX_WORK} cell visits)")]
    grid = policy.grid
    issues: list[Issue] = []
    products = policy.products
    for t in grid.ties:
        a, b = products[t.first], products[t.second]
        issues.append(Issue(
            "error", ("products", t.second),
            f"products {a.id!r} and {b.id!r} both match {t.cells} cell(s) of the attribute grid, e.g. "
            f"{describe_cell(grid.cell(t.example))}, with equal precedence ({len(a.assignment)} attribute(s) "
            f"set and priority {a.priority} each): give the one that should own those cells a higher 'priority'",
        ))
    if len(grid.ties) >= MAX_TIES:
        issues.append(Issue("error", ("products",), f"more ties than the {MAX_TIES} named above; resolve these first"))
    uncovered = grid.n_uncovered
    if uncovered:
        example = describe_cell(grid.uncovered_example() or {})
        no_default = [(r, rs) for r, rs in enumerate(policy.rule_sets) if rs.default is None]
        for r, rs in no_default:
            issues.append(Issue(
                "error", ("rule_sets", r),
                f"rule set {rs.name!r} has no default, but {uncovered} of {grid.n_cells} cells of the attribute "
                f"grid match no product, e.g. {example}: add products for them or a 'default'",
            ))
        if not no_default:
            defaults = ", ".join(f"{rs.name}: {rs.default}" for rs in policy.rule_sets)
            pos = {None: "unknown (the term's answer is no evidence about them)", True: "positive", False: "not positive"}[policy.uncovered_positive]
            issues.append(Issue(
                "info", (),
                f"{uncovered} of {grid.n_cells} cells of the attribute grid match no product, e.g. {example}; "
                f"they take each rule set's default ({defaults}); for the term they are {pos} (uncovered_positive)",
            ))
    return issues


def _check_evidence(policy: Policy) -> list[Issue]:
    """The ``evidence`` section: known sources, their output labels, attributes and values."""
    import difflib

    from icm.moderation.evidence.catalog import BUILTIN_SOURCES

    ev = policy.evidence
    if ev is None:
        return []
    issues: list[Issue] = []

    def err(loc: Loc, msg: str) -> None:
        issues.append(Issue("error", ("evidence", *loc), msg))

    for name in ev.sources:
        if name in BUILTIN_SOURCES:
            err(("sources", name), f"evidence source {name!r} has the name of a built-in source; choose another name")
    known = sorted(set(BUILTIN_SOURCES) | set(ev.sources))

    def check_items(items: list, loc: Loc, values: list[str] | None, attr: str | None) -> None:
        for k, item in enumerate(items):
            at = (*loc, "from", k)
            spec = ev.sources.get(item.source)
            info = BUILTIN_SOURCES.get(item.source)
            labels: Sequence[str] | None
            if spec is not None:
                kind, labels = "classifier", spec.labels
            elif info is not None:
                kind, labels = info.kind, info.labels
            else:
                err((*at, "source"), f"unknown evidence source {item.source!r} (known: {', '.join(known)})")
                continue
            if kind == "ocr" and item.labels:
                err((*at, "labels"), f"source {item.source!r} reads text: give 'keywords', not 'labels'")
            if kind != "ocr" and item.keywords:
                err((*at, "keywords"), f"source {item.source!r} is a {kind}: give 'labels' (its output classes), not 'keywords'")
            if labels is not None:
                for j, label in enumerate(item.labels):
                    if label not in labels:
                        close = difflib.get_close_matches(label, list(labels), n=3)
                        hint = f" (did you mean {', '.join(close)}?)" if close else ""
                        err((*at, "labels", j), f"source {item.source!r} has no output label {label!r}{hint}")
            for j, kw in enumerate(item.keywords):
                if not kw.strip().rstrip("*").strip():
                    err((*at, "keywords", j), "an empty keyword matches everything")
            if values is None and item.value is not None:
                err((*at, "value"), "evidence for the term has no 'value' (values belong to attributes)")
            if values is not None:
                if item.value is None:
                    err(at, f"evidence for attribute {attr!r} needs the 'value' it is evidence for")
                elif item.value not in values:
                    err((*at, "value"), f"attribute {attr!r} has no value {item.value!r} (known: {', '.join(values)})")

    if ev.term is not None:
        check_items(ev.term.from_, ("term",), None, None)
    for attr_id, spec in ev.attributes.items():
        if attr_id not in policy.attribute_map:
            err(("attributes", attr_id), f"evidence for unknown attribute {attr_id!r} (known: {', '.join(policy.attribute_map)})")
            continue
        values = policy.attribute_map[attr_id].value_ids
        if spec.silent is not None and spec.silent not in values:
            err(("attributes", attr_id, "silent"), f"attribute {attr_id!r} has no value {spec.silent!r} (known: {', '.join(values)})")
        check_items(spec.from_, ("attributes", attr_id), values, attr_id)
    return issues


def _check_taxonomy(policy: Policy, attrs: dict[str, set[str]], product_ids: dict[str, int]) -> list[Issue]:
    """The ``taxonomy`` section: known schemes and categories, products and values that exist."""
    from icm.policy.taxonomy import SCHEMES

    issues: list[Issue] = []

    def err(loc: Loc, msg: str) -> None:
        issues.append(Issue("error", ("taxonomy", *loc), msg))

    for i, m in enumerate(policy.taxonomy):
        cats = SCHEMES.get(m.scheme)
        if cats is None:
            err((i, "scheme"), f"unknown category scheme {m.scheme!r} (known: {', '.join(SCHEMES)})")
        elif m.category not in cats:
            err((i, "category"), f"scheme {m.scheme!r} has no category {m.category!r} (known: {', '.join(cats)})")
        for j, pid in enumerate(m.products):
            if pid not in product_ids:
                err((i, "products", j), f"category {m.category!r} maps unknown product {pid!r}")
        for attr, wanted in m.when.items():
            if attr not in attrs:
                err((i, "when", attr), f"category {m.category!r} selects on unknown attribute {attr!r}")
                continue
            for value in [wanted] if isinstance(wanted, str) else wanted:
                if value not in attrs[attr]:
                    err((i, "when", attr), f"category {m.category!r} selects unknown value {value!r} of attribute {attr!r}")
        if not issues and not any(m.matches(p) for p in policy.products):
            issues.append(Issue("warning", ("taxonomy", i), f"the mapping to {m.scheme} {m.category!r} matches no product"))
    return issues
