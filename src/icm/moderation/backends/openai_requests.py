"""One request of the openai backend: the image as a ``data:`` URL, the messages and request
fields of a question, its retries through the client, and reading the answer
(:mod:`icm.moderation.backends.openai_parsing`). :class:`OpenAIRequests` is mixed into
:class:`~icm.moderation.backends.openai_compat.OpenAIBackend`, which holds the batches,
the event loop and the error policy.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from icm.moderation.backends.base import Choice, Failed, Message, NotJudged, YesNoScore
from icm.moderation.backends.openai_parsing import read_answer
from icm.openai_http import ChatClient, ChatError, ChatUsage, completion_text, dump
from icm.prompting import openai_conversation, question_conversation

_log = logging.getLogger("icm.moderation.backends.openai_compat")

__all__ = ["ItemError", "OpenAIRequests", "encode_image"]


# --------------------------------------------------------------------------- records

@dataclass
class ItemError:
    """Why one item of the last call got ``None``.

    ``index`` is the image's position in the batch, ``key`` the query key for
    :meth:`OpenAIBackend.ask` (``None`` for the other calls), ``status`` the HTTP status
    when the server answered with an error, ``raw`` what could be kept of the response,
    ``kind`` the :attr:`~icm.openai_http.ChatError.kind` of the failure.
    """

    index: int
    error: str
    key: str | None = None
    status: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None


# --------------------------------------------------------------------------- images


def encode_image(
    image: Image.Image,
    *,
    max_side: int | None = 1024,
    image_format: Literal["auto", "jpeg", "png"] = "auto",
    jpeg_quality: int = 90,
) -> str:
    """The image as a ``data:`` URL, downscaled so its longer side is at most ``max_side``.

    ``"auto"`` keeps transparency as PNG and sends everything else as JPEG (much smaller
    payloads; models see RGB anyway).  ``max_side=None`` (or 0) keeps the size.
    """
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    fmt = image_format
    if fmt == "auto":
        fmt = "png" if has_alpha else "jpeg"
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'auto', 'jpeg' or 'png', got {image_format!r}")
    target_mode = "RGBA" if (fmt == "png" and has_alpha) else "RGB"
    img = image if image.mode == target_mode else image.convert(target_mode)
    w, h = img.size
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=jpeg_quality)
        mime = "image/jpeg"
    else:
        img.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


_Result = tuple[Any, "ItemError | None"]


def _split(results: Sequence[_Result]) -> tuple[list[Any], list[ItemError]]:
    return [answer for answer, _ in results], [err for _, err in results if err is not None]


class OpenAIRequests:
    """Building, sending and reading one request (the backend's settings are its attributes)."""

    model: str
    image_detail: str | None
    max_image_side: int | None
    image_format: Literal["auto", "jpeg", "png"]
    jpeg_quality: int
    system_prompt: str | None
    answer_tokens: int
    use_logprobs: bool
    top_logprobs: int
    guided_choice: str
    guided_rejected: str | None
    extra_body: dict[str, Any]
    min_label_mass: float
    text_confidence: float
    stats: ChatUsage
    _client: ChatClient
    _answered: bool


    def _encode(self, image: Image.Image) -> str:
        return encode_image(
            image,
            max_side=self.max_image_side,
            image_format=self.image_format,
            jpeg_quality=self.jpeg_quality,
        )

    def _encode_all(self, images: Sequence[Image.Image]) -> list[str]:
        """Data URLs for ``images``; an image object repeated in the batch is encoded once."""
        cache: dict[int, str] = {}
        urls = []
        for img in images:
            key = id(img)
            if key not in cache:
                cache[key] = self._encode(img)
            urls.append(cache[key])
        return urls

    def _question_messages(self, url: str, text: str) -> list[Message]:
        return openai_conversation(question_conversation(text, self.system_prompt), url, self.image_detail)

    def _attach_image(self, messages: list[Message], url: str) -> list[Message]:
        """A copy of ``messages`` with the image put first in the first user turn (:mod:`icm.prompting`)."""
        return openai_conversation(messages, url, self.image_detail)

    def _generation_params(self, max_new_tokens: int, temperature: float, top_p: float | None, seed: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}
        if top_p is not None:
            params["top_p"] = top_p
        if seed is not None:
            params["seed"] = seed
        return params

    def _scoring_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": self.answer_tokens, "temperature": 0}
        if self.use_logprobs:
            params.update(logprobs=True, top_logprobs=self.top_logprobs)
        return params

    def _guided_params(self, labels: Sequence[str]) -> dict[str, Any]:
        """The request fields that constrain the answer to ``labels`` (none when off or rejected)."""
        if self.guided_choice == "off" or self.guided_rejected is not None:
            return {}
        if self.guided_choice == "structured_outputs":
            return {"structured_outputs": {"choice": list(labels)}}
        if self.guided_choice == "guided_choice":
            return {"guided_choice": list(labels)}
        return {"regex": "(" + "|".join(re.escape(label) for label in labels) + ")"}

    async def _request(self, body: dict[str, Any]) -> Any:
        """One chat completion with retries (an SDK ``ChatCompletion``), or :class:`ChatError`."""
        completion = await self._client.complete({"model": self.model, **body, **self.extra_body})
        self._answered = True
        return completion

    async def _post_scoring(self, messages: list[Message], labels: Sequence[str]) -> tuple[Any, bool]:
        """A scoring request; ``(response, guided)``. A rejected guided field is dropped for good."""
        guided = self._guided_params(labels)
        body = {"messages": messages, **self._scoring_params()}
        if guided:
            try:
                return await self._request({**body, **guided}), True
            except ChatError as e:
                if e.status not in (400, 422):
                    raise
                if self.guided_rejected is None:
                    self.guided_rejected = str(e)
                    _log.warning(
                        "openai backend: the server rejected guided output (%s); asking without it from now on", e
                    )
        return await self._request(body), False

    async def _score_task(
        self,
        index: int,
        key: str | None,
        url: str,
        prompt: str,
        labels: Sequence[str] | None,
        options: Sequence[str],
    ) -> tuple[YesNoScore | Choice | NotJudged | Failed, ItemError | None]:
        """One scoring question (yes/no when ``labels`` is None) about one image.

        Never raises for one item: a request that fails for good is :class:`Failed` (with
        its :class:`ItemError`); an answer that is not one is :class:`NotJudged`.
        """
        valid = ["Yes", "No"] if labels is None else list(labels)
        try:
            completion, guided = await self._post_scoring(self._question_messages(url, prompt), valid)
            text, choice = completion_text(completion)
            if choice is None:
                raise ChatError("the response has no choices", raw={"response": dump(completion)})
        except ChatError as e:
            return Failed(str(e), e.status, e.raw), ItemError(index, str(e), key, e.status, e.raw, e.kind)
        except Exception as e:  # noqa: BLE001 - an odd response must not fail the batch
            msg = f"unexpected {type(e).__name__}: {e}"
            return Failed(msg), ItemError(index, msg, key)
        answer, from_text = read_answer(
            text, getattr(choice, "logprobs", None), labels=labels, options=options, guided=guided,
            min_label_mass=self.min_label_mass, logprobs_asked=self.use_logprobs, text_confidence=self.text_confidence,
        )
        if from_text:
            self.stats.parsed_fallbacks += 1
        return answer, None
