"""The images to generate data for, each with its attribute product.

Three input shapes, mixed freely:

* a CSV file with a header naming an image column (``image``, ``path``, ``file``) and a
  product column (``product``, ``category``, ``label``);
* a JSONL file, one ``{"image": ..., "product": ...}`` object a line (or a JSON list of
  such objects);
* a folder with one sub-folder per product or category name (``upper_bust/x.jpg``),
  walked recursively.

Relative image paths in CSV/JSONL files are relative to the file's folder. A product is
named by its id or by any of its dataset category names (``policy.resolve_category``).
A line that cannot be used becomes an :class:`InputError` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from icm.fileio import read_jsonl
from icm.moderation.inputs import iter_image_paths
from icm.policy import Policy, Product

__all__ = ["InputError", "Sample", "file_sha256", "load_samples"]

IMAGE_KEYS = ("image", "image_path", "path", "file", "filename", "file_name", "img")
PRODUCT_KEYS = ("product", "category", "label", "class", "attribute_product")


@dataclass(frozen=True)
class Sample:
    """One image and the product it shows."""

    path: Path
    product: Product
    category: str
    origin: str
    """Where the sample was listed (``file.csv:12``, or the folder)."""


@dataclass(frozen=True)
class InputError:
    origin: str
    error: str


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pick(row: dict[str, object], keys: tuple[str, ...]) -> str | None:
    lowered = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    for k in keys:
        v = lowered.get(k)
        if v is not None and str(v).strip():
            return str(v).strip()
    return None


def _resolve(policy: Policy, name: str) -> Product | None:
    try:
        return policy.resolve_category(name)
    except KeyError:
        return None


def _sample(policy: Policy, base: Path, image: str | None, product: str | None, origin: str) -> Sample | InputError:
    if not image:
        return InputError(origin, f"no image column (one of {', '.join(IMAGE_KEYS)})")
    if not product:
        return InputError(origin, f"no product column (one of {', '.join(PRODUCT_KEYS)})")
    prod = _resolve(policy, product)
    if prod is None:
        return InputError(origin, f"{product!r} is no product or category of policy {policy.name!r}")
    path = Path(image).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        return InputError(origin, f"no such image file: {path}")
    return Sample(path=path, product=prod, category=product, origin=origin)


def _from_csv(policy: Policy, file: Path) -> list[Sample | InputError]:
    out: list[Sample | InputError] = []
    with open(file, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            return [InputError(str(file), "empty CSV file (it needs a header with image and product columns)")]
        for row in reader:
            origin = f"{file}:{reader.line_num}"
            out.append(_sample(policy, file.parent, _pick(row, IMAGE_KEYS), _pick(row, PRODUCT_KEYS), origin))
    return out


def _from_jsonl(policy: Policy, file: Path) -> list[Sample | InputError]:
    out: list[Sample | InputError] = []
    text = file.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):  # a JSON list of objects
        try:
            rows = json.loads(text)
        except ValueError as exc:
            return [InputError(str(file), f"not a JSON list: {exc}")]
        for i, row in enumerate(rows):
            origin = f"{file}[{i}]"
            if not isinstance(row, dict):
                out.append(InputError(origin, "not a JSON object"))
            else:
                out.append(_sample(policy, file.parent, _pick(row, IMAGE_KEYS), _pick(row, PRODUCT_KEYS), origin))
        return out
    rows = read_jsonl(file, text=text, skip_bad=True)
    found: list[tuple[int, Sample | InputError]] = [(e.line, InputError(f"{file}:{e.line}", e.reason)) for e in rows.errors]
    for no, row in zip(rows.lines, rows, strict=True):
        found.append((no, _sample(policy, file.parent, _pick(row, IMAGE_KEYS), _pick(row, PRODUCT_KEYS), f"{file}:{no}")))
    return [x for _, x in sorted(found, key=lambda t: t[0])]  # in file order


def _from_folder(policy: Policy, root: Path) -> list[Sample | InputError]:
    out: list[Sample | InputError] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            out.append(InputError(str(entry), "an image directly in the input folder: put it in a folder named after its product"))
            continue
        prod = _resolve(policy, entry.name)
        if prod is None:
            out.append(InputError(str(entry), f"folder name {entry.name!r} is no product or category of policy {policy.name!r}"))
            continue
        for pe in iter_image_paths([str(entry)]):
            if pe.path is None:
                out.append(InputError(pe.source, pe.error or "no image"))
            else:
                out.append(Sample(path=pe.path, product=prod, category=entry.name, origin=str(entry)))
    return out


def load_samples(inputs: list[str], policy: Policy) -> tuple[list[Sample], list[InputError]]:
    """The samples listed by ``inputs`` (CSV, JSONL files and product folders), in order."""
    samples: list[Sample] = []
    errors: list[InputError] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            items = _from_folder(policy, p)
        elif not p.exists():
            items = [InputError(raw, "no such file or folder")]
        elif p.suffix.lower() == ".csv":
            items = _from_csv(policy, p)
        elif p.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            items = _from_jsonl(policy, p)
        else:
            items = [InputError(raw, "an input is a CSV (image,product), a JSONL file or a folder with one sub-folder per product")]
        for it in items:
            if isinstance(it, Sample):
                samples.append(it)
            else:
                errors.append(it)
    return samples, errors
