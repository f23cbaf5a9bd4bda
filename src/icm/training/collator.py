"""Batches for instruction tuning: the model's chat template, loss on assistant tokens only.

A conversation is rendered with the checkpoint's own chat template (the processor's, else
the tokenizer's: :func:`icm.prompting.find_templater`, as the ``hf`` backend) and cut
into segments at every assistant reply: for the k-th reply, the text before it is the
template's rendering of the conversation so far *with the generation prompt*, and the
reply is what the rendering of the conversation including the reply adds after that. So:

* the prompt of a single-turn example is tokenised exactly as
  :class:`~icm.moderation.backends.hf.HFBackend` tokenises it when it scores the term's
  yes/no question or an attribute's lettered question (same messages, same template,
  same BOS rule, the processor expands the image the same way), and the first target
  token is the one the backend reads the answer from (whitespace the template puts before
  the reply to a question with a fixed answer set, when the tokenizer spells it as a
  token of its own, is part of the prompt: :func:`icm.prompting.reply_lead`, decided for
  the answers that question offers; free-text replies keep theirs);
* the prompt up to the image is tokenised through the processor with its image, exactly
  as at inference time, where the prompt is encoded and the answer generated after it;
  the rest of the conversation (replies and later turns) is tokenised as one text, as a
  chat model reads it, and the labels come from its offsets: the tokens whose characters
  lie in a reply (including the template's end-of-turn tokens, so the model learns to
  stop); ``-100`` everywhere else.

Padding is on the right; per-token tensors the processor returns besides ``input_ids``
and ``attention_mask`` (``token_type_ids``, ``mm_token_type_ids``) are extended with
zeros; image tensors of the batch are concatenated (tile counts padded with zeros where
images were split into different numbers of tiles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from icm.prompting import add_special_tokens, encode_prompt, find_templater, offered_answers, render, split_reply

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["ChatCollator", "Segment", "find_templater", "render_segments"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Segment:
    text: str
    assistant: bool
    images: int = 0
    """How many images this (non-assistant) segment holds."""


def _count_images(messages: Sequence[dict[str, Any]]) -> int:
    return sum(
        1 for m in messages for p in (m["content"] if isinstance(m["content"], list) else []) if p.get("type") == "image"
    )


def render_segments(templater: Any, messages: Sequence[dict[str, Any]]) -> list[Segment]:
    """Cut a conversation into prompt / reply segments (see the module docstring).

    ``messages`` use content parts (``{"type": "image"}``, ``{"type": "text", "text"}``)
    and end with an assistant reply. Raises ValueError when the chat template does not
    render a conversation as its prefix followed by the reply (the segmentation would be
    wrong, and so would the loss mask).
    """

    segments: list[Segment] = []
    done = ""
    images_done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(templater, messages[:i], generation_prompt=True)
        full = render(templater, messages[: i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt) or len(full) == len(prompt):
            raise ValueError(
                "the chat template does not render the conversation as the prompt followed by the assistant's reply "
                f"(turn {i}); loss masking needs that property"
            )
        n_images = _count_images(messages[:i]) - images_done
        # whitespace tokens before the answer to a question with a fixed answer set are
        # prompt, as when scoring that question (the lead of the set it offers; none for free text)
        answers = offered_answers(messages[i - 1]) if i else None
        lead, reply = split_reply(templater, full[len(prompt):], answers)
        prompt += lead
        if len(prompt) > len(done) or n_images:
            segments.append(Segment(prompt[len(done):], False, n_images))
        segments.append(Segment(reply, True))
        done, images_done = full, images_done + n_images
    if not segments or not segments[-1].assistant:
        raise ValueError("a training conversation must end with an assistant reply")
    return segments


class ChatCollator:
    """Turn examples ``{"segments": [...], "images": [PIL or path]}`` into a training batch.

    Examples may also carry ``"messages"`` instead of ``"segments"`` (rendered here).
    ``max_length`` truncates at the end (the image stays, it is at the start); an example
    whose first prompt alone is longer raises ValueError.
    """

    def __init__(self, processor: Any, *, max_length: int | None = None, image_loader: Any = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.templater = find_templater(processor)
        self.max_length = max_length
        self.image_loader = image_loader or _open_rgb
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = int(self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ one example

    def encode(self, example: dict[str, Any]) -> dict[str, Any]:
        """Token ids, labels, per-token extras and image tensors of one example."""
        import torch

        segments: list[Segment] = example.get("segments") or render_segments(self.templater, example["messages"])
        images = [self.image_loader(im) for im in (example.get("images") or [])]
        ids: list[int] = []
        labels: list[int] = []
        extras: dict[str, list[int]] = {}
        visual: dict[str, list[Any]] = {}
        used = 0
        n = 0
        while n < len(segments):
            seg = segments[n]
            if n > 0 and not seg.images:
                # everything up to the next image is tokenised as one text, as a chat model
                # reads a conversation; the labels are the tokens inside the replies' offsets
                run = [seg]
                while n + len(run) < len(segments) and not segments[n + len(run)].images:
                    run.append(segments[n + len(run)])
                run_ids, run_labels = self._encode_run(run)
                for key in extras:
                    extras[key].extend([0] * len(run_ids))
                ids += run_ids
                labels += run_labels
                n += len(run)
                continue
            take = images[used : used + seg.images] if seg.images else []
            used += seg.images
            # the BOS rule for the first segment, as at inference (icm.prompting); none later
            bos = add_special_tokens(self.tokenizer, seg.text) if n == 0 else False
            if take:
                enc = encode_prompt(self.processor, take, [seg.text], add_bos=bos)
            else:
                enc = self.tokenizer(seg.text, add_special_tokens=bos, return_tensors="pt")
            seg_ids = enc["input_ids"][0].tolist()
            seg_extra: dict[str, list[int]] = {}
            width = enc["input_ids"].shape
            for key, value in enc.items():
                if key in ("input_ids", "attention_mask"):
                    continue
                if hasattr(value, "shape") and tuple(value.shape) == tuple(width):
                    seg_extra[key] = value[0].tolist()
                elif hasattr(value, "shape"):
                    visual.setdefault(key, []).append(value)
            for key in set(extras) | set(seg_extra):
                extras.setdefault(key, [0] * len(ids)).extend(seg_extra.get(key, [0] * len(seg_ids)))
            ids += seg_ids
            labels += seg_ids if seg.assistant else [IGNORE_INDEX] * len(seg_ids)
            n += 1
        if used != len(images):
            raise ValueError(f"the conversation has {used} image placeholders but {len(images)} images")
        if self.max_length is not None and len(ids) > self.max_length:
            if all(label == IGNORE_INDEX for label in labels[: self.max_length]):
                raise ValueError(
                    f"an example's prompt is longer than max_length={self.max_length}: raise max_length"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            extras = {k: v[: self.max_length] for k, v in extras.items()}
        return {"input_ids": ids, "labels": labels, "extras": extras,
                "visual": {k: torch.cat(v, dim=0) if len(v) > 1 else v[0] for k, v in visual.items()}}

    def _encode_run(self, run: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """Token ids and labels of consecutive text segments, tokenised as one text.

        A token is a label when its characters overlap a reply's (the whole conversation's
        offsets); a tokenizer without offsets (a slow one) tokenises segment by segment.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            ids: list[int] = []
            labels: list[int] = []
            for seg in run:
                seg_ids = self.tokenizer(seg.text, add_special_tokens=False)["input_ids"]
                ids += seg_ids
                labels += seg_ids if seg.assistant else [IGNORE_INDEX] * len(seg_ids)
            return ids, labels
        spans: list[tuple[int, int]] = []
        at = 0
        for seg in run:
            if seg.assistant:
                spans.append((at, at + len(seg.text)))
            at += len(seg.text)
        enc = self.tokenizer("".join(seg.text for seg in run), add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            token if any(a < end and b > start for start, end in spans) else IGNORE_INDEX
            for token, (a, b) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        return ids, labels

    # ------------------------------------------------------------------ a batch

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        encoded = [self.encode(e) for e in examples]
        width = max(len(e["input_ids"]) for e in encoded)
        n = len(encoded)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        extra_keys = sorted({k for e in encoded for k in e["extras"]})
        extras = {k: torch.zeros((n, width), dtype=torch.long) for k in extra_keys}
        for r, e in enumerate(encoded):
            m = len(e["input_ids"])
            input_ids[r, :m] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[r, :m] = torch.tensor(e["labels"], dtype=torch.long)
            mask[r, :m] = 1
            for k in extra_keys:
                if k in e["extras"]:
                    extras[k][r, :m] = torch.tensor(e["extras"][k], dtype=torch.long)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, **extras}
        visual_keys = sorted({k for e in encoded for k in e["visual"]})
        for k in visual_keys:
            parts = [e["visual"][k] for e in encoded if k in e["visual"]]
            batch[k] = _concat(parts)
        return batch


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate image tensors along the first axis, padding other axes with zeros
    (Idefics3-style ``(batch, tiles, ...)`` tensors with different tile counts)."""
    import torch

    if len(parts) == 1:
        return parts[0]
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) == 1:
        return torch.cat(parts, dim=0)
    ndim = parts[0].dim()
    if any(p.dim() != ndim for p in parts):
        raise ValueError("image tensors of different ranks cannot be batched")
    size = [max(p.shape[d] for p in parts) for d in range(1, ndim)]
    padded = []
    for p in parts:
        out = p.new_zeros((p.shape[0], *size))
        out[tuple([slice(None)] + [slice(0, s) for s in p.shape[1:]])] = p
        padded.append(out)
    return torch.cat(padded, dim=0)


def _open_rgb(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, dict) and image.get("bytes") is not None:  # a datasets.Image cell
        import io

        with Image.open(io.BytesIO(image["bytes"])) as im:
            return im.convert("RGB")
    path = image.get("path") if isinstance(image, dict) else image
    if path is None:
        raise ValueError("an image cell has neither bytes nor a path")
    with Image.open(path) as im:
        return im.convert("RGB")
