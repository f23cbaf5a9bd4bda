"""The built-in benchmark loaders: UnsafeBench, the LlavaGuard dataset, VLGuard and SMID.

Each reads the benchmark as its publisher distributes it (docs/benchmarks.md documents
every layout with its source) and yields a :class:`BenchItem` per image and a
:class:`BenchIssue` per problem (a file without a needed column, a missing image file,
an unknown label): the rest goes on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icm.evaluation.bench import register
from icm.evaluation.bench.records import BenchDataError, BenchIssue, BenchItem, Benchmark, CategoryMapping
from icm.evaluation.bench.tables import column_issue, hf_tables, image_of, missing_columns, read_csv_rows, read_json_list

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _m(native: str, openai: list[str] | None = None, llavaguard: list[str] | None = None,
       mlcommons: list[str] | None = None, note: str = "") -> CategoryMapping:
    mapped = {k: v for k, v in (("openai", openai), ("llavaguard", llavaguard), ("mlcommons", mlcommons)) if v}
    return CategoryMapping(native=native, mapped=mapped, note=note)


NO_SCHEME = "no category of the openai, llavaguard or mlcommons schemes covers it"


def _label(value: Any) -> str | None:
    """safe/unsafe from a benchmark's label value (Safe/Unsafe, bools, 0/1); None when it is neither."""
    if isinstance(value, bool):
        return "safe" if value else "unsafe"
    text = str(value).strip().lower()
    return {"safe": "safe", "unsafe": "unsafe", "0": "safe", "1": "unsafe"}.get(text)


def _hf_items(bench: Benchmark, root: Path, *, label_col: str, category_col: str,
              category_of: Any = None) -> Iterator[BenchItem | BenchIssue]:
    """Rows of a Hugging Face dataset copy with an ``image`` column, a label and a category column."""
    counters: dict[str, int] = {}
    for table in hf_tables(root):
        cols = table.columns()
        missing = missing_columns(cols, ("image", label_col, category_col))
        if missing:
            yield column_issue(table.path, cols, missing)
            continue
        for row in table.rows():
            n = counters.get(table.split, 0)
            counters[table.split] = n + 1
            item_id = f"{table.split}-{n}"
            label = _label(row.get(label_col))
            if label is None:
                yield BenchIssue(file=str(table.path), where=f"row {n} of split {table.split}",
                                 problem=f"{label_col} is {row.get(label_col)!r}, neither Safe nor Unsafe; the row is left out")
                continue
            raw, path = image_of(row.get("image"))
            image_path = None
            if raw is None:
                if path is None:
                    yield BenchIssue(file=str(table.path), where=f"row {n} of split {table.split}",
                                     problem="the image column is empty; the row is left out")
                    continue
                p = Path(path) if Path(path).is_absolute() else table.path.parent / path
                if not p.is_file():
                    yield BenchIssue(file=str(table.path), where=f"row {n} of split {table.split}",
                                     problem=f"image file {p} does not exist; the row is left out")
                    continue
                image_path = str(p)
            native = category_of(row.get(category_col)) if category_of else str(row.get(category_col) or "").strip() or None
            yield BenchItem(
                id=item_id, split=table.split, label=label, category=native, mapped=bench.mapping(native),
                image_path=image_path, image_bytes=raw, source_file=str(table.path),
                extra={k: row[k] for k in ("source", "rationale") if isinstance(row.get(k), str)},
            )


# -- UnsafeBench -------------------------------------------------------------------------------

UNSAFEBENCH = Benchmark(
    name="unsafebench",
    title="UnsafeBench (Qu et al. 2024, arXiv 2405.03486)",
    source="https://huggingface.co/datasets/yiting/UnsafeBench",
    layout="the dataset repository's parquet files (data/train-*.parquet, data/test-*.parquet) or a save_to_disk folder; "
    "columns image, safety_label (Safe/Unsafe), category, source",
    label_rule="safety_label Unsafe is unsafe, Safe is safe",
    categories=[
        _m("Hate", ["hate"], ["O1"], ["S10"]),
        _m("Harassment", ["harassment"], ["O1"]),
        _m("Violence", ["violence"], ["O2"], ["S1"]),
        _m("Self-harm", ["self-harm"], ["O7"], ["S11"]),
        _m("Sexual", ["sexual"], ["O3", "O4"], ["S12"]),
        _m("Shocking", ["violence/graphic"], ["O2"], note="shocking (gory, disturbing) images: graphic violence is the closest"),
        _m("Illegal activity", ["illicit"], ["O5"], ["S2"]),
        _m("Deception", note=NO_SCHEME + " (misinformation)"),
        _m("Political", note=NO_SCHEME + " (S13 Elections is narrower than political content)"),
        _m("Public and personal health", note=NO_SCHEME),
        _m("Spam", note=NO_SCHEME),
    ],
)


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _unsafebench_category(value: Any) -> str | None:
    """The card's spelling of a category, whatever its case and punctuation ("self harm", "Self-Harm")."""
    text = str(value or "").strip()
    for c in UNSAFEBENCH.categories:
        if _key(c.native) == _key(text):
            return c.native
    return text or None


