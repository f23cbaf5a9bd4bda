"""Training examples from the exports of ``icm data export``, and MSFT mixing.

Readers (one layout each, picked from what is on disk):

* ``hf``: a ``DatasetDict`` saved with ``save_to_disk`` (TRL's conversational vision
  layout: ``messages`` with typed content parts, ``images``, and our ``product`` /
  ``policy`` columns); ``parquet``: ``train.parquet`` / ``validation.parquet`` with the
  same columns;
* LLaVA JSON (``conversations`` with ``from`` / ``value`` and ``<image>`` in the text)
  and ShareGPT / LLaMA-Factory JSON (``messages`` with ``role`` / ``content``, an
  ``images`` list); a folder holding ``*_train.json`` / ``*_validation.json`` gives both
  splits, a single file is the train split.

Every row becomes messages with content parts (``{"type": "image"}``, ``{"type": "text",
"text": ...}``, the same parts the hf backend renders) and its image paths, resolved
against ``image_root``, the data's folder and its parent.

*Moderation questions.* For each image of ours whose product is known (the hf and
parquet exports carry it), :func:`moderation_examples` adds single-turn examples asking
the policy's term question and each attribute's lettered question, worded by
:mod:`icm.policy.prompts_format` exactly as ``icm moderate`` asks them, answered from
the product ("Yes"/"No", the option letter). The hf backend scores the next token after
precisely that prompt, so a tuned model is trained on what it is scored on.

*MSFT.* :func:`mix_general` draws general instruction examples (seeded, without
replacement) to the asked ratio of general examples per example of ours.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icm.policy import Policy, PolicyError, builtin_policy_names, load_policy
from icm.prompting import moderation_choice_prompt, option_answer, training_conversation, yes_no_answer, yes_no_prompt

__all__ = [
    "DataError",
    "Example",
    "TrainDataset",
    "load_examples",
    "mix_general",
    "moderation_examples",
    "read_rows",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_IMAGE_TAG = re.compile(r"<image>\n?")


class DataError(ValueError):
    """Training data that cannot be read or used; the message names the file."""


@dataclass
class Example:
    """One training example: a conversation about (usually) one image."""

    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    kind: str = "conversation"
    """conversation (ours), term / attribute (moderation questions), general (MSFT)."""
    product: str | None = None
    policy: str | None = None
    image_key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "images": self.images, "kind": self.kind}


# --------------------------------------------------------------------------- rows on disk


def _text_parts(text: str, n_images_left: int) -> tuple[list[dict[str, Any]], int]:
    """Split text at ``<image>`` tags into text and image parts."""
    parts: list[dict[str, Any]] = []
    used = 0
    pieces = _IMAGE_TAG.split(text)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            used += 1
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip("\n") if i > 0 else piece.rstrip("\n")})
    return parts, used


def _normalise_messages(messages: Sequence[dict[str, Any]], n_images: int, where: str) -> list[dict[str, Any]]:
    """Messages with content parts; images placed by tags/parts, else before the first user text."""
    out: list[dict[str, Any]] = []
    placed = 0
    for m in messages:
        role = _ROLE.get(str(m.get("role", m.get("from", ""))).lower())
        if role is None:
            raise DataError(f"{where}: unknown role {m.get('role', m.get('from'))!r}")
        content = m.get("content", m.get("value", ""))
        parts: list[dict[str, Any]]
        if isinstance(content, str):
            parts, used = _text_parts(content, n_images - placed) if role == "user" else ([{"type": "text", "text": content}], 0)
            placed += used
        elif isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict):
                    raise DataError(f"{where}: a content part is not an object")
                kind = p.get("type")
                if kind == "image":
                    parts.append({"type": "image"})
                    placed += 1
                elif kind in ("text", "input_text"):
                    parts.append({"type": "text", "text": p.get("text") or ""})
                else:
                    raise DataError(f"{where}: unsupported content part {kind!r}")
        else:
            raise DataError(f"{where}: message content must be a string or a list of parts")
        out.append({"role": role, "content": parts})
    if placed == 0 and n_images:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: a conversation with an image needs a user message")
        first_user["content"] = [{"type": "image"} for _ in range(n_images)] + first_user["content"]
        placed = n_images
    if placed != n_images:
        raise DataError(f"{where}: {placed} image placeholders for {n_images} images")
    while out and out[-1]["role"] != "assistant":
        out.pop()  # a trailing question without an answer teaches nothing
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant reply")
    return out


def _resolve_image(value: Any, bases: Sequence[Path], where: str) -> Any:
    if isinstance(value, dict):  # datasets.Image: {"bytes", "path"}
        if value.get("bytes") is not None:
            return {"bytes": value["bytes"], "path": value.get("path")}
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: an image entry is neither a path nor image bytes")
    p = Path(value).expanduser()
    if p.is_absolute():
        if p.is_file():
            return str(p)
        raise DataError(f"{where}: no such image file {p}")
    tried = []
    for base in bases:
        cand = base / p
        if cand.is_file():
            return str(cand.resolve())
        tried.append(str(cand))
    raise DataError(f"{where}: image {value!r} not found (tried {', '.join(tried)}); set image_root")


def _rows_hf(path: Path) -> dict[str, list[dict[str, Any]]]:
    import datasets

    obj = datasets.load_from_disk(str(path))
    if isinstance(obj, datasets.DatasetDict):
        return {split: list(ds) for split, ds in obj.items()}
    return {"train": list(obj)}


def _rows_parquet(files: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    import datasets

    return {split: list(datasets.Dataset.from_parquet(str(f))) for split, f in files.items()}


def _rows_json(file: Path) -> list[dict[str, Any]]:
    from icm.data.mix import load_samples_file

    try:
        return load_samples_file(file)
    except (ValueError, json.JSONDecodeError) as exc:
        raise DataError(f"{file}: {exc}") from None


def _split_of_name(name: str) -> str | None:
    stem = name.rsplit(".", 1)[0].lower()
    for split, words in (("validation", ("validation", "val", "eval", "test")), ("train", ("train",))):
        if any(stem == w or stem.endswith(("_" + w, "-" + w)) for w in words):
            return split
    return None


def read_rows(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Raw rows per split (``train`` / ``validation``) of one export (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return _rows_hf(p)
        parquet = {s: p / f"{s}.parquet" for s in SPLITS if (p / f"{s}.parquet").exists()}
        if parquet:
            return _rows_parquet(parquet)
        found: dict[str, list[dict[str, Any]]] = {}
        for f in sorted(p.glob("*.json")) + sorted(p.glob("*.jsonl")):
            split = _split_of_name(f.name)
            if split is not None and f.name != "dataset_info.json":
                found.setdefault(split, []).extend(_rows_json(f))
        if found:
            return found
        raise DataError(f"{p}: no hf dataset, train/validation parquet or *_train.json / *_validation.json here")
    if p.suffix.lower() == ".parquet":
        return _rows_parquet({"train": p})
    if p.suffix.lower() in (".json", ".jsonl"):
        return {_split_of_name(p.name) or "train": _rows_json(p)}
    raise DataError(f"{p}: expected an hf/parquet export folder, a .parquet, .json or .jsonl file")


def _example(row: dict[str, Any], bases: Sequence[Path], where: str, kind: str) -> Example:
    if "messages" in row and isinstance(row["messages"], list):
        messages = row["messages"]
    elif "conversations" in row and isinstance(row["conversations"], list):
        messages = row["conversations"]
    else:
        raise DataError(f"{where}: a row needs 'messages' or 'conversations'")
    raw_images = row.get("images")
    if raw_images is None:
        raw_images = [row["image"]] if row.get("image") else []
    if not isinstance(raw_images, list):
        raw_images = [raw_images]
    images = [_resolve_image(im, bases, where) for im in raw_images]
    msgs = _normalise_messages(messages, len(images), where)
    key = None
    if images:  # the resolved path, or for embedded bytes their content hash
        first = images[0]
        key = first if isinstance(first, str) else hashlib.sha256(first["bytes"]).hexdigest()
    return Example(
        messages=msgs, images=images, kind=kind, product=row.get("product") or None,
        policy=row.get("policy") or None, image_key=key,
    )


def load_examples(
    paths: Iterable[str | Path], *, kind: str = "conversation", image_root: str | None = None
) -> dict[str, list[Example]]:
    """Examples per split from exported data (conversations as exported)."""
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for path in paths:
        p = Path(path).expanduser()
        folder = p if p.is_dir() else p.parent
        bases = ([Path(image_root).expanduser()] if image_root else []) + [folder, folder.parent, Path.cwd()]
        for split, rows in read_rows(p).items():
            for i, row in enumerate(rows):
                out.setdefault(split, []).extend([_example(row, bases, f"{p} [{split} row {i}]", kind)])
    return out


# --------------------------------------------------------------------------- moderation questions


def _policy_for(name: str | None, cache: dict[str, Policy | None]) -> Policy | None:
    if name is None:
        return None
    if name not in cache:
        try:
            cache[name] = load_policy(name) if name in builtin_policy_names() or Path(name).exists() else None
        except PolicyError:
            cache[name] = None
    return cache[name]


def _scored_example(
    prompt: str, answer: str, kind: str, *, images: list[Any], product: str, policy: str, image_key: str | None
) -> Example:
    """One moderation question and its answer, worded as the hf backend scores it."""
    return Example(
        messages=training_conversation(prompt, answer), images=list(images), kind=kind,
        product=product, policy=policy, image_key=image_key,
    )


def moderation_examples(examples: Sequence[Example], policy: Policy | None = None) -> tuple[list[Example], int]:
    """The term and attribute questions for each image of ours with a known product.

    Returns the examples and the number of images skipped (no product, or a policy that
    is neither given nor built in). ``policy`` overrides each row's policy name.
    """
    out: list[Example] = []
    seen: set[tuple[str, str]] = set()
    skipped = 0
    cache: dict[str, Policy | None] = {}
    for ex in examples:
        if not ex.images or ex.kind != "conversation":
            continue
        pol = policy or _policy_for(ex.policy, cache)
        key = (str(ex.image_key), ex.product or "")
        if key in seen:
            continue
        seen.add(key)
        if pol is None or ex.product is None or ex.product not in pol.product_map:
            skipped += 1
            continue
        product = pol.product(ex.product)
        single = functools.partial(
            _scored_example, images=ex.images[:1], product=product.id, policy=pol.name, image_key=ex.image_key
        )
        out.append(single(yes_no_prompt(pol.term.question), yes_no_answer(product.positive), "term"))
        for attr in pol.attributes:
            value = product.assignment.get(attr.id)
            if value is None:
                continue  # the product says nothing about this attribute
            prompt = moderation_choice_prompt(attr.question, [v.option_text for v in attr.values])
            out.append(single(prompt, option_answer(len(attr.values), attr.value_ids.index(value)), "attribute"))
    return out, skipped


# --------------------------------------------------------------------------- MSFT


def mix_general(ours: Sequence[Example], general: Sequence[Example], ratio: str, seed: int = 0) -> list[Example]:
    """General examples to add to ``ours``: ``ratio`` is OURS:GENERAL or the share of ours."""
    from icm.data.mix import parse_ratio

    per_ours = parse_ratio(ratio)
    want = round(len(ours) * per_ours)
    if want > len(general):
        log.warning("the general data has %d examples, fewer than the %d asked: all are used", len(general), want)
        want = len(general)
    rng = random.Random(seed)
    picked = rng.sample(list(general), want)
    for ex in picked:
        ex.kind = "general"
    return picked


# --------------------------------------------------------------------------- the torch dataset


def _order_key(ex: Example) -> tuple[str, str, str, str]:
    text = next((p.get("text") or "" for m in ex.messages for p in m["content"] if p.get("type") == "text"), "")
    return (ex.kind, str(ex.image_key or ""), text, ex.messages[-1]["content"][0].get("text") or "")


class TrainDataset:
    """A map-style dataset of examples, each rendered into segments with the chat template.

    Rendering is lazy and remembered (up to ``cache_limit`` examples, so a dataset of
    hundreds of thousands of conversations does not hold them all twice);
    :meth:`prepare` renders one example of each kind at once, so a chat template that
    cannot be segmented fails before training starts, not in the middle of it.
    """

    def __init__(self, examples: Sequence[Example], seed: int = 0, shuffle: bool = False, cache_limit: int = 200_000) -> None:
        self.examples = list(examples)
        if shuffle:
            # a canonical order first: records come in the order generation finished them
            self.examples.sort(key=_order_key)
            random.Random(seed).shuffle(self.examples)
        self.cache_limit = cache_limit
        self._templater: Any = None
        self._segments: dict[int, Any] = {}

    def prepare(self, templater: Any) -> TrainDataset:
        self._templater = templater
        seen: set[str] = set()
        for i, ex in enumerate(self.examples):
            if ex.kind not in seen:
                seen.add(ex.kind)
                self.segments(i)
        return self

    def segments(self, i: int) -> Any:
        from icm.training.collator import render_segments

        segs = self._segments.get(i)
        if segs is None:
            if self._templater is None:
                raise RuntimeError("call prepare(templater) before reading rendered examples")
            segs = render_segments(self._templater, self.examples[i].messages)
            if len(self._segments) < self.cache_limit:
                self._segments[i] = segs
        return segs

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        item = {"messages": ex.messages, "images": ex.images, "kind": ex.kind}
        if self._templater is not None:
            item["segments"] = self.segments(i)
        return item

    def lengths(self) -> list[int]:
        """A rough length of each example (characters of its text / 4, plus a fixed cost per
        image), for batching examples of similar length together."""
        out = []
        for ex in self.examples:
            chars = sum(len(p.get("text") or "") for m in ex.messages for p in m["content"])
            out.append(chars // 4 + 64 * len(ex.images))
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ex in self.examples:
            out[ex.kind] = out.get(ex.kind, 0) + 1
        return out
