"""Ground truth for moderation results: from file names, categories or a labels file.

The truth of an image is decided in two steps, so that a different rule set relabels
the same results:

1. *What the image is.* A dataset category (the paper's file names
   ``<category>_<timestamp>...``, e.g. ``upper_bust_2022...jpg``, or a ``category``
   column of a labels file) is resolved through the policy to an attribute product
   (:meth:`icm.policy.Policy.resolve_category`). Names that carry only the term
   (``sexy_00001.jpg`` / ``not-sexy_00002.jpg``, the paper's ICM-Test) say whether the
   image is the term, not which product it is.
2. *What the rule set says about it.* With ``target="rules"`` (the default) an image is
   positive when the rule set labels its product ``violate``; with ``target="term"`` when
   the product *is* the term (``Product.positive``), whatever the rules. Term-only labels
   cannot be relabelled: they are the term's truth under every rule set, and reports say
   how many images that concerns.

A labels file may also give the truth directly (a ``label`` column: ``violate`` /
``allow``, ``1`` / ``0``, ``yes`` / ``no``, ``true`` / ``false``); such labels are taken as
they are, for every rule set.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

from pydantic import BaseModel, Field

from icm.fileio import read_jsonl, read_text
from icm.policy import Policy
from icm.policy.model import RuleSet

Target = Literal["rules", "term"]
TruthSource = Literal["category", "product", "term-name", "label"]

# <category>_<timestamp or long number>[_anything][.ext]; the category is the shortest
# prefix followed by a run of 6+ digits (the paper's names: bite_finger_20231122110742_1005).
_CATEGORY_RE = re.compile(r"^(?P<cat>.+?)[_-]\d{6,}(?:[_.\-].*)?$")
_POSITIVE_WORDS = {"1", "true", "yes", "y", "violate", "violation", "positive", "pos", "block", "unsafe", "flag", "flagged"}
_NEGATIVE_WORDS = {"0", "false", "no", "n", "allow", "allowed", "negative", "neg", "safe", "ok", "clean"}


class Truth(BaseModel):
    """The truth for one image, and where it came from."""

    positive: bool = Field(description="True when the image should be flagged")
    source: TruthSource
    category: str | None = Field(default=None, description="The dataset category (as named in the data)")
    product: str | None = Field(default=None, description="The policy product it resolves to")
    rule: str | None = Field(default=None, description="The rule of the rule set that labels the product")
    from_name: bool = Field(default=False, description="Whether the category was read from the image's name")


def image_key(name: str) -> str:
    """The file name of a path (POSIX or Windows separators)."""
    return PureWindowsPath(PurePosixPath(name).name).name


def image_stem(name: str) -> str:
    base = image_key(name)
    return base.rsplit(".", 1)[0] if "." in base else base


def _parent_dir(name: str) -> str | None:
    parts = PureWindowsPath(name.replace("\\", "/")).as_posix().split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2] not in ("", ".", "..") else None


def term_name_truth(category: str, term: str) -> bool | None:
    """True for a name that is the term (``sexy``), False for its negation
    (``not-sexy``, ``not_sexy``, ``non-sexy``, ``nonsexy``), None otherwise."""
    c = category.strip().lower().replace("_", "-").replace(" ", "-")
    t = term.lower().replace("_", "-")
    if c == t:
        return True
    if re.fullmatch(rf"(not|non|no)-?{re.escape(t)}", c):
        return False
    return None


class LabelSpec(BaseModel):
    """A row of a labels file: the truth given directly, by category or by product."""

    label: bool | None = None
    category: str | None = None
    product: str | None = None


def _parse_label(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    s = str(value).strip().lower()
    if s in _POSITIVE_WORDS:
        return True
    if s in _NEGATIVE_WORDS:
        return False
    return None


def _spec_from_mapping(row: dict[str, object], where: str) -> tuple[str, LabelSpec]:
    lower = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    image = next((lower[k] for k in ("image", "path", "image_name", "file", "filename", "name", "id", "sha256") if lower.get(k)), None)
    if not image:
        raise ValueError(f"{where}: no image column (image, path, image_name, file or sha256)")
    spec = LabelSpec()
    if lower.get("label") not in (None, ""):
        spec.label = _parse_label(lower["label"])
        if spec.label is None:
            raise ValueError(f"{where}: label {lower['label']!r} is not one of violate/allow, 1/0, yes/no, true/false")
    if lower.get("category") not in (None, ""):
        spec.category = str(lower["category"]).strip()
    if lower.get("product") not in (None, ""):
        spec.product = str(lower["product"]).strip()
    if spec.label is None and spec.category is None and spec.product is None:
        raise ValueError(f"{where}: no label, category or product for {image!r}")
    return str(image), spec


def read_labels_file(path: str | Path) -> dict[str, LabelSpec]:
    """Labels by image: CSV/TSV with a header, a JSON object ``{image: label-or-category}``
    or a list of objects, or JSONL. Columns: ``image`` (or ``path``/``image_name``) and one
    of ``label``, ``category``, ``product``."""
    p = Path(path)
    text = read_text(p, "labels file", encoding="utf-8-sig")
    out: dict[str, LabelSpec] = {}
    stripped = text.lstrip()
    if stripped.startswith("{") or stripped.startswith("["):
        try:
            data = json.loads(text)
            rows: list[tuple[str, object]] = []
            if isinstance(data, dict):
                for k, v in data.items():
                    if isinstance(v, dict):
                        rows.append((k, {"image": k, **v}))
                    else:
                        rows.append((k, {"image": k, ("label" if _parse_label(v) is not None else "category"): v}))
            elif isinstance(data, list):
                rows = [(str(i), r) for i, r in enumerate(data)]
            else:
                raise ValueError(f"{p}: expected a JSON object or list")
            for i, (k, row) in enumerate(rows):
                if not isinstance(row, dict):
                    raise ValueError(f"{p}: entry {k!r} is not an object")
                img, spec = _spec_from_mapping(row, f"{p}: entry {i + 1}")
                out[img] = spec
            return out
        except json.JSONDecodeError:
            if not stripped.startswith("{"):
                raise ValueError(f"{p}: not valid JSON") from None
            objects = read_jsonl(p, text=text)  # JSONL
            for n, row in zip(objects.lines, objects, strict=True):
                img, spec = _spec_from_mapping(row, f"{p}:{n}")
                out[img] = spec
            return out
    first = text.splitlines()[0] if text.strip() else ""
    dialect = "excel-tab" if "\t" in first else "excel"
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    for n, row in enumerate(reader, 2):
        img, spec = _spec_from_mapping(row, f"{p}:{n}")
        out[img] = spec
    if not out:
        raise ValueError(f"{p}: no labels")
    return out


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo", ".avif", ".heic",
                   ".mp4", ".webm", ".mov", ".mkv"}


def read_labels_dir(path: str | Path) -> dict[str, LabelSpec]:
    """Labels from a folder of folders: ``DIR/<label or category>/<image>``.

    A sub-folder named by a label word (``violate``/``allow``, ``yes``/``no``,
    ``positive``/``negative``, ``unsafe``/``safe``, ``1``/``0`` ...) gives the truth
    directly; any other name is taken as a dataset category of the policy. Each image is
    keyed by its path under ``DIR``, its file name and the SHA-256 of its bytes, so
    results of the same images elsewhere (copied, renamed) still find their label.
    """
    import hashlib

    root = Path(path)
    out: dict[str, LabelSpec] = {}
    for sub in sorted(d for d in root.iterdir() if d.is_dir()):
        label = _parse_label(sub.name)
        spec = LabelSpec(label=label) if label is not None else LabelSpec(category=sub.name)
        for f in sorted(sub.rglob("*")):
            if not f.is_file() or f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            out[f.relative_to(root).as_posix()] = spec
            digest = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            out[digest.hexdigest()] = spec
    if not out:
        raise ValueError(f"{root}: no labelled images: expected sub-folders named violate/allow (or yes/no, 1/0, "
                         "or a category of the policy) holding the images")
    return out


def read_labels(path: str | Path) -> dict[str, LabelSpec]:
    """Labels from a file (:func:`read_labels_file`) or a folder (:func:`read_labels_dir`)."""
    p = Path(path)
    return read_labels_dir(p) if p.is_dir() else read_labels_file(p)


class LabelResolver:
    """Turns image names (and an optional labels file) into :class:`Truth` under a rule set."""

    def __init__(
        self,
        policy: Policy,
        rules: str | RuleSet | None = None,
        *,
        target: Target = "rules",
        labels: dict[str, LabelSpec] | None = None,
    ) -> None:
        self.policy = policy
        self.rule_set = rules if isinstance(rules, RuleSet) else policy.rule_set(rules)
        self.target: Target = target
        self.labels = labels
        self._by_key: dict[str, LabelSpec] = {}
        if labels:
            for name, spec in labels.items():
                self._by_key.setdefault(name, spec)
                self._by_key.setdefault(image_key(name), spec)
                self._by_key.setdefault(image_stem(name), spec)
        self._known = sorted(set(policy.category_map), key=len, reverse=True)

    # -- categories ----------------------------------------------------------------------

    def _resolves(self, category: str) -> bool:
        if term_name_truth(category, self.policy.term.id) is not None:
            return True
        try:
            self.policy.resolve_category(category)
        except KeyError:
            return False
        return True

    def category_of(self, name: str) -> str | None:
        """The dataset category an image name carries, or None.

        Tried in order: the ``<category>_<digits>`` pattern of the file name, the parent
        folder's name, the longest known category name the file name starts with.
        """
        stem = image_stem(name)
        m = _CATEGORY_RE.match(stem)
        if m and self._resolves(m.group("cat")):
            return m.group("cat")
        parent = _parent_dir(name)
        if parent and self._resolves(parent):
            return parent
        low = stem.lower()
        for known in self._known:
            if low.startswith(known) and (len(low) == len(known) or low[len(known)] in "_-. "):
                return stem[: len(known)]
        term = self.policy.term.id.lower()
        for prefix in (f"not-{term}", f"not_{term}", f"non-{term}", f"non_{term}", term):
            if low.startswith(prefix) and (len(low) == len(prefix) or low[len(prefix)] in "_-. "):
                return stem[: len(prefix)]
        return m.group("cat") if m else None

    # -- truth ---------------------------------------------------------------------------

    def _product_truth(self, product_id: str, source: TruthSource, category: str | None) -> Truth:
        try:
            product = self.policy.product(product_id)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        label = self.rule_set.label_for(product)
        if self.target == "term" or label is None:
            positive = product.positive
        else:
            positive = label.violates
        return Truth(positive=positive, source=source, category=category, product=product.id, rule=label.rule if label else None)

    def _category_truth(self, category: str, source: TruthSource = "category") -> Truth | None:
        tn = term_name_truth(category, self.policy.term.id)
        if tn is not None:
            return Truth(positive=tn, source="term-name", category=category)
        try:
            product = self.policy.resolve_category(category)
        except KeyError:
            return None
        return self._product_truth(product.id, source, category)

    def truth(self, name: str, sha256: str | None = None) -> Truth | None:
        """The truth for an image, or None when neither the labels nor its name give one.

        A labels file is looked up by the image's path, its file name, its stem and (when
        given) the SHA-256 of its bytes, which survives renaming and moving.
        """
        if self.labels is not None:
            spec = (self._by_key.get(name) or (self._by_key.get(sha256.lower()) if sha256 else None)
                    or self._by_key.get(image_key(name)) or self._by_key.get(image_stem(name)))
            if spec is not None:
                if spec.label is not None:
                    return Truth(positive=spec.label, source="label", category=spec.category, product=spec.product)
                if spec.product is not None:
                    return self._product_truth(spec.product, "product", spec.category)
                if spec.category is not None:
                    return self._category_truth(spec.category)
        category = self.category_of(name)
        truth = self._category_truth(category) if category else None
        if truth is not None:
            truth.from_name = True
            return truth
        parent = _parent_dir(name)
        label = _parse_label(parent) if parent else None
        if label is not None and parent and not parent.isdigit():  # .../violate/x.jpg, .../allow/y.jpg
            return Truth(positive=label, source="label", category=None)
        return None
