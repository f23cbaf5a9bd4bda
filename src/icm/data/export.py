"""Export records to the formats trainers read (``icm data export``).

* ``llava``: LLaVA's instruction JSON, a list of ``{"id", "image", "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}``
  (``llava_train.json`` / ``llava_validation.json``; images relative to ``--image-root``,
  LLaVA's ``--image_folder``);
* ``sharegpt``: LLaMA-Factory's multimodal ShareGPT, ``{"messages": [{"role", "content"}],
  "images": [path]}`` with one ``<image>`` per image, and the ``dataset_info.json`` that
  registers ``icm_train`` / ``icm_validation`` (point ``dataset_dir`` at the folder);
* ``qwen-vl``: Qwen-VL's fine-tuning JSON, ``{"id", "conversations": [{"from": "user",
  "value": "Picture 1: <img>path</img>\\n..."}, {"from": "assistant", ...}]}``;
* ``hf``: a Hugging Face ``DatasetDict`` saved with ``save_to_disk``: ``messages`` in
  TRL's conversational vision layout (content parts ``{"type": "image"|"text", "text",
  "index"}``), ``images`` (paths, or the pixels with ``embed_images``), ``id`` and the
  record's labels (``term``, ``product``, ``positive``, ``policy``, ``source``);
* ``parquet``: the same tables as ``train.parquet`` / ``validation.parquet``.

Each image gives one multi-turn conversation (``conversation="multi"``: the term
question, the explanation, the descriptions and the Q-A pairs) or one sample per turn
(``"single"``). Instructions are drawn from :mod:`icm.data.instructions`, picked
deterministically per record and turn. The train/validation split is deterministic and
by image (content hash, else name): an image never lands in both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from icm.data.instructions import InstructionPools
from icm.data.records import InstructRecord
from icm.fileio import atomic_write

__all__ = [
    "CONVERSATIONS",
    "DEFAULT_EXCLUDE_FLAGS",
    "EXPORT_FORMATS",
    "TASKS",
    "ExportResult",
    "TrainingSample",
    "build_samples",
    "export_records",
    "split_of",
]

Format = Literal["llava", "sharegpt", "qwen-vl", "hf", "parquet"]
EXPORT_FORMATS: tuple[Format, ...] = ("llava", "sharegpt", "qwen-vl", "hf", "parquet")
Conversation = Literal["multi", "single"]
CONVERSATIONS: tuple[Conversation, ...] = ("multi", "single")
TASKS = ("term", "explain", "explicit", "implicit", "qa")
DEFAULT_EXCLUDE_FLAGS = ("empty", "refusal", "first_person", "contradiction", "mixed_verdict", "truncated", "too_short")
SPLITS = ("train", "validation")


def split_of(record: InstructRecord, val_ratio: float, seed: int = 0) -> str:
    """``"train"`` or ``"validation"``, from a hash of the image (same image, same split)."""
    if val_ratio <= 0:
        return "train"
    h = hashlib.sha256(f"{seed}:{record.split_key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "validation" if u < val_ratio else "train"


@dataclass
class TrainingSample:
    """One training sample: an image and user/assistant turns (the first user turn is
    about the image; format writers add the image token)."""

    id: str
    image: str
    turns: list[tuple[str, str]]
    record: InstructRecord
    split: str


def _turns(record: InstructRecord, pools: InstructionPools, tasks: Sequence[str], exclude_flags: set[str],
           question: str) -> list[tuple[str, str]]:
    term = record.term
    turns: list[tuple[str, str]] = []

    def ask(pool: str, key: str, letters: Sequence[str] = "ABCD") -> str:
        spoken = ", ".join(letters[:-1]) + f" or {letters[-1]}" if len(letters) > 1 else "".join(letters)
        return pools.pick(pool, f"{record.id}:{key}", term=term, question=question, letters=spoken)

    for task in tasks:
        if task == "term":
            fmt = ask("yes_no", "term-format")
            turns.append((f"{ask('term', 'term')}\n{fmt}".strip(), "Yes" if record.positive else "No"))
        elif task == "explain":
            ex = record.explanation
            if ex is not None and ex.text.strip() and not (set(ex.flags) & exclude_flags):
                turns.append((ask("explain", "explain"), ex.text.strip()))
        elif task in ("explicit", "implicit"):
            d = getattr(record, task)
            if d is not None and d.text.strip():
                turns.append((ask(task, task), d.text.strip()))
        elif task == "qa":
            for i, qa in enumerate(record.qa):
                if qa.kind == "yes_no":
                    turns.append((qa.prompt(ask("yes_no", f"qa{i}")), qa.answer))
                elif qa.kind == "choice":
                    turns.append((qa.prompt(ask("choice", f"qa{i}", qa.letters)), qa.answer))
                else:
                    turns.append((qa.prompt(ask("short", f"qa{i}")), qa.answer))
        else:
            raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return turns


def _image_path(record: InstructRecord, image_root: str | None) -> str:
    if not image_root:
        return record.image
    p = Path(record.image)
    if not p.is_absolute():
        return record.image
    try:
        return os.path.relpath(p, image_root)
    except ValueError:  # another drive on Windows
        return record.image


def build_samples(
    records: Iterable[InstructRecord],
    *,
    pools: InstructionPools | None = None,
    tasks: Sequence[str] = TASKS,
    conversation: Conversation = "multi",
    val_ratio: float = 0.05,
    seed: int = 0,
    image_root: str | None = None,
    exclude_flags: Iterable[str] = DEFAULT_EXCLUDE_FLAGS,
    questions: dict[str, str] | None = None,
) -> list[TrainingSample]:
    """Training samples from records, in record order, each with its split."""
    if conversation not in CONVERSATIONS:
        raise ValueError("conversation must be 'multi' or 'single'")
    pools = pools or InstructionPools(seed=seed)
    excl = set(exclude_flags)
    records = list(records)
    questions = dict(questions or {})
    for rec in records:
        if rec.term not in questions:
            questions[rec.term] = _policy_question(rec.policy, rec.term)
    out: list[TrainingSample] = []
    for rec in records:
        question = questions[rec.term]
        turns = _turns(rec, pools, tasks, excl, question)
        if not turns:
            continue
        split = split_of(rec, val_ratio, seed)
        image = _image_path(rec, image_root)
        if conversation == "multi":
            out.append(TrainingSample(rec.id, image, turns, rec, split))
        else:
            out.extend(TrainingSample(f"{rec.id}-{i}", image, [t], rec, split) for i, t in enumerate(turns))
    return out


def _policy_question(policy: str, term: str) -> str:
    """The term's yes/no question from the record's (built-in) policy, else a plain one."""
    from icm.policy import PolicyError, builtin_policy_names, load_policy

    if policy in builtin_policy_names():
        try:
            p = load_policy(policy)
            if p.term.id == term:
                return p.term.question
        except PolicyError:
            pass
    return f"Is the image {term.replace('_', ' ').replace('-', ' ')}?"


# --------------------------------------------------------------------------- formats


def to_llava(s: TrainingSample) -> dict[str, Any]:
    conv = []
    for i, (user, assistant) in enumerate(s.turns):
        conv.append({"from": "human", "value": f"<image>\n{user}" if i == 0 else user})
        conv.append({"from": "gpt", "value": assistant})
    return {"id": s.id, "image": s.image, "conversations": conv}


def to_sharegpt(s: TrainingSample) -> dict[str, Any]:
    msgs = []
    for i, (user, assistant) in enumerate(s.turns):
        msgs.append({"role": "user", "content": f"<image>{user}" if i == 0 else user})
        msgs.append({"role": "assistant", "content": assistant})
    return {"messages": msgs, "images": [s.image]}


def to_qwen_vl(s: TrainingSample) -> dict[str, Any]:
    conv = []
    for i, (user, assistant) in enumerate(s.turns):
        conv.append({"from": "user", "value": f"Picture 1: <img>{s.image}</img>\n{user}" if i == 0 else user})
        conv.append({"from": "assistant", "value": assistant})
    return {"id": s.id, "conversations": conv}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "index": None}


def to_hf_row(s: TrainingSample) -> dict[str, Any]:
    """TRL's conversational vision layout (as in ``HuggingFaceH4/llava-instruct-mix-vsft``):
    ``messages`` whose ``content`` is a list of typed parts, the image part pointing at
    ``images[index]``."""
    msgs = []
    for i, (user, assistant) in enumerate(s.turns):
        parts = [{"type": "image", "text": None, "index": 0}, _text_part(user)] if i == 0 else [_text_part(user)]
        msgs.append({"role": "user", "content": parts})
        msgs.append({"role": "assistant", "content": [_text_part(assistant)]})
    r = s.record
    return {
        "id": s.id, "images": [s.image], "messages": msgs, "term": r.term, "product": r.product,
        "positive": r.positive, "policy": r.policy, "source": r.source,
    }


def sharegpt_dataset_info(files: dict[str, str], prefix: str = "icm") -> dict[str, Any]:
    """LLaMA-Factory's ``dataset_info.json`` entries for the ShareGPT files."""
    return {
        f"{prefix}_{split}": {
            "file_name": name,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
        for split, name in files.items()
    }


@dataclass
class ExportResult:
    format: str
    out: str
    files: list[str] = field(default_factory=list)
    samples: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    turns: int = 0
    records: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, ensure_ascii=False, indent=1)
        fh.write("\n")


