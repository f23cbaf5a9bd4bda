"""Import of the published ICM-Instruct data into our records (``icm data import-icm``).

The released layout, one text file per image named ``<image file name>.txt``::

    DIR/mc/<image>.txt         five 4-choice questions as a markdown table
    DIR/qa/<image>.txt         ten yes/no, what and how questions as a markdown table
    DIR/reason/<N>/<image>.txt the MLLM's moderation explanation (N = 1, 2, ...)

The image's category is its name up to ``_<timestamp>`` (``upper_bust_2022..._v2.jpg``
-> ``upper_bust``) and resolves to a product of the policy (``normal`` categories are the
not-sexy ones). Tables are parsed with :func:`icm.data.tables.parse_qa_text`; every row
that gives no Q-A pair, every header-only table and every empty explanation becomes a
:class:`~icm.data.records.Rejected` with its reason, file and line. Explanations get
their verdict and quality findings (refusal, first person, missing or contradicting
verdict, cut off) as ``flags``; with ``filters`` those findings quarantine the image
instead.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from icm.data.quality import check_explanation
from icm.data.records import ExplanationRecord, InstructRecord, QAPair, Rejected
from icm.data.tables import parse_qa_text
from icm.policy import Policy, Product, load_policy

__all__ = ["ImportResult", "ImportStats", "category_of", "import_icm"]

_CATEGORY = re.compile(r"^(.+?)_\d{8,}")


def category_of(image_name: str) -> str:
    """The category of a released image name: the part before ``_<timestamp>``."""
    m = _CATEGORY.match(image_name)
    return m.group(1) if m else image_name.rsplit(".", 1)[0]


def _resolve(policy: Policy, name: str) -> tuple[str, Product] | None:
    cat = category_of(name)
    try:
        return cat, policy.resolve_category(cat)
    except KeyError:
        pass
    parts = name.split("_")  # the longest prefix that names a product
    for i in range(len(parts) - 1, 0, -1):
        prefix = "_".join(parts[:i])
        try:
            return prefix, policy.resolve_category(prefix)
        except KeyError:
            continue
    return None


class ImportStats(BaseModel):
    """Counts of what was read and parsed; shares are in [0, 1]."""

    images: int = 0
    records: int = 0
    files: dict[str, int] = Field(default_factory=dict)
    rows: dict[str, int] = Field(default_factory=dict, description="Table data rows per folder (mc, qa)")
    rows_parsed: dict[str, int] = Field(default_factory=dict)
    header_only_tables: dict[str, int] = Field(default_factory=dict)
    files_without_table: dict[str, int] = Field(default_factory=dict)
    qa_kinds: dict[str, int] = Field(default_factory=dict)
    explanations: int = Field(default=0, description="Non-empty explanation files")
    explanations_parsed: int = 0
    empty_explanations: int = 0
    unknown_categories: int = 0
    verdicts: dict[str, int] = Field(default_factory=dict, description="agree / contradict / none")
    flags: dict[str, int] = Field(default_factory=dict, description="Quality findings of the explanations")
    quarantined: int = Field(default=0, description="Images quarantined by the quality filters asked for")
    failures_by_reason: dict[str, int] = Field(default_factory=dict)

    @property
    def qa_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def qa_rows_parsed(self) -> int:
        return sum(self.rows_parsed.values())

    @property
    def qa_share(self) -> float:
        return self.qa_rows_parsed / self.qa_rows if self.qa_rows else 0.0

    @property
    def explanation_share(self) -> float:
        return self.explanations_parsed / self.explanations if self.explanations else 0.0

    def share(self, folder: str) -> float:
        n = self.rows.get(folder, 0)
        return self.rows_parsed.get(folder, 0) / n if n else 0.0


@dataclass
class ImportResult:
    records: list[InstructRecord] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    stats: ImportStats = field(default_factory=ImportStats)


def _read(path: Path) -> tuple[str, bool]:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), False


def import_icm(
    root: str | Path,
    *,
    policy: str | Policy = "icm-sexy",
    filters: Iterable[str] = (),
) -> ImportResult:
    """Read a released ICM-Instruct folder into records; see the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    pol = policy if isinstance(policy, Policy) else load_policy(policy)
    term = pol.term.id
    wanted_filters = set(filters)

    folders: dict[str, Path] = {}
    for name in ("mc", "qa"):
        if (root / name).is_dir():
            folders[name] = root / name
    reason_dirs = sorted(
        (p for p in (root / "reason").iterdir() if p.is_dir()) if (root / "reason").is_dir() else [],
        key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name),
    )
    if not folders and not reason_dirs:
        raise FileNotFoundError(f"{root} has none of mc/, qa/, reason/N/: not the released ICM-Instruct layout")

    names: set[str] = set()
    files: dict[str, dict[str, Path]] = {}
    for key, folder in [*folders.items(), *((f"reason/{d.name}", d) for d in reason_dirs)]:
        listed = {p.name[: -len(".txt")]: p for p in folder.iterdir() if p.is_file() and p.name.endswith(".txt")}
        files[key] = listed
        names |= set(listed)

    res = ImportResult()
    st = res.stats
    st.images = len(names)
    st.files = {k: len(v) for k, v in files.items()}
    for k in folders:
        st.rows[k] = st.rows_parsed[k] = st.header_only_tables[k] = st.files_without_table[k] = 0
    kinds: Counter[str] = Counter()
    verdicts: Counter[str] = Counter()
    flags: Counter[str] = Counter()

    def reject(name: str, stage: str, reason: str, detail: str, *, item: bool, raw: str | None = None,
               line: int | None = None, product: str | None = None) -> None:
        key = f"{name}:{stage}" + (f":{line}" if line is not None else "")
        res.rejected.append(Rejected(key=key, id=name, image=name, product=product, stage=stage, reason=reason,
                                     detail=detail, item=item, raw=raw, line=line))

    for name in sorted(names):
        hit = _resolve(pol, name)
        cat, product = (hit if hit else (category_of(name), None))
        pid = product.id if product else None
        qa: list[QAPair] = []
        meta: dict[str, object] = {}
        for key in folders:
            path = files[key].get(name)
            if path is None:
                continue
            text, clean = _read(path)
            rel = f"{key}/{path.name}"
            parsed = parse_qa_text(text, default_kind="choice" if key == "mc" else None)
            st.rows[key] += parsed.rows
            st.rows_parsed[key] += len(parsed.pairs)
            for p in parsed.pairs:
                kinds[p.kind] += 1
            qa.extend(parsed.pairs)
            meta[f"{key}_rows"] = parsed.rows
            if not clean:
                meta[f"{key}_decoding"] = "invalid UTF-8 replaced"
            for prob in parsed.problems:
                reject(name, key, prob.reason, f"{rel}:{prob.line}: {prob.detail}", item=False, raw=prob.raw,
                       line=prob.line, product=pid)
            if parsed.tables == 0:
                st.files_without_table[key] += 1
                reason = "empty" if not text.strip() else "no_table"
                reject(name, key, reason, f"{rel}: {'the file is empty' if reason == 'empty' else 'no markdown table in the file'}",
                       item=False, raw=text[:2000] or None, product=pid)
            elif parsed.header_only and not parsed.rows:
                st.header_only_tables[key] += 1
                reject(name, key, "empty_table", f"{rel}: the table has a header but no rows", item=False,
                       raw=text[:2000], product=pid)

        explanations: list[ExplanationRecord] = []
        first_findings: list[str] = []
        for d in reason_dirs:
            key = f"reason/{d.name}"
            path = files[key].get(name)
            if path is None:
                continue
            raw, _ = _read(path)
            text = raw.replace("\ufeff", "").strip()
            if not text:
                st.empty_explanations += 1
                reject(name, key, "empty", f"{key}/{path.name}: the file is empty (no explanation)", item=False, product=pid)
                continue
            st.explanations += 1
            verdict, findings = check_explanation(text, term, product.positive if product else None)
            st.explanations_parsed += 1
            for f in findings:
                flags[f.reason] += 1
            if not explanations:
                first_findings = [f.reason for f in findings]
                if product is not None:
                    said = verdict.label
                    verdicts["none" if said is None else ("agree" if said == product.positive else "contradict")] += 1
            explanations.append(ExplanationRecord(
                text=text, verdict=verdict.label, evidence=verdict.evidence,
                expected=product.positive if product else None, flags=[f.reason for f in findings],
            ))

        if product is None:
            st.unknown_categories += 1
            reject(name, "category", "unknown_category",
                   f"category {cat!r} of {name!r} resolves to no product of policy {pol.name!r}", item=True)
            continue
        bad = [f for f in first_findings if f in wanted_filters]
        if bad and explanations:
            st.quarantined += 1
            reject(name, "reason", bad[0], f"quality filters: {', '.join(bad)}", item=True, raw=explanations[0].text,
                   product=pid)
            continue
        if not qa and not explanations:
            continue  # nothing usable; the reasons are listed already
        res.records.append(InstructRecord(
            id=name, image=name, image_sha256=None, policy=pol.name, term=term, product=product.id, category=cat,
            positive=product.positive, explanation=explanations[0] if explanations else None,
            other_explanations=explanations[1:], qa=qa, source="icm-instruct", meta=meta,
        ))
    st.records = len(res.records)
    st.qa_kinds = dict(kinds.most_common())
    st.verdicts = dict(verdicts)
    st.flags = dict(flags.most_common())
    st.failures_by_reason = dict(Counter(r.reason for r in res.rejected).most_common())
    return res
