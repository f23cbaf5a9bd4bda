"""Moderation Q-A (MQA) accuracy: multiple-choice and yes/no answers, apart and together.

The paper's protocol compares the **first letter** of the model's answer with the first
letter of the true answer: ``A``-``D`` for multiple-choice questions, ``Y``/``N`` for yes/no
ones. An answer that starts with no valid letter is wrong; so is every answer to a
question whose *truth* starts with no valid letter (the published truth files hold a few
such lines, e.g. ``.`` or ``NO.`` for a 4-choice question): they stay in the denominator,
as in the paper, and are counted apart so a reader can see them.

Two inputs:

* the paper's **two-line format**: a truth file and a prediction file, each two lines per
  question (the image path, then the answer), aligned by position; the paper's layout
  (``mc_gt.txt``, ``openqa_gt.txt``, ``eval_mc_data/<model>.txt``,
  ``eval_qa_data/<model>.txt``) is found from its folder;
* **our records**: JSONL, one :class:`QARecord` per question (``icm eval run`` writes
  them).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from icm.evaluation.labels import image_key
from icm.evaluation.stats import DEFAULT_CONFIDENCE, wilson
from icm.fileio import read_jsonl, read_text

QAKind = Literal["mc", "yes_no"]
KINDS: tuple[QAKind, ...] = ("mc", "yes_no")
MC_LETTERS = frozenset("ABCD")
YES_NO_LETTERS = frozenset("YN")


class QARecord(BaseModel):
    """One moderation question about one image, its true answer and the model's."""

    image: str
    kind: QAKind
    question: str | None = None
    options: list[str] = Field(default_factory=list)
    truth: str = Field(description="The true answer: an option letter, or Yes/No")
    answer: str | None = Field(default=None, description="The model's answer text; None when it gave none")
    answer_source: str | None = Field(default=None, description="generate, choose or score_yes_no")
    category: str | None = None
    error: str | None = None


class KindScore(BaseModel):
    total: int = 0
    correct: int = 0
    accuracy: float | None = None
    invalid_answers: int = Field(default=0, description="Answers that start with no valid letter (counted wrong)")
    missing_answers: int = Field(default=0, description="Questions the model gave no answer to (counted wrong)")
    invalid_truth: int = Field(default=0, description="Questions whose truth starts with no valid letter (counted wrong)")
    accuracy_valid_truth: float | None = Field(default=None, description="Accuracy over questions with a valid truth")
    accuracy_ci: tuple[float, float] | None = Field(default=None, description="Wilson interval of the accuracy")
    answer_letters: dict[str, int] = Field(default_factory=dict)
    truth_letters: dict[str, int] = Field(default_factory=dict)


class MQAReport(BaseModel):
    name: str
    source: str
    format: Literal["paper-two-line", "icm-jsonl"]
    mc: KindScore
    yes_no: KindScore
    all: KindScore
    misaligned: int = Field(default=0, description="Questions whose image differs between truth and prediction files")
    per_category: dict[str, KindScore] = Field(default_factory=dict)
    confidence: float = Field(default=DEFAULT_CONFIDENCE, description="Confidence level of the accuracy intervals")
    notes: list[str] = Field(default_factory=list)

    def with_intervals(self, confidence: float = DEFAULT_CONFIDENCE) -> MQAReport:
        """Set the Wilson interval of every accuracy (correct / total) at ``confidence``."""
        self.confidence = confidence
        for k in (self.mc, self.yes_no, self.all, *self.per_category.values()):
            k.accuracy_ci = wilson(k.correct, k.total, confidence)
        return self


def first_letter(text: str | None) -> str | None:
    """The answer's first character, upper-cased (leading white space skipped), or None."""
    if text is None:
        return None
    t = text.lstrip()
    return t[0].upper() if t else None


def valid_letters(kind: QAKind, n_options: int = 0) -> frozenset[str]:
    if kind == "yes_no":
        return YES_NO_LETTERS
    if n_options > 4:
        return frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_options])
    return MC_LETTERS


