"""The policy data model: terms, attributes, attribute products and rule sets.

A *policy* decomposes one moderation term (e.g. "sexy") into orthogonal *attributes*
(body region, exposure, action, other cues). An *attribute product* is an assignment of
values to some of those attributes, with a short explicit description ("It is known
that ..."). A *rule set* (adult platform, teen audience, region X) is nothing more than a
labelling of the products: changing the rules relabels products, it never retrains a model.

Every cell of the joint attribute grid (one value per attribute) belongs to at most one
product: the most specific matching product, ties broken by ``Product.priority``
(:mod:`icm.policy.grid`); cells no product matches take each rule set's ``default``.

Cross-references (a product naming an unknown value, a rule naming an unknown product)
are checked by :func:`icm.policy.validate.check_policy`, which reports every problem with
its location so that the YAML loader can point at the file and line.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from icm.policy.grid import CellGrid

_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")

Severity = Literal["low", "medium", "high"]
Verdict = Literal["allow", "violate"]


def _check_id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(
            f"{value!r} is not a valid identifier: use lower-case letters, digits, '_' or '-'"
        )
    return value


Ident = Annotated[str, AfterValidator(_check_id)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Term(_Strict):
    """A moderation term and the yes/no question that asks a model about it."""

    id: Ident
    question: str = Field(description="The yes/no question, e.g. 'Is the image sexy?'")
    description: str = ""
    statement: str | None = Field(
        default=None,
        description="How an explanation states the verdict, e.g. 'The image is related to gambling' "
        "(default: 'The image is <id>'); its negation inserts 'not' after 'is'",
    )

    @property
    def positive_statement(self) -> str:
        return self.statement or f"The image is {self.id}"

    @property
    def negative_statement(self) -> str:
        s = self.positive_statement
        return s.replace(" is ", " is not ", 1) if " is " in s else f"It is not true that {s[0].lower()}{s[1:]}"



class AttributeValue(_Strict):
    id: Ident
    description: str
    option: str | None = Field(
        default=None, description="How the value is worded as a multiple-choice option"
    )


    @property
    def option_text(self) -> str:
        return self.option or self.description


class Attribute(_Strict):
    """One orthogonal dimension of the term, with its named values."""

    id: Ident
    description: str = ""
    question: str = Field(description="The multiple-choice question asked about this attribute")
    values: list[AttributeValue] = Field(min_length=2)


    @cached_property
    def value_ids(self) -> list[str]:
        return [v.id for v in self.values]

    def value(self, value_id: str) -> AttributeValue:
        for v in self.values:
            if v.id == value_id:
                return v
        raise KeyError(f"attribute {self.id!r} has no value {value_id!r}")


class Product(_Strict):
    """An attribute product: an assignment of values, with its short description.

    Attributes a product leaves out do not apply to it (an action such as a kiss says
    nothing about exposure). ``positive`` says whether an image of this product *is* the
    term, i.e. what a correct answer to the term's yes/no question is; it is a fact about
    the content, independent of any rule set.
    """

    id: Ident
    assignment: dict[str, str] = Field(min_length=1)
    description: str
    positive: bool = True
    categories: list[str] = Field(
        default_factory=list,
        description="Dataset category names (e.g. the paper's file-name prefixes) of this product",
    )
    source: str | None = Field(default=None, description="Where the product comes from")
    priority: int = Field(
        default=0,
        description="Breaks ties of precedence: when equally specific products match one cell of the "
        "attribute grid, the one with the highest priority owns it (see icm.policy.grid)",
    )

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.assignment.items()))


class Rule(_Strict):
    """One line of a rule set: the products it matches and the label it gives them.

    A rule matches products listed in ``products`` and/or whose assignment matches every
    attribute in ``when`` (a value or a list of values). The first matching rule of a rule
    set labels a product.
    """

    name: str | None = None
    products: list[str] = Field(default_factory=list)
    when: dict[str, str | list[str]] = Field(default_factory=dict)
    label: Verdict
    severity: Severity | None = None
    reason: str | None = None

    @model_validator(mode="after")
    def _selects_something(self) -> Rule:
        if not self.products and not self.when:
            raise ValueError("a rule needs 'products' or 'when' to say which products it labels")
        if self.label == "allow" and self.severity is not None:
            raise ValueError("an 'allow' rule has no severity")
        return self

    def matches(self, product: Product) -> bool:
        if self.products and product.id in self.products:
            return True
        if not self.when:
            return False
        for attr, wanted in self.when.items():
            values = [wanted] if isinstance(wanted, str) else wanted
            if product.assignment.get(attr) not in values:
                return False
        return True

    @property
    def title(self) -> str:
        if self.name:
            return self.name
        parts = []
        if self.products:
            parts.append("products " + ", ".join(self.products))
        if self.when:
            parts.append(
                " and ".join(
                    f"{a} in {'/'.join(v) if isinstance(v, list) else v}" for a, v in self.when.items()
                )
            )
        return f"{self.label}: " + " or ".join(parts)


class CategoryMap(_Strict):
    """Products of this policy that fall under one category of a standard scheme.

    The products are those listed in ``products`` and/or whose assignment matches every
    attribute in ``when``, as a rule selects them (:mod:`icm.policy.taxonomy` names the
    schemes and their categories).
    """

    scheme: str = Field(description="openai, llavaguard or mlcommons (icm.policy.taxonomy.SCHEMES)")
    category: str = Field(description="A category of that scheme, as the scheme spells it: 'violence/graphic', 'O3', 'S12'")
    products: list[str] = Field(default_factory=list)
    when: dict[str, str | list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _selects_something(self) -> CategoryMap:
        if not self.products and not self.when:
            raise ValueError("a category mapping needs 'products' or 'when' to say which products it covers")
        return self

    def matches(self, product: Product) -> bool:
        return Rule(products=self.products, when=self.when, label="violate").matches(product)


class Thresholds(_Strict):
    """Thresholds on P(violation) for the three-way verdict (allow / review / block).

    ``review`` <= P(violation) < ``block`` is the uncertain band sent to a person.
    """

    review: float = Field(default=0.3, ge=0.0, le=1.0)
    block: float = Field(default=0.7, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.review > self.block:
            raise ValueError(f"review threshold {self.review} is above block threshold {self.block}")
        return self


class VideoAggregation(_Strict):
    """How a rule set turns the verdicts of a video's sampled frames into the video's verdict.

    ``worst`` (the default): the video takes its worst frame. ``corroborate``: a frame that
    blocks on its own makes the video ``review``; the video is blocked only when at least
    ``min_run`` of any ``window`` consecutive sampled frames block (``window`` defaults to
    ``min_run``: a run). Frames are judged at ``thresholds`` when given (a corroborated rule
    can afford lower per-frame thresholds), else at the rule set's. A frame of a product in a
    zero-tolerance category (``sexual/minors``, ``S4``: :data:`icm.policy.taxonomy.ZERO_TOLERANCE`)
    blocks the video alone, whatever this says.
    """

    aggregate: Literal["worst", "corroborate"] = "worst"
    min_run: int = Field(default=3, ge=1, le=1000, description="Blocking frames needed to block the video")
    window: int | None = Field(
        default=None, ge=1, le=1000, description="Among this many consecutive sampled frames (default: min_run, a run)"
    )
    thresholds: Thresholds | None = Field(default=None, description="Per-frame thresholds (default: the rule set's)")

    @model_validator(mode="after")
    def _window(self) -> VideoAggregation:
        if self.window is not None and self.window < self.min_run:
            raise ValueError(f"window {self.window} is shorter than min_run {self.min_run}: no window could hold the run")
        return self

    @property
    def span(self) -> int:
        return self.window or self.min_run


class Label(_Strict):
    """The label a rule set gives one product, and which rule gave it."""

    verdict: Verdict
    severity: Severity | None = None
    rule: str = Field(description="The rule that fired, or 'default'")
    reason: str | None = None

    @property
    def violates(self) -> bool:
        return self.verdict == "violate"

    def short(self) -> str:
        return "allow" if self.verdict == "allow" else f"violate ({self.severity or 'medium'})"


class RuleSet(_Strict):
    name: Ident
    audience: str
    description: str = ""
    rules: list[Rule] = Field(default_factory=list)
    default: Verdict | None = Field(
        default=None, description="Label of products no rule matches; none means every product must be matched"
    )
    default_severity: Severity = "medium"
    thresholds: Thresholds = Thresholds()
    video: VideoAggregation | None = Field(
        default=None, description="How a video's frame verdicts make its verdict (default: its worst frame)"
    )


    def label_for(self, product: Product) -> Label | None:
        """The label of ``product``: the first matching rule, else the default, else None."""
        for i, rule in enumerate(self.rules):
            if rule.matches(product):
                severity = (rule.severity or self.default_severity) if rule.label == "violate" else None
                return Label(verdict=rule.label, severity=severity, rule=rule.name or f"rule {i + 1}: {rule.title}", reason=rule.reason)
        return self.default_label()

    def default_label(self) -> Label | None:
        """The ``default`` label: products no rule matches and grid cells no product covers."""
        if self.default is None:
            return None
        severity = self.default_severity if self.default == "violate" else None
        return Label(verdict=self.default, severity=severity, rule="default")


class EvidenceSourceSpec(_Strict):
    """A user's own ONNX image classifier, declared in a policy's ``evidence.sources``.

    The image (RGB, 0..255) is resized to ``input_size`` (width, height), multiplied by
    ``scale``, then ``(x - mean) / std`` per channel, laid out as ``layout`` with a batch
    axis first; the first output, one row per image, is read as ``output`` (``logits``:
    softmax is applied; ``probabilities``: used as they are; ``sigmoid``: one independent
    probability per label). ``path`` is absolute or relative to the working directory
    (``~`` and ``$VARS`` are expanded to open the file; messages and records show it as written).
    """

    type: Literal["onnx_classifier"] = "onnx_classifier"
    path: str
    input_size: tuple[int, int] = Field(description="(width, height) the image is resized to")
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = Field(default=1 / 255, gt=0.0, description="Pixels (0..255) are multiplied by this first")
    layout: Literal["nchw", "nhwc"] = "nchw"
    channels: Literal["rgb", "bgr"] = "rgb"
    output: Literal["logits", "probabilities", "sigmoid"] = "logits"
    labels: list[str] = Field(min_length=1, description="The classifier's output labels, in output order")
    license: str | None = Field(default=None, description="The model's licence, recorded for the people who audit the policy")

    @model_validator(mode="after")
    def _sizes(self) -> EvidenceSourceSpec:
        if min(self.input_size) < 1:
            raise ValueError(f"input_size must be positive, got {list(self.input_size)}")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not be 0")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        return self


class EvidenceFrom(_Strict):
    """One output of one evidence source, as evidence for the term or for one attribute value.

    ``labels``: classes of a classifier (their probabilities are summed) or of a detector
    (the best box score among them); ``keywords``: words an OCR source reads (the best line
    confidence among lines holding one). The item *fires* when that score is at least
    ``min_score``; its evidence is then ``strength * score``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    source: str
    labels: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)
    value: str | None = Field(default=None, description="The attribute value this is evidence for (attributes only)")
    strength: float = Field(default=1.0, gt=0.0, le=1.0)
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_kind(self) -> EvidenceFrom:
        if bool(self.labels) == bool(self.keywords):
            raise ValueError("give either 'labels' (classes of a classifier or detector) or 'keywords' (OCR), not both or neither")
        return self


