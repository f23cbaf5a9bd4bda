"""Moderation explanation quality (MEQ): inputs, judgement files and the report.

Three ways to an MEQ report, one model (:class:`MEQReport`):

* **existing judgements** (:func:`read_judgements_dir`): the paper's files, one per image,
  each holding the human explanation, the model's, and the judge's reply (a markdown
  table); the paper's figure is the mean per criterion over all files, a missing score
  counting 0 (:attr:`MEQReport.means`). We also give the mean over the files that do have
  the score (:attr:`MEQReport.means_scored`) and count what is missing.
* **a judge** (:mod:`icm.evaluation.meq_judge`) over reference and candidate explanations;
* **offline** (:mod:`icm.evaluation.meq_offline`), with no network at all.

Explanations are read from the paper's two-line files (image, then text) or from our
moderation records (``path`` and ``explanation``), and paired by image file name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from icm.evaluation.labels import image_key, image_stem
from icm.evaluation.meq_judge import CRITERIA, ExplanationPair, JudgeResult, parse_judgement
from icm.evaluation.metric_path import Keys
from icm.evaluation.mqa import read_two_line
from icm.fileio import read_jsonl, read_text

MEQMode = Literal["judgements", "judge", "offline"]

_SECTION_RE = re.compile(r"(?im)^\s*(human content|algorithm content|(?:[\w\-. ]{0,30})evaluation)\s*:\s*$")


class OfflineScore(BaseModel):
    embedding: float | None = Field(default=None, description="Cosine similarity of sentence embeddings")
    lexical: float = Field(description="ROUGE-L F1 over lower-cased word tokens")
    score: float = Field(description="The offline score, 0-100")


class MEQItem(BaseModel):
    id: str
    scores: dict[str, float | None] = Field(default_factory=dict, description="Judge scores per criterion")
    error: str | None = None
    cached: bool = False
    offline: OfflineScore | None = None


class Failure(BaseModel):
    id: str
    error: str


class Correlation(BaseModel):
    measure: str = Field(description="embedding, lexical or offline (the combined score)")
    criterion: str
    spearman: float | None
    p_value: float | None
    n: int


class OfflineSummary(BaseModel):
    metric: str
    model: str | None
    weights: dict[str, float]
    mean: float
    mean_embedding: float | None
    mean_lexical: float


class Explanations(BaseModel):
    """Worst-scored explanations, for the report."""

    id: str
    reference: str
    candidate: str
    scores: dict[str, float | None]
    offline: float | None = None


class MEQReport(BaseModel):
    name: str
    source: str
    mode: MEQMode
    judge_model: str | None = None
    n_items: int
    n_complete: int = Field(description="Items with all four scores")
    n_failed: int = Field(description="Items with no score at all (request failed or reply unreadable)")
    n_partial: int = Field(description="Items with some but not all four scores")
    missing: dict[str, int] = Field(default_factory=dict, description="Items without a score, per criterion")
    means: Annotated[dict[str, float | None], Keys(CRITERIA)] = Field(
        default_factory=dict, description="Mean per criterion over all items, a missing score counted 0 (the paper's)")
    means_scored: dict[str, float | None] = Field(default_factory=dict, description="Mean per criterion over the items that have it")
    means_ci: dict[str, tuple[float, float] | None] = Field(
        default_factory=dict, description="Interval of each of 'means' (normal approximation: mean +- z * sd / sqrt(n))")
    failed_ci: tuple[float, float] | None = Field(default=None, description="Wilson interval of the share of items with no score")
    confidence: float = 0.95
    failures: list[Failure] = Field(default_factory=list)
    offline: OfflineSummary | None = None
    correlations: list[Correlation] = Field(default_factory=list)
    unmatched_reference: int = 0
    unmatched_candidate: int = 0
    items: list[MEQItem] = Field(default_factory=list)
    worst: list[Explanations] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    def with_intervals(self, confidence: float = 0.95) -> MEQReport:
        """Intervals at ``confidence``: of each mean score (missing counted 0, as in ``means``) and of the failure share."""
        from statistics import NormalDist

        from icm.evaluation.stats import wilson

        self.confidence = confidence
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        self.means_ci = {}
        for c, m in self.means.items():
            vals = [it.scores.get(c) or 0.0 for it in self.items]
            n = len(vals)
            if m is None or n < 2:
                self.means_ci[c] = None
                continue
            sd = (sum((v - m) ** 2 for v in vals) / (n - 1)) ** 0.5
            half = z * sd / n**0.5
            self.means_ci[c] = (max(0.0, m - half), min(100.0, m + half))
        self.failed_ci = wilson(self.n_failed, self.n_items, confidence) if self.n_items and self.means else None
        return self


# -- reading ----------------------------------------------------------------------------------


class Judgement(BaseModel):
    """One judgement file of the paper."""

    id: str
    image: str | None
    reference: str | None
    candidate: str | None
    reply: str
    scores: dict[str, float | None]
    error: str | None = None


def split_judgement(text: str) -> tuple[str | None, str | None, str | None, str]:
    """(image line, human content, algorithm content, judge reply) of a judgement file."""
    lines = text.splitlines()
    image = lines[0].strip() if lines and lines[0].strip() and not _SECTION_RE.match(lines[0]) else None
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in lines[1 if image else 0:]:
        m = _SECTION_RE.match(line)
        if m:
            title = m.group(1).strip().lower()
            current = "human" if title.startswith("human") else "algorithm" if title.startswith("algorithm") else "reply"
            sections[current] = []
            continue
        if current is not None:
            sections[current].append(line)
    if "reply" not in sections:  # no headers: the whole file is the reply
        return image, None, None, text

    def get(k: str) -> str | None:
        return "\n".join(sections[k]).strip() if k in sections else None

    return image, get("human"), get("algorithm"), get("reply") or ""


def read_judgement_file(path: str | Path) -> Judgement:
    p = Path(path)
    text = p.read_text(encoding="utf-8", errors="replace")
    image, human, algo, reply = split_judgement(text)
    parsed = parse_judgement(reply)
    return Judgement(id=p.stem, image=image, reference=human, candidate=algo, reply=reply, scores=parsed.scores, error=parsed.error)


def read_judgements_dir(folder: str | Path) -> list[Judgement]:
    d = Path(folder)
    if not d.is_dir():
        raise ValueError(f"{d}: not a folder of judgement files")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".md") and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{d}: no judgement files (*.txt)")
    return [read_judgement_file(f) for f in files]


def read_explanations(path: str | Path) -> dict[str, str]:
    """Explanations by image stem: the paper's two-line file, or JSONL records with
    ``path`` (or ``image``) and ``explanation`` (or ``reference``/``text``)."""
    p = Path(path)
    text = read_text(p)
    out: dict[str, str] = {}
    if text.lstrip()[:1] == "{":
        for obj in read_jsonl(p, text=text):
            img = obj.get("path") or obj.get("image") or obj.get("image_name")
            text = obj.get("explanation") or obj.get("reference") or obj.get("text")
            if img and isinstance(text, str) and text.strip():
                out[image_stem(str(img))] = text.strip()
        return out
    for img, text in read_two_line(p):
        if text.strip():
            out[image_stem(img)] = text.strip()
    return out


def pair_explanations(reference: dict[str, str], candidate: dict[str, str]) -> tuple[list[ExplanationPair], int, int]:
    """Pairs by image stem, and how many references / candidates found no partner."""
    ids = [k for k in reference if k in candidate]
    pairs = [ExplanationPair(id=k, reference=reference[k], candidate=candidate[k]) for k in ids]
    return pairs, len(reference) - len(ids), len(candidate) - len(ids)


def judgement_pairs(judgements: list[Judgement]) -> list[ExplanationPair]:
    return [ExplanationPair(id=j.id, reference=j.reference, candidate=j.candidate) for j in judgements if j.reference and j.candidate]


# -- the report ---------------------------------------------------------------------------------


def aggregate(
    items: list[MEQItem],
    *,
    name: str,
    source: str,
    mode: MEQMode,
    judge_model: str | None = None,
    judged: bool = True,
) -> MEQReport:
    """Means (the paper's, missing counted 0, and over scored items), failures and counts."""
    n = len(items)
    if not n:
        raise ValueError(f"{source}: no explanation to score")
    rep = MEQReport(name=name, source=source, mode=mode, judge_model=judge_model, n_items=n, n_complete=0, n_failed=0, n_partial=0, items=items)
    if not judged:
        return rep
    for c in CRITERIA:
        vals = [it.scores.get(c) for it in items]
        have = [v for v in vals if v is not None]
        rep.missing[c] = n - len(have)
        rep.means[c] = sum(have) / n
        rep.means_scored[c] = sum(have) / len(have) if have else None
    for it in items:
        k = sum(it.scores.get(c) is not None for c in CRITERIA)
        if k == len(CRITERIA):
            rep.n_complete += 1
        elif k == 0:
            rep.n_failed += 1
            rep.failures.append(Failure(id=it.id, error=it.error or "no score"))
        else:
            rep.n_partial += 1
            rep.failures.append(Failure(id=it.id, error=it.error or "some scores missing"))
    if rep.n_failed or rep.n_partial:
        rep.notes.append(
            f"{rep.n_failed} item(s) got no score and {rep.n_partial} only some: 'means' counts a missing score as 0 "
            "(the paper's protocol), 'means_scored' leaves them out"
        )
    return rep.with_intervals()


def from_judgements(judgements: list[Judgement], *, name: str, source: str) -> MEQReport:
    items = [MEQItem(id=j.id, scores=j.scores, error=j.error) for j in judgements]
    return aggregate(items, name=name, source=source, mode="judgements")


def from_judge_results(results: list[JudgeResult], *, name: str, source: str, judge_model: str) -> MEQReport:
    items = [MEQItem(id=r.id, scores=r.scores, error=r.error, cached=r.cached) for r in results]
    rep = aggregate(items, name=name, source=source, mode="judge", judge_model=judge_model)
    cached = sum(r.cached for r in results)
    if cached:
        rep.notes.append(f"{cached} of {len(results)} judgement(s) came from the cache")
    return rep


def attach_worst(rep: MEQReport, pairs: list[ExplanationPair], k: int = 5) -> None:
    """Keep the ``k`` lowest-scored explanations (judge accuracy, else offline score) for the report."""
    by_id = {p.id: p for p in pairs}

    def key(it: MEQItem) -> float:
        a = it.scores.get("accuracy")
        if a is not None:
            return a
        return it.offline.score if it.offline else 1e9

    ranked = sorted((it for it in rep.items if it.id in by_id), key=key)[:k]
    rep.worst = [
        Explanations(id=it.id, reference=by_id[it.id].reference, candidate=by_id[it.id].candidate, scores=it.scores,
                     offline=it.offline.score if it.offline else None)
        for it in ranked
    ]


def stem_of(name: str) -> str:
    return image_stem(image_key(name))
