"""A small asynchronous client for text-only chat completions (the Q-A stage's LLM).

:class:`~icm.moderation.backends.openai_compat.OpenAIBackend` serves the image stages,
but every one of its calls is about an image (it attaches one to the first user turn),
so the text-only LLM stage uses this client: one chat completion per call on any
OpenAI-compatible server (vLLM, SGLang, Ollama, OpenAI), sent through
:class:`~icm.openai_http.ChatClient` (the ``openai`` SDK) with the same
:class:`~icm.openai_http.ServerSettings` as every other client: a bounded number of
requests in flight, a timeout per request, retries of transient failures with backoff
that honours ``Retry-After``, and token counts from each response's ``usage``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from icm.openai_http import ChatClient, ChatError, ChatUsage, ServerSettings, completion_text

__all__ = ["ChatError", "ChatResult", "TextClient"]


@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class TextClient:
    """Text chat completions on an OpenAI-compatible server, for use inside an event loop.

    Create it anywhere (from ``settings``, or the keyword arguments with the base URL and
    key defaulting to the environment); the SDK client is made on first use in the
    running loop. Call :meth:`aclose` when done.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        max_backoff: float = 30.0,
        extra_body: dict[str, Any] | None = None,
        settings: ServerSettings | None = None,
    ) -> None:
        model = model or (settings.model if settings is not None else None) or ""
        if not model:
            raise ValueError("TextClient needs a model name")
        if settings is None:
            if max_concurrency < 1 or max_retries < 0:
                raise ValueError("max_concurrency must be >= 1 and max_retries >= 0")
            settings = ServerSettings.from_env(
                base_url=base_url, api_key=api_key, max_concurrency=max_concurrency, timeout=float(timeout),
                max_retries=max_retries, backoff_base=float(backoff_base), max_backoff=float(max_backoff),
            )
        self.model = model
        self.settings = settings
        self.extra_body = dict(extra_body or {})
        self.stats = ChatUsage()
        self._client = ChatClient(settings, stats=self.stats, message_limit=300)

    def __repr__(self) -> str:
        return f"TextClient(model={self.model!r}, base_url={self.base_url!r}, api_key={'set' if self.settings.api_key else 'unset'})"

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> ChatResult:
        """The reply to ``messages``; raises :class:`ChatError` when it cannot be had."""
        self._client.stats = self.stats  # whatever object the caller counts in now
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if top_p is not None:
            body["top_p"] = top_p
        if seed is not None:
            body["seed"] = seed
        body.update(self.extra_body)
        try:
            completion = await self._client.complete(body)
        except ChatError:
            self.stats.failures += 1
            raise
        text, choice = completion_text(completion)
        url = self._client.url
        if choice is None:
            self.stats.failures += 1
            raise ChatError(f"the response from {url} has no choices")
        if not isinstance(text, str):
            self.stats.failures += 1
            raise ChatError(f"the response from {url} has no message content")
        usage = getattr(completion, "usage", None)
        return ChatResult(
            text,
            int(getattr(usage, "prompt_tokens", 0) or 0),
            int(getattr(usage, "completion_tokens", 0) or 0),
            getattr(choice, "finish_reason", None),
        )

    async def aclose(self) -> None:
        await self._client.aclose()
