"""The two kinds of call a preset makes of its hf or openai backend, with the prompt as is.

The backends' own ``score_yes_no`` adds icm's "Answer with Yes or No." to every question;
a guard model must see its own prompt and nothing else, so :func:`yes_no_as_is` scores
the text unchanged (the hf backend's next-token log-probabilities through the model's
chat template; the openai backend's scoring request, read from logprobs or, without them,
from the text). :func:`generate` is the backends' own greedy generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from PIL import Image

from icm.moderation.backends.base import Backend, Failed, Message, NotJudged, YesNoScore

__all__ = ["generate", "yes_no_as_is"]

# yes_no_as_is reaches into the hf and openai backends (``_last_logprobs``, ``_yes_no``; ``_score_task``,
# ``_encode_all``, ``_sync``, ``_settle``): their public ``score_yes_no`` rewrites the prompt.

YesNoAnswer = YesNoScore | NotJudged | Failed | None


def yes_no_as_is(backend: Backend, images: Sequence[Image.Image], texts: Sequence[str]) -> list[YesNoAnswer]:
    """P(Yes) for ``texts[i]`` about ``images[i]``, the text sent exactly as given."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} prompts")
    if not images:
        return []
    if backend.name == "hf" and hasattr(backend, "_last_logprobs"):
        hf: Any = backend
        logprobs = hf._last_logprobs(images, [(i, t) for i, t in enumerate(texts)])
        return [hf._yes_no(row) for row in logprobs]
    if backend.name == "openai" and hasattr(backend, "_score_task"):
        oa: Any = backend

        async def run() -> tuple[list[YesNoAnswer], list[Any]]:
            urls = oa._encode_all(images)
            results = await asyncio.gather(*(oa._score_task(i, None, urls[i], t, None, ()) for i, t in enumerate(texts)))
            return [a for a, _ in results], [e for _, e in results if e is not None]

        answers, errors = oa._sync(run())
        oa._settle(errors, len(answers))
        return answers
    if backend.name in ("hf", "openai"):  # never fall back to the protocol that rewrites the prompt
        raise RuntimeError(f"the {backend.name} backend has no way here to score a prompt as is (its internals changed)")
    return list(backend.score_yes_no(images, list(texts)))  # another backend: its own yes/no protocol


def generate(backend: Backend, images: Sequence[Image.Image], text: str, max_new_tokens: int) -> list[str | Failed]:
    """Greedy text for one user turn (the image, then ``text``) about each image; a request
    that failed for good is :class:`Failed` naming why."""
    if not images:
        return []
    conv: list[Message] = [{"role": "user", "content": text}]
    out = backend.generate(images, [conv] * len(images), max_new_tokens=max_new_tokens)
    errors = {e.index: e for e in getattr(backend, "last_errors", []) or []}
    result: list[str | Failed] = []
    for i, t in enumerate(out):
        if t is None:
            e = errors.get(i)
            result.append(Failed(e.error, e.status) if e is not None else Failed("the request failed"))
        else:
            result.append(t)
    return result