@register(UNSAFEBENCH)
def load_unsafebench(root: Path) -> Iterator[BenchItem | BenchIssue]:
    yield from _hf_items(UNSAFEBENCH, root, label_col="safety_label", category_col="category", category_of=_unsafebench_category)


# -- LlavaGuard ------------------------------------------------------------------------------

LLAVAGUARD = Benchmark(
    name="llavaguard",
    title="LlavaGuard dataset (Helff et al. 2024, arXiv 2406.05113)",
    source="https://huggingface.co/datasets/AIML-TUDA/LlavaGuard",
    layout="the dataset repository's parquet files or a save_to_disk folder; columns image, rating (Safe/Unsafe), "
    "category ('O1: Hate, Humiliation, Harassment' ... 'O9: ...', or 'NA: None applying'), rationale",
    label_rule="rating Unsafe is unsafe, Safe is safe",
    categories=[_m(f"O{i}", llavaguard=[f"O{i}"]) for i in range(1, 10)]
    + [_m("NA", note="'NA: None applying': no category of the taxonomy applies")],
)


def _llavaguard_category(value: Any) -> str | None:
    text = str(value or "").strip()
    code = text.split(":", 1)[0].strip().upper()
    return code or None


@register(LLAVAGUARD)
def load_llavaguard(root: Path) -> Iterator[BenchItem | BenchIssue]:
    yield from _hf_items(LLAVAGUARD, root, label_col="rating", category_col="category", category_of=_llavaguard_category)


# -- VLGuard -------------------------------------------------------------------------------------

_HATE = {"openai": ["hate"], "llavaguard": ["O1"], "mlcommons": ["S10"]}
VLGUARD = Benchmark(
    name="vlguard",
    title="VLGuard (Zong et al. 2024, ICML, arXiv 2402.02207)",
    source="https://huggingface.co/datasets/ys-zong/VLGuard",
    layout="test.json (and train.json) with the images unzipped beside them: test/IMAGE, train/IMAGE; "
    "each item has id, image, safe (true/false), harmful_category and harmful_subcategory (unsafe ones), instr-resp",
    label_rule="safe: false is unsafe, safe: true is safe (its instructions are not judged: icm judges the image)",
    safe_items_have_categories=False,
    categories=[
        _m("privacy/personal data", mlcommons=["S7"]),
        _m("risky behavior/professional advice", mlcommons=["S6"]),
        _m("risky behavior/political", note=NO_SCHEME + " (S13 Elections is narrower than political persuasion)"),
        _m("risky behavior/sexually explicit", ["sexual"], ["O3", "O4"], ["S12"]),
        _m("risky behavior/violence", ["violence"], ["O2"], ["S1"]),
        _m("deception/disinformation", note=NO_SCHEME + " (misinformation)"),
        *(CategoryMapping(native=f"discrimination/{s}", mapped=_HATE) for s in ("sex", "race", "other")),
    ],
)


@register(VLGUARD)
def load_vlguard(root: Path) -> Iterator[BenchItem | BenchIssue]:
    files = [root / f"{s}.json" for s in ("train", "validation", "test") if (root / f"{s}.json").is_file()]
    if not files:
        raise BenchDataError(f"{root}: no test.json or train.json in it (VLGuard's metadata files)")
    for path in files:
        split = path.stem
        for n, entry in enumerate(read_json_list(path)):
            where = f"item {n}" + (f" (id {entry.get('id')})" if isinstance(entry, dict) and entry.get("id") else "")
            if not isinstance(entry, dict) or "image" not in entry or "safe" not in entry:
                yield BenchIssue(file=str(path), where=where, problem="an item needs 'image' and 'safe'; it is left out")
                continue
            label = _label(entry["safe"]) if isinstance(entry["safe"], bool) else None
            if label is None:
                yield BenchIssue(file=str(path), where=where, problem=f"safe is {entry['safe']!r}, not true or false; left out")
                continue
            image = root / split / str(entry["image"])
            if not image.is_file():
                yield BenchIssue(file=str(path), where=where, problem=f"image file {image} does not exist; the item is left out")
                continue
            native = None
            if label == "unsafe":
                cat, sub = str(entry.get("harmful_category") or "").strip(), str(entry.get("harmful_subcategory") or "").strip()
                native = f"{cat}/{sub}".lower() if cat or sub else None
            yield BenchItem(id=str(entry.get("id") or f"{split}-{n}"), split=split, label=label, category=native,
                            mapped=VLGUARD.mapping(native), image_path=str(image), source_file=str(path))


# -- SMID ---------------------------------------------------------------------------------------