def _need_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the hf and parquet exports need the `datasets` package: pip install 'icm-assistant[train]'"
        ) from exc
    return datasets


def export_records(
    records: Sequence[InstructRecord],
    fmt: Format,
    out: str | Path,
    *,
    pools: InstructionPools | None = None,
    tasks: Sequence[str] = TASKS,
    conversation: Conversation = "multi",
    val_ratio: float = 0.05,
    seed: int = 0,
    image_root: str | None = None,
    exclude_flags: Iterable[str] = DEFAULT_EXCLUDE_FLAGS,
    embed_images: bool = False,
    questions: dict[str, str] | None = None,
) -> ExportResult:
    """Write ``records`` as ``fmt`` into the folder ``out``; see the module docstring."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(EXPORT_FORMATS)})")
    if not 0 <= val_ratio < 1:
        raise ValueError("val_ratio must be in [0, 1)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = build_samples(
        records, pools=pools, tasks=tasks, conversation=conversation, val_ratio=val_ratio, seed=seed,
        image_root=image_root, exclude_flags=exclude_flags, questions=questions,
    )
    by_split: dict[str, list[TrainingSample]] = {s: [] for s in SPLITS}
    for s in samples:
        by_split[s.split].append(s)
    splits = [s for s in SPLITS if by_split[s]]
    res = ExportResult(format=fmt, out=str(out), records=len(records))
    res.samples = {s: len(by_split[s]) for s in splits}
    res.images = {s: len({x.record.split_key for x in by_split[s]}) for s in splits}
    res.turns = sum(len(s.turns) for s in samples)

    if fmt in ("llava", "sharegpt", "qwen-vl"):
        writer = {"llava": to_llava, "sharegpt": to_sharegpt, "qwen-vl": to_qwen_vl}[fmt]
        prefix = {"llava": "llava", "sharegpt": "icm", "qwen-vl": "qwen_vl"}[fmt]
        names = {}
        for split in splits:
            name = f"{prefix}_{split}.json"
            _write_json(out / name, [writer(s) for s in by_split[split]])
            names[split] = name
            res.files.append(str(out / name))
        if fmt == "sharegpt":
            info_path = out / "dataset_info.json"
            info: dict[str, Any] = {}
            if info_path.exists():  # keep other datasets registered there
                try:
                    info = json.loads(info_path.read_text(encoding="utf-8"))
                except ValueError:
                    info = {}
            info.update(sharegpt_dataset_info(names))
            _write_json(info_path, info)
            res.files.append(str(info_path))
        return res

    datasets = _need_datasets()
    features = datasets.Features({
        "id": datasets.Value("string"),
        "images": datasets.Sequence(datasets.Image() if embed_images else datasets.Value("string")),
        "messages": [{
            "role": datasets.Value("string"),
            "content": [{"type": datasets.Value("string"), "text": datasets.Value("string"), "index": datasets.Value("int64")}],
        }],
        "term": datasets.Value("string"),
        "product": datasets.Value("string"),
        "positive": datasets.Value("bool"),
        "policy": datasets.Value("string"),
        "source": datasets.Value("string"),
    })
    # No progress-bar switch here: that is process-wide state, the caller's to set (the CLI
    # turns datasets' bars off through HF_DATASETS_DISABLE_PROGRESS_BARS).
    return _write_hf(datasets, features, by_split, splits, fmt, out, res, embed_images, image_root)


def _write_hf(datasets: Any, features: Any, by_split: dict[str, list[TrainingSample]], splits: list[str], fmt: str,
              out: Path, res: ExportResult, embed_images: bool, image_root: str | None) -> ExportResult:
    dd = {}
    for split in splits:
        rows = [to_hf_row(s) for s in by_split[split]]
        if embed_images:  # the file's bytes, so the dataset is self-contained
            for row in rows:
                files = [Path(image_root) / p if image_root and not Path(p).is_absolute() else Path(p) for p in row["images"]]
                missing = [str(f) for f in files if not f.is_file()]
                if missing:
                    raise FileNotFoundError(f"--embed-images: no such image file {missing[0]} (record {row['id']})")
                row["images"] = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
        dd[split] = datasets.Dataset.from_list(rows, features=features)
    ddict = datasets.DatasetDict(dd)
    if fmt == "hf":
        ddict.save_to_disk(str(out))
        res.files.append(str(out))
    else:
        for split, ds in ddict.items():
            path = out / f"{split}.parquet"
            ds.to_parquet(str(path))
            res.files.append(str(path))
    return res