class TermEvidence(_Strict):
    """Where P(term) comes from offline: a noisy-OR of the items that fire.

    ``silent``: P(term) when no item fires (the leak of the noisy-OR); ``None``: the term is
    then not judged (the sources can flag the term but not clear an image).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    silent: float | None = Field(default=None, ge=0.0, lt=1.0)
    from_: list[EvidenceFrom] = Field(alias="from", min_length=1)


class AttributeEvidence(_Strict):
    """Where one attribute's distribution comes from offline (see docs/offline-evidence.md).

    ``silent``: the value that the silence of every source stands for ("none", "normal"); it
    receives ``silent_confidence`` of the mass no item claims, the rest spread evenly. Without
    it, an attribute none of whose items fires is not judged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    silent: str | None = None
    silent_confidence: float = Field(default=0.8, ge=0.0, le=1.0)
    from_: list[EvidenceFrom] = Field(alias="from", min_length=1)


class Evidence(_Strict):
    """A policy's offline evidence: which outputs of offline models judge the term and attributes."""

    sources: dict[str, EvidenceSourceSpec] = Field(default_factory=dict, description="The user's own ONNX classifiers, by name")
    term: TermEvidence | None = None
    attributes: dict[str, AttributeEvidence] = Field(default_factory=dict)


_POLICY_CACHES = ("attribute_map", "product_map", "rule_set_map", "category_map", "grid", "decision_labels", "standard_categories")


