"""The two kinds of call a preset makes of its hf or openai backend, with the prompt as is.

The backends' own ``score_yes_no`` adds icm's "Answer with Yes or No." to every question;
a guard model must see its own prompt and nothing else, so :func:`yes_no_as_is` scores
the text unchanged with the backend's :meth:`~icm.moderation.backends.base.Backend.score_prompts_yes_no`
(the hf backend's next-token log-probabilities through the model's chat template; the
openai backend's scoring request, read from logprobs or, without them, from the text).
:func:`generate` is the backends' own greedy generation.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from icm.moderation.backends.base import Backend, Failed, Message, NotJudged, YesNoScore

__all__ = ["generate", "yes_no_as_is"]

YesNoAnswer = YesNoScore | NotJudged | Failed | None


def yes_no_as_is(backend: Backend, images: Sequence[Image.Image], texts: Sequence[str]) -> list[YesNoAnswer]:
    """P(Yes) for ``texts[i]`` about ``images[i]``, the text sent exactly as given
    (:meth:`Backend.score_prompts_yes_no`)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} prompts")
    if not images:
        return []
    return list(backend.score_prompts_yes_no(images, list(texts)))


def generate(backend: Backend, images: Sequence[Image.Image], text: str, max_new_tokens: int) -> list[str | Failed]:
    """Greedy text for one user turn (the image, then ``text``) about each image; a request
    that failed for good is :class:`Failed` naming why."""
    if not images:
        return []
    conv: list[Message] = [{"role": "user", "content": text}]
    out = backend.generate(images, [conv] * len(images), max_new_tokens=max_new_tokens)
    errors = {e.index: e for e in backend.last_errors}
    result: list[str | Failed] = []
    for i, t in enumerate(out):
        if t is None:
            e = errors.get(i)
            result.append(Failed(e.error, e.status) if e is not None else Failed("the request failed"))
        else:
            result.append(t)
    return result