def is_correct(kind: QAKind, answer: str | None, truth: str, n_options: int = 0) -> bool:
    """The paper's rule: the first letters agree and are a valid answer letter."""
    a, t = first_letter(answer), first_letter(truth)
    letters = valid_letters(kind, n_options)
    return a is not None and a in letters and a == t


def _score(records: Iterable[QARecord]) -> KindScore:
    k = KindScore()
    ans_letters: Counter[str] = Counter()
    truth_letters: Counter[str] = Counter()
    valid_truth_total = valid_truth_correct = 0
    for r in records:
        letters = valid_letters(r.kind, len(r.options))
        k.total += 1
        a, t = first_letter(r.answer), first_letter(r.truth)
        ans_letters[a or "(none)"] += 1
        truth_letters[t or "(none)"] += 1
        ok = is_correct(r.kind, r.answer, r.truth, len(r.options))
        k.correct += ok
        if r.answer is None or not r.answer.strip():
            k.missing_answers += 1
        elif a not in letters:
            k.invalid_answers += 1
        if t not in letters:
            k.invalid_truth += 1
        else:
            valid_truth_total += 1
            valid_truth_correct += ok
    k.accuracy = k.correct / k.total if k.total else None
    k.accuracy_valid_truth = valid_truth_correct / valid_truth_total if valid_truth_total else None
    k.answer_letters = dict(ans_letters.most_common())
    k.truth_letters = dict(truth_letters.most_common())
    return k


def score_records(records: list[QARecord], *, name: str, source: str, fmt: Literal["paper-two-line", "icm-jsonl"], misaligned: int = 0) -> MQAReport:
    """Accuracy per kind and overall (and per image category) of answered questions."""
    if not records:
        raise ValueError(f"{source}: no questions to score")
    by_cat: dict[str, list[QARecord]] = defaultdict(list)
    for r in records:
        by_cat[r.category or "(none)"].append(r)
    notes = []
    mc = _score(r for r in records if r.kind == "mc")
    yn = _score(r for r in records if r.kind == "yes_no")
    al = _score(records)
    for kind, ks in (("multiple-choice", mc), ("yes/no", yn)):
        if ks.invalid_truth:
            notes.append(
                f"{ks.invalid_truth} {kind} question(s) have a truth with no valid answer letter; they count as wrong "
                f"(as in the paper); accuracy without them: {ks.accuracy_valid_truth:.4f}" if ks.accuracy_valid_truth is not None else ""
            )
        if ks.invalid_answers:
            notes.append(f"{ks.invalid_answers} {kind} answer(s) start with no valid letter (counted wrong)")
        if ks.missing_answers:
            notes.append(f"{ks.missing_answers} {kind} question(s) got no answer (counted wrong)")
    if misaligned:
        notes.append(f"{misaligned} question(s) name a different image in the truth and prediction files: check their order")
    return MQAReport(
        name=name, source=source, format=fmt, mc=mc, yes_no=yn, all=al, misaligned=misaligned,
        per_category={c: _score(rs) for c, rs in sorted(by_cat.items())} if len(by_cat) > 1 else {},
        notes=[n for n in notes if n],
    ).with_intervals()


# -- the paper's two-line format ----------------------------------------------------------------


def read_two_line(path: str | Path) -> list[tuple[str, str]]:
    """``(image, text)`` pairs of a two-lines-per-entry file (image line, then text line)."""
    p = Path(path)
    lines = read_text(p).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 2:
        raise ValueError(f"{p}: {len(lines)} lines, not an even number: expected an image line then a text line per entry")
    return [(lines[i].strip(), lines[i + 1]) for i in range(0, len(lines), 2)]


def _category_of(image: str) -> str | None:
    parts = image.replace("\\", "/").split("/")
    if len(parts) >= 2 and parts[-2]:
        return parts[-2]
    return None


