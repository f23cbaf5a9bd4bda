"""The hf backend's shared-prefix planner: every question about an image shares the
prompt up to and including the image tokens.

:func:`plan_prefix` splits rendered prompts into that prefix (run once per image, its
key/value cache then expanded to one row per question) and per-question suffix token
ids, or says the split is impossible (``None``): the token sequence scored must be
exactly the tokenization of the full prompt, so the cached path and a plain forward agree
to float tolerance. The helpers below select cache rows and group suffixes by length.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from icm.prompting import render_prompt

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "PrefixMismatch",
    "PrefixPlan",
    "cache_argument",
    "common_prefix_len",
    "is_sequence_tensor",
    "length_groups",
    "plan_prefix",
    "question_prefix",
    "select_cache",
]

QUESTION_MARKER = "ICMQUESTIONMARKER"


@dataclass
class PrefixPlan:
    """How prompts split into a shared (image) prefix and per-question suffixes."""

    prefix_text: str
    tail: list[int]  # prefix tokens after the last image token, as the processor must emit them
    cut: int  # tokens to drop from the end of the encoded prefix before caching it
    suffixes: dict[str, list[int]]  # rendered prompt -> suffix token ids


class PrefixMismatch(RuntimeError):
    """The processor's encoding of the shared prefix is not what the split assumed."""


def question_prefix(templater: Any) -> str | None:
    """The rendered text every one-question prompt starts with (up to the question), or None."""
    marked = render_prompt(templater, [{"role": "user", "content": QUESTION_MARKER}])
    at = marked.find(QUESTION_MARKER)
    return marked[:at] if at > 0 else None


def plan_prefix(rendered: Sequence[str], prefix_text: str, tokenizer: Any, image_token_id: int) -> PrefixPlan | None:
    """Split ``rendered`` prompts after the image; ``None`` when the tokenization does not allow it."""
    prefix_ids = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    image_positions = [i for i, t in enumerate(prefix_ids) if t == image_token_id]
    if not image_positions:
        return None
    last_image = image_positions[-1]
    full: dict[str, list[int]] = {}
    cut = 0
    for text in set(rendered):
        if not text.startswith(prefix_text):
            return None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        common = common_prefix_len(prefix_ids, ids)
        cut = max(cut, len(prefix_ids) - common)
        full[text] = ids
    keep = len(prefix_ids) - cut
    if keep <= last_image or any(len(ids) <= keep for ids in full.values()):
        return None
    return PrefixPlan(
        prefix_text=prefix_text,
        tail=prefix_ids[last_image + 1 :],
        cut=cut,
        suffixes={text: ids[keep:] for text, ids in full.items()},
    )


def cache_argument(forward_params: Collection[str]) -> str:
    """The name under which the model's forward takes (and its output returns) the key/value cache.

    transformers releases after 5.18 (5.24 is installed here) call it ``cache`` and warn on
    ``past_key_values`` (removed in 5.40); the [hf] extra's floor, 5.18, knows only
    ``past_key_values``, and a ``cache=`` there would be swallowed by ``**kwargs`` and the
    suffixes scored without their prefix. Decided from the architecture's forward signature.
    """
    return "cache" if "cache" in forward_params else "past_key_values"


def select_cache(cache: Any, rows: torch.Tensor) -> Any:
    """A cache holding ``rows`` of ``cache`` (repeats allowed); ``cache`` itself is untouched.

    Layers are shallow-copied: ``batch_select_indices`` and the next forward's ``update``
    rebind the copies' tensors instead of modifying the shared prefix.
    """
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected


def length_groups(lengths: Sequence[int], slack: float = 1.3) -> list[list[int]]:
    """Indices grouped by similar length (each at most ``slack`` x its group's shortest)."""
    groups: list[list[int]] = []
    shortest = 0
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if not groups or lengths[i] > slack * shortest:
            groups.append([])
            shortest = lengths[i]
        groups[-1].append(i)
    return groups


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def is_sequence_tensor(value: Any, ids: torch.Tensor) -> bool:
    """Per-token tensors (ids, masks, token types) that must be cut with ``input_ids``."""
    return (
        hasattr(value, "shape")
        and tuple(value.shape) == tuple(ids.shape)
        and not value.is_floating_point()
    )