SMID_UNSAFE_BELOW = 2.5
SMID_SAFE_ABOVE = 3.5
FOUNDATIONS = {"harm_mean": "Care", "fairness_mean": "Fairness", "ingroup_mean": "Loyalty",
               "authority_mean": "Authority", "purity_mean": "Sanctity"}
SMID = Benchmark(
    name="smid",
    title="Socio-Moral Image Database (Crone et al. 2018, PLoS ONE 13(1) e0190954)",
    source="https://osf.io/2rqad/",
    layout="SMID_norms.csv (img_name or an unnamed first column, moral_mean, harm_mean, fairness_mean, ingroup_mean, "
    "authority_mean, purity_mean) and the images (img/NAME.jpg, any folder below DATA)",
    label_rule=f"moral_mean (1 immoral ... 5 moral) below {SMID_UNSAFE_BELOW} is unsafe, above {SMID_SAFE_ABOVE} safe; "
    "the images between are left out as morally ambiguous (the cut-offs of Schramowski et al. 2022, Q16)",
    categories=[
        _m("Care", ["violence"], ["O2"], ["S1"], note="the care/harm foundation: harm done to people or animals"),
        *(_m(f, note=NO_SCHEME + " (a moral foundation, not a content category)") for f in ("Fairness", "Loyalty", "Authority", "Sanctity")),
    ],
)


def _float(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@register(SMID)
def load_smid(root: Path) -> Iterator[BenchItem | BenchIssue]:
    norms = next((p for p in (root / "SMID_norms.csv", root / "smid_norms.csv") if p.is_file()), None)
    if norms is None:
        raise BenchDataError(f"{root}: no SMID_norms.csv in it (the SMID normative ratings from https://osf.io/2rqad/)")
    columns, rows = read_csv_rows(norms)
    name_col = "img_name" if "img_name" in columns else (columns[0] if columns and columns[0] in ("", "Unnamed: 0") else None)
    missing = missing_columns(columns, ("moral_mean",)) + ([] if name_col is not None else ["img_name"])
    if missing:
        yield column_issue(norms, columns, missing)
        return
    images = {p.stem: p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    ambiguous = 0
    for n, row in enumerate(rows):
        name = str(row.get(name_col or "") or "").strip()
        where = f"line {n + 2}" + (f" ({name})" if name else "")
        moral = _float(row.get("moral_mean"))
        if not name or moral is None:
            yield BenchIssue(file=str(norms), where=where, problem="needs an image name and a numeric moral_mean; left out")
            continue
        if SMID_UNSAFE_BELOW <= moral <= SMID_SAFE_ABOVE:
            ambiguous += 1
            continue
        image = images.get(Path(name).stem)
        if image is None:
            yield BenchIssue(file=str(norms), where=where, problem=f"no image file {name}.* under {root}; the row is left out")
            continue
        scores = {FOUNDATIONS[c]: v for c in FOUNDATIONS if (v := _float(row.get(c))) is not None}
        native = max(scores, key=lambda k: scores[k]) if scores else None
        yield BenchItem(id=name, split="all", label="unsafe" if moral < SMID_UNSAFE_BELOW else "safe", category=native,
                        mapped=SMID.mapping(native), image_path=str(image), source_file=str(norms), extra={"moral_mean": moral})
    if ambiguous:
        yield BenchIssue(file=str(norms), problem=f"{ambiguous} images with moral_mean between {SMID_UNSAFE_BELOW} and "
                         f"{SMID_SAFE_ABOVE} are left out as morally ambiguous", kind="note")


# -- SafeEditBench ------------------------------------------------------------------------------

SAFEEDIT_POLICIES = [f"Policy L{i}" for i in range(1, 6)]
SAFEEDITBENCH = Benchmark(
    name="safeeditbench",
    title="SafeEditBench (content safety of edited images)",
    source="https://huggingface.co/datasets/tyodd/SafeEditBench",
    layout="the dataset repository's parquet files (data/test-*.parquet, 601 rows) or a save_to_disk folder; columns image, "
    "image_path, safety_label (class label 0 safe, 1 unsafe), policy_name (class label 0-4: Policy L1..L5), policy (its text)",
    label_rule="safety_label 1 (unsafe) is unsafe, 0 (safe) is safe, each under the row's own written policy",
    categories=[_m(p, note="one of the benchmark's five written policies, not a content category: icm judges with its own "
                   "policy instead of the row's text") for p in SAFEEDIT_POLICIES],
)


def _safeedit_policy(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(SAFEEDIT_POLICIES):
        return SAFEEDIT_POLICIES[value]
    return str(value).strip() or None if value is not None else None


@register(SAFEEDITBENCH)
def load_safeeditbench(root: Path) -> Iterator[BenchItem | BenchIssue]:
    yield from _hf_items(SAFEEDITBENCH, root, label_col="safety_label", category_col="policy_name", category_of=_safeedit_policy)