class Policy(_Strict):
    """A moderation policy for one term: attributes, attribute products and rule sets."""

    name: Ident
    version: str = "1"
    description: str = ""
    term: Term
    attributes: list[Attribute] = Field(min_length=1)
    products: list[Product] = Field(min_length=1)
    rule_sets: list[RuleSet] = Field(min_length=1)
    default_rules: str | None = Field(
        default=None, description="The rule set used when none is named (default: the first)"
    )
    evidence: Evidence | None = Field(
        default=None, description="Offline evidence sources mapped onto the term and attribute values (the detector backend)"
    )
    taxonomy: list[CategoryMap] = Field(
        default_factory=list,
        description="Which products fall under which categories of the standard schemes (openai, llavaguard, mlcommons)",
    )
    uncovered_positive: bool | None = Field(
        default=None,
        description="Whether an image in a cell of the attribute grid that no product covers is an "
        "instance of the term (what the term question should answer there). None: unknown, so the "
        "term's answer is no evidence for or against those cells (likelihood 1/2 in fusion)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        # Imported here: validate.py imports this module.
        from icm.policy.validate import PolicyError, check_policy

        errors = [i for i in check_policy(self) if i.level == "error"]
        if errors:
            raise PolicyError(errors)
        return self

    def model_copy(self, *, update: dict | None = None, deep: bool = False) -> Policy:  # type: ignore[override]
        """A copy whose lookup tables are rebuilt (they would go stale with ``update``)."""
        new = super().model_copy(update=update, deep=deep)
        for key in _POLICY_CACHES:
            new.__dict__.pop(key, None)
        return new

    # -- lookups -------------------------------------------------------------------------

    @cached_property
    def attribute_map(self) -> dict[str, Attribute]:
        return {a.id: a for a in self.attributes}

    @cached_property
    def product_map(self) -> dict[str, Product]:
        return {p.id: p for p in self.products}

    @cached_property
    def rule_set_map(self) -> dict[str, RuleSet]:
        return {r.name: r for r in self.rule_sets}

    def attribute(self, attr_id: str) -> Attribute:
        try:
            return self.attribute_map[attr_id]
        except KeyError:
            raise KeyError(f"policy {self.name!r} has no attribute {attr_id!r}") from None

    def product(self, product_id: str) -> Product:
        try:
            return self.product_map[product_id]
        except KeyError:
            raise KeyError(f"policy {self.name!r} has no product {product_id!r}") from None

    def rule_set(self, name: str | None = None) -> RuleSet:
        """The named rule set, or the policy's default rule set when ``name`` is None."""
        if name is None:
            name = self.default_rules or self.rule_sets[0].name
        try:
            return self.rule_set_map[name]
        except KeyError:
            known = ", ".join(self.rule_set_map)
            raise KeyError(f"policy {self.name!r} has no rule set {name!r} (known: {known})") from None

    def labels(self, rules: str | RuleSet | None = None) -> dict[str, Label]:
        """Every product's label under a rule set (validation guarantees one each)."""
        rs = rules if isinstance(rules, RuleSet) else self.rule_set(rules)
        out: dict[str, Label] = {}
        for p in self.products:
            label = rs.label_for(p)
            if label is None:  # only reachable for rule sets built outside a Policy
                raise ValueError(f"rule set {rs.name!r} labels no rule for product {p.id!r} and has no default")
            out[p.id] = label
        return out

    def uncovered_label(self, rules: str | RuleSet | None = None) -> Label | None:
        """The label of the grid cells no product covers: the rule set's default."""
        rs = rules if isinstance(rules, RuleSet) else self.rule_set(rules)
        return rs.default_label()

    @cached_property
    def grid(self) -> CellGrid:
        """The joint attribute grid and the product that owns each cell (computed once)."""
        from icm.policy.grid import build_grid

        return build_grid(self)

    @cached_property
    def standard_categories(self) -> dict[str, dict[str, list[str]]]:
        """Scheme -> category -> the ids of the products mapped to it (policy order)."""
        out: dict[str, dict[str, list[str]]] = {}
        for m in self.taxonomy:
            ids = out.setdefault(m.scheme, {}).setdefault(m.category, [])
            ids.extend(p.id for p in self.products if m.matches(p) and p.id not in ids)
        for cats in out.values():
            for cat, ids in cats.items():
                cats[cat] = [p.id for p in self.products if p.id in ids]
        return out

    def resolve_category(self, category: str) -> Product:
        """The product a dataset category name (e.g. ``upper_bust``) stands for."""
        hit = self.category_map.get(category)
        if hit is None:
            hit = self.category_map.get(category.lower().replace("-", "_").replace(" ", "_"))
        if hit is None:
            raise KeyError(f"category {category!r} resolves to no product of policy {self.name!r}")
        return self.product_map[hit]

    @cached_property
    def category_map(self) -> dict[str, str]:
        """Category name -> product id; a product's own id is also a category name."""
        out: dict[str, str] = {}
        for p in self.products:
            out.setdefault(p.id, p.id)
            for c in p.categories:
                out[c] = p.id
        return out