def pair_two_line(truth_path: str | Path, pred_path: str | Path, kind: QAKind) -> tuple[list[QARecord], int]:
    """Records from a truth file and a prediction file in the paper's format, and the
    number of positions whose image lines differ."""
    truth = read_two_line(truth_path)
    pred = read_two_line(pred_path)
    if len(pred) != len(truth):
        raise ValueError(f"{pred_path} has {len(pred)} answers but {truth_path} has {len(truth)} questions")
    misaligned = sum(1 for (ti, _), (pi, _) in zip(truth, pred, strict=True) if image_key(ti) != image_key(pi))
    records = [
        QARecord(image=ti, kind=kind, truth=tt, answer=pt, category=_category_of(ti))
        for (ti, tt), (_, pt) in zip(truth, pred, strict=True)
    ]
    return records, misaligned


def evaluate_two_line(
    *, mc: tuple[str | Path, str | Path] | None = None, yes_no: tuple[str | Path, str | Path] | None = None, name: str | None = None
) -> MQAReport:
    """MQA from (truth, prediction) file pairs in the paper's two-line format."""
    if mc is None and yes_no is None:
        raise ValueError("give multiple-choice and/or yes/no (truth, prediction) files")
    records: list[QARecord] = []
    misaligned = 0
    sources = []
    for kind, pair in (("mc", mc), ("yes_no", yes_no)):
        if pair is None:
            continue
        recs, mis = pair_two_line(pair[0], pair[1], kind)  # type: ignore[arg-type]
        records += recs
        misaligned += mis
        sources.append(str(pair[1]))
    nm = name or Path(sources[0]).stem
    return score_records(records, name=nm, source=", ".join(sources), fmt="paper-two-line", misaligned=misaligned)


def paper_layout_models(folder: str | Path) -> dict[str, tuple[tuple[Path, Path] | None, tuple[Path, Path] | None]]:
    """Models found in the paper's MQA folder layout: name -> (mc pair, yes/no pair)."""
    d = Path(folder)
    mc_gt, qa_gt = d / "mc_gt.txt", d / "openqa_gt.txt"
    mc_dir, qa_dir = d / "eval_mc_data", d / "eval_qa_data"
    names = sorted({p.stem for sub in (mc_dir, qa_dir) if sub.is_dir() for p in sub.glob("*.txt")})
    out = {}
    for n in names:
        mcp = (mc_gt, mc_dir / f"{n}.txt") if mc_gt.exists() and (mc_dir / f"{n}.txt").exists() else None
        qap = (qa_gt, qa_dir / f"{n}.txt") if qa_gt.exists() and (qa_dir / f"{n}.txt").exists() else None
        if mcp or qap:
            out[n] = (mcp, qap)
    return out


def evaluate_paper_folder(folder: str | Path, model: str | None = None) -> list[MQAReport]:
    """One report per model found in the paper's layout (or only ``model``)."""
    models = paper_layout_models(folder)
    if not models:
        raise ValueError(
            f"{folder}: not the paper's MQA layout (mc_gt.txt / openqa_gt.txt with eval_mc_data/ and eval_qa_data/)"
        )
    if model is not None:
        if model not in models:
            raise ValueError(f"{folder}: no answers of model {model!r} (found: {', '.join(models)})")
        models = {model: models[model]}
    return [evaluate_two_line(mc=mcp, yes_no=qap, name=n) for n, (mcp, qap) in models.items()]


# -- our records ---------------------------------------------------------------------------


def read_qa_records(path: str | Path) -> tuple[list[QARecord], int]:
    """QA records of a JSONL file and the number of unreadable lines."""
    rows = read_jsonl(path, QARecord, skip_bad=True)
    return list(rows), len(rows.errors)


def evaluate_records_file(path: str | Path, name: str | None = None) -> MQAReport:
    records, bad = read_qa_records(path)
    if not records:
        raise ValueError(f"{path}: no Q-A record (JSONL lines with image, kind, truth, answer)")
    rep = score_records(records, name=name or Path(path).stem, source=str(path), fmt="icm-jsonl")
    if bad:
        rep.notes.insert(0, f"{bad} unreadable line(s) skipped")
    return rep
