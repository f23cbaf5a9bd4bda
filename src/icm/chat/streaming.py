"""Token streaming for chat, per backend.

* ``hf``: ``model.generate`` with a streamer that hands each decoded piece of text to the
  callback as soon as it is final (the backend's model, processor and tokenizer are used
  directly; the prompt is built with the checkpoint's chat template, as the backend does);
* ``openai``: the backend's :meth:`~icm.moderation.backends.openai_compat.OpenAIBackend.stream`
  (the ``openai`` SDK's server-sent events; a server that answers with a plain JSON
  completion instead is handled too);
* any other backend that can ``generate``: the whole answer, in one piece.

Sampling: ``temperature == 0`` is greedy decoding (deterministic, the default); above 0
samples with ``top_p``, reproducibly for a given ``seed``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from icm.moderation.backends.base import Backend, Message
from icm.prompting import encode_prompt, find_templater, render_prompt

TokenCallback = Callable[[str], None]


class ChatUnsupported(RuntimeError):
    """The backend cannot hold a conversation (e.g. the offline detector)."""


class ChatBackendError(RuntimeError):
    """The model or the server failed while answering."""


@dataclass
class Sampling:
    """How answers are sampled; the default (temperature 0) is deterministic."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def stream_reply(
    backend: Backend,
    image: Image.Image,
    messages: Sequence[Message],
    sampling: Sampling,
    on_token: TokenCallback,
) -> str:
    """Generate the assistant's next message, calling ``on_token`` with each new piece."""
    if not backend.supports("generate"):
        raise ChatUnsupported(
            f"the {backend.name} backend cannot generate text: it only scores images. "
            "Use /verdict here, or chat with --backend hf or openai."
        )
    if backend.text_stream == "transformers":
        return _hf_stream(backend, image, messages, sampling, on_token)
    if backend.text_stream == "method":
        return _method_stream(backend, image, messages, sampling, on_token)
    return _whole(backend, image, messages, sampling, on_token)


# --------------------------------------------------------------------------- generic


def _whole(backend: Backend, image: Image.Image, messages: Sequence[Message], sampling: Sampling, on_token: TokenCallback) -> str:
    kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens}
    params = inspect.signature(backend.generate).parameters
    for name, value in (("temperature", sampling.temperature), ("top_p", sampling.top_p), ("seed", sampling.seed)):
        if name in params:
            kwargs[name] = value
    try:
        texts = backend.generate([image], [list(messages)], **kwargs)
    except Exception as exc:  # any backend failure is reported to the chat as one error
        raise ChatBackendError(f"{backend.name} backend failed: {type(exc).__name__}: {exc}") from exc
    text = (texts[0] if texts else None) or ""
    if text:
        on_token(text)
    return text


# --------------------------------------------------------------------------- hf


def hf_prompt(backend: Any, messages: Sequence[Message]) -> str:
    """The generation prompt for ``messages`` with the checkpoint's chat template (:mod:`icm.prompting`)."""
    try:
        templater = find_templater(backend.processor)
    except ValueError as exc:
        raise ChatBackendError("the checkpoint has no chat template") from exc
    return render_prompt(templater, messages)


def hf_inputs(backend: Any, image: Image.Image, messages: Sequence[Message]) -> Any:
    """The model inputs of the generation prompt: rendered, image and BOS rule as the backend scores."""
    return encode_prompt(backend.processor, [image], [hf_prompt(backend, messages)]).to(backend.device)


def _hf_stream(backend: Any, image: Image.Image, messages: Sequence[Message], sampling: Sampling, on_token: TokenCallback) -> str:
    import torch
    from transformers import TextStreamer

    tokenizer = backend.tokenizer
    enc = hf_inputs(backend, image, messages)
    pieces: list[str] = []

    class _Callback(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                pieces.append(text)
                on_token(text)

    streamer = _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "streamer": streamer,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if sampling.greedy:
        kwargs.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    try:
        with torch.inference_mode():
            if sampling.seed is not None and not sampling.greedy:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sampling.seed)
                    backend.model.generate(**enc, **kwargs)
            else:
                backend.model.generate(**enc, **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # any failure of generate() is reported to the chat as one error
        raise ChatBackendError(f"generation failed: {type(exc).__name__}: {exc}") from exc
    return "".join(pieces).strip()


# --------------------------------------------------------------------------- a backend's own stream (openai)


def _method_stream(backend: Backend, image: Image.Image, messages: Sequence[Message], sampling: Sampling, on_token: TokenCallback) -> str:
    """Through the backend's own client (the SDK's streaming, retries and key handling)."""
    from icm.openai_http import ChatError

    try:
        return str(backend.stream(
            image,
            list(messages),
            on_token,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=None if sampling.greedy else sampling.top_p,
            seed=sampling.seed,
        ))
    except ChatError as exc:
        raise ChatBackendError(str(exc)) from exc
