"""A backend for any OpenAI-compatible chat-completions server.

Works with vLLM, SGLang, Ollama, LM Studio, llama.cpp's server and OpenAI itself: the
image is sent as a ``data:`` URL in an ``image_url`` content part of the first user
message, through :class:`~icm.openai_http.ChatClient` (the ``openai`` SDK's
``AsyncOpenAI``).  How a response becomes an answer (logprobs over the labels, the
label-mass rule, refusals, text answers) is in
:mod:`icm.moderation.backends.openai_parsing`; building, sending and reading one request in
:mod:`icm.moderation.backends.openai_requests`; its options (the spec) in
:mod:`icm.moderation.backends.openai_options`.

The backend is asynchronous at its core (:meth:`OpenAIBackend.ask_async`,
:meth:`~OpenAIBackend.score_yes_no_async`, :meth:`~OpenAIBackend.choose_async`,
:meth:`~OpenAIBackend.generate_async`, :meth:`~OpenAIBackend.stream_async`): every
request of a batch runs concurrently, bounded by ``max_concurrency``.  The synchronous
API of :class:`~icm.moderation.backends.base.Backend` runs the same coroutines on an event
loop owned by the backend (:class:`~icm.aio.LoopThread`), so it works from plain code,
worker threads and inside a running event loop alike.

Transient failures (408, 409, 429, 5xx, a 200 whose body is not JSON, dropped or
truncated answers, connection errors, timeouts) are retried with exponential backoff and
full jitter; ``Retry-After`` is waited at least, with jitter on top; other 4xx fail at once.  A
request that still fails gives :class:`~icm.moderation.backends.base.Failed` for that
item (the engine makes its image an error record) and an :class:`ItemError` in
:attr:`OpenAIBackend.last_errors`: one bad image never fails the batch.  401, 403 and 404
(a rejected key, an unknown model or a wrong URL), and a server no connection could be made
to before it ever answered (not one that dropped or cut off its answers), raise
:class:`~icm.moderation.backends.base.BackendConfigError` instead: no image can succeed.
With ``guided_choice`` the server is asked to constrain the answer to the labels (vLLM's
``structured_outputs``/``guided_choice``, SGLang's ``regex``); a server that rejects the
field is remembered and asked without it from then on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Literal, TypeVar

from PIL import Image

from icm.aio import LoopThread
from icm.moderation.backends.base import (
    DEFAULT_MIN_LABEL_MASS,
    DEFAULT_TEXT_CONFIDENCE,
    Answer,
    Backend,
    BackendConfigError,
    Capability,
    Choice,
    Failed,
    Message,
    NotJudged,
    Query,
    YesNoScore,
)
from icm.moderation.backends.openai_parsing import (
    choice_from_logprobs,
    first_token_candidates,
    is_refusal,
    parse_choice_text,
    parse_yes_no_text,
    yes_no_from_logprobs,
)
from icm.moderation.backends.openai_requests import ItemError, OpenAIRequests, _Result, _split, encode_image
from icm.moderation.spec import GUIDED_CHOICE_STYLES
from icm.openai_http import (
    DEFAULT_BASE_URL,
    ChatClient,
    ChatError,
    ChatUsage,
    ServerSettings,
    completion_text,
    dump,
    env_first,
)
from icm.policy.prompts_format import moderation_choice_prompt, option_labels, yes_no_prompt
from icm.redact import redact_url

__all__ = [
    "DEFAULT_BASE_URL",
    "ItemError",
    "OpenAIBackend",
    "OpenAIUsage",
    "choice_from_logprobs",
    "encode_image",
    "first_token_candidates",
    "is_refusal",
    "parse_choice_text",
    "parse_yes_no_text",
    "yes_no_from_logprobs",
]

log = logging.getLogger(__name__)

CONFIG_STATUSES = frozenset({401, 403, 404})  # a rejected key, no access, an unknown model or URL
_T = TypeVar("_T")


# --------------------------------------------------------------------------- records

# Running totals for one backend object: the client's record, under its old name.
OpenAIUsage = ChatUsage


# --------------------------------------------------------------------------- backend



class OpenAIBackend(OpenAIRequests, Backend):
    """Moderation through an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: the served model name (``--served-model-name`` for vLLM); default from
            ``ICM_OPENAI_MODEL``.
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``; default from
            ``ICM_OPENAI_BASE_URL`` / ``OPENAI_BASE_URL``.
        api_key: sent as ``Authorization: Bearer``; default from ``ICM_OPENAI_API_KEY`` /
            ``OPENAI_API_KEY``; never logged or shown in ``repr``.
        max_concurrency: requests in flight at once (shared by all calls on this object).
        timeout: seconds per HTTP request.
        max_retries: extra attempts for 408/409/429/5xx, connection errors and timeouts.
        backoff_base / max_backoff: the retry delay is ``backoff_base * 2**attempt``
            (capped at ``max_backoff``) with jitter; ``Retry-After`` wins when given
            (also capped at ``max_backoff``).
        settings: a :class:`~icm.openai_http.ServerSettings` instead of the six
            arguments above (its ``model`` is used when ``model`` is not given).
        image_detail: the ``detail`` field of image parts (OpenAI: "low"/"high"/"auto");
            omitted when None.
        max_image_side: downscale images whose longer side exceeds this (None: never).
        image_format: "auto" (PNG for images with transparency, else JPEG), "jpeg", "png".
        top_logprobs: candidates requested for the first token (OpenAI and vLLM's default
            ``--max-logprobs`` allow at most 20).
        use_logprobs: set False for servers that reject the ``logprobs`` parameter; the
            answers are then read from text (``source="text"``).
        text_confidence: the probability an answer read from text gives the label it
            names (one sampled answer is never P = 0 or 1); default 0.75, see
            :data:`~icm.moderation.backends.base.DEFAULT_TEXT_CONFIDENCE`.
        min_label_mass: the least first-token probability the valid labels (Yes/No, or
            the option labels) must hold together for the logprobs to be an answer
            (default 0.5); below it the answer text decides: a refusal or anything that
            is not a clear answer is not judged.
        answer_tokens: ``max_tokens`` of a scoring request: enough to read a verbose or
            refusing answer ("The answer is (B).", "I'm sorry, but ..."); the
            probabilities come from the first token only.
        guided_choice: ask the server to constrain answers to the labels: ``"off"``
            (default), ``"structured_outputs"`` (vLLM >= 0.10: ``structured_outputs:
            {"choice": [...]}``), ``"guided_choice"`` (older vLLM) or ``"regex"``
            (SGLang). A server that rejects the field (HTTP 400/422) is asked without it
            from then on.
        system_prompt: an optional system message for yes/no and choice questions.
        extra_body: merged into every request body (e.g. vLLM's
            ``{"chat_template_kwargs": {"enable_thinking": False}}``).
    """

    name = "openai"
    text_stream = "method"  # icm chat streams through self.stream (the SDK's server-sent events)
    merges_policies = True  # ask() takes any queries: a bundle asks once for all its policies
    capabilities: frozenset[Capability] = frozenset({"score_yes_no", "choose", "generate"})

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        max_backoff: float = 30.0,
        settings: ServerSettings | None = None,
        image_detail: str | None = None,
        max_image_side: int | None = 1024,
        image_format: Literal["auto", "jpeg", "png"] = "auto",
        jpeg_quality: int = 90,
        top_logprobs: int = 20,
        use_logprobs: bool = True,
        min_label_mass: float = DEFAULT_MIN_LABEL_MASS,
        text_confidence: float = DEFAULT_TEXT_CONFIDENCE,
        answer_tokens: int = 16,
        guided_choice: Literal["off", "structured_outputs", "guided_choice", "regex"] | bool = "off",
        system_prompt: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        model = model or (settings.model if settings is not None else None) or env_first("ICM_OPENAI_MODEL")
        if not model:
            raise ValueError("OpenAIBackend needs a model name (argument or ICM_OPENAI_MODEL)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if settings is None:
            settings = ServerSettings.from_env(
                base_url=base_url, api_key=api_key, max_concurrency=max_concurrency, timeout=float(timeout),
                max_retries=max_retries, backoff_base=float(backoff_base), max_backoff=float(max_backoff),
            )
        self.model = model
        self.image_detail = image_detail
        self.max_image_side = max_image_side
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.top_logprobs = top_logprobs
        self.use_logprobs = use_logprobs
        if not 0.0 <= min_label_mass <= 1.0:
            raise ValueError(f"min_label_mass must be between 0 and 1, got {min_label_mass}")
        if not 0.5 <= text_confidence <= 1.0:
            raise ValueError(f"text_confidence must be between 0.5 and 1, got {text_confidence}")
        self.text_confidence = float(text_confidence)
        if answer_tokens < 1:
            raise ValueError("answer_tokens must be at least 1")
        if guided_choice is True:
            guided_choice = "structured_outputs"
        elif guided_choice is False or guided_choice is None:
            guided_choice = "off"
        if guided_choice not in GUIDED_CHOICE_STYLES:
            raise ValueError(f"guided_choice must be one of {', '.join(GUIDED_CHOICE_STYLES)}; got {guided_choice!r}")
        self.min_label_mass = float(min_label_mass)
        self.answer_tokens = int(answer_tokens)
        self.guided_choice = str(guided_choice)
        self.guided_rejected: str | None = None  # the server's message when it rejected guided output
        self._answered = False  # has any request ever been answered (for "cannot reach the server")
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body or {})
        self.stats = OpenAIUsage()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._runner = LoopThread("icm-openai-backend")
        self._client = ChatClient(settings, stats=self.stats, retry_malformed_json=True)  # a 200 that is not JSON: as a 5xx

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={redact_url(self.base_url)!r}, "
            f"api_key={'set' if self.settings.api_key else 'unset'}, max_concurrency={self.max_concurrency})"
        )

    # ------------------------------------------------------------------ settings

    @property
    def settings(self) -> ServerSettings:
        return self._client.settings

    @settings.setter
    def settings(self, value: ServerSettings) -> None:
        """New settings take effect with a fresh client (the old one is closed on the backend's loop)."""
        old = self._client
        self._client = ChatClient(value, stats=self.stats, retry_malformed_json=True)
        if self._runner.in_loop_thread() or not self._runner.started:
            return  # nothing opened on the backend's loop yet (or we are on it: the old client is left to the GC)
        try:
            self._runner.run(old.aclose())
        except Exception:  # best effort: the old client is being replaced either way
            log.debug("closing the old client failed", exc_info=True)

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    @base_url.setter
    def base_url(self, value: str) -> None:
        self.settings = self.settings.model_copy(update={"base_url": value.rstrip("/")})

    @property
    def max_concurrency(self) -> int:
        return self.settings.max_concurrency

    @property
    def timeout(self) -> float:
        return self.settings.timeout

    @property
    def max_retries(self) -> int:
        return self.settings.max_retries

    @property
    def model_id(self) -> str:
        return f"{self.model}@{redact_url(self.base_url)}"  # no user:password@ in records

    @property
    def last_errors(self) -> list[ItemError]:
        """Per-item errors of this thread's most recent synchronous call (empty when all answered)."""
        return list(getattr(self._local, "errors", []))

    # ------------------------------------------------------------------ async API

    async def score_yes_no_async(
        self, images: Sequence[Image.Image], questions: Sequence[str]
    ) -> list[YesNoScore | NotJudged | Failed]:
        answers, errors = await self._score_yes_no(images, questions)
        self._settle(errors, len(answers))
        return answers

    async def choose_async(
        self, images: Sequence[Image.Image], question: str, options: Sequence[str]
    ) -> list[Choice | NotJudged | Failed]:
        answers, errors = await self._choose(images, question, options)
        self._settle(errors, len(answers))
        return answers

    async def ask_async(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Answer]]:
        """All queries about all images in one concurrent pass; each image encoded once."""
        answers, errors = await self._ask(images, queries)
        self._settle(errors, len(images) * len(queries))
        return answers

    async def generate_async(
        self,
        images: Sequence[Image.Image],
        messages: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[str | Failed]:
        """Completion text per (image, conversation), or :class:`Failed` saying why there is none."""
        answers, errors = await self._generate(images, messages, max_new_tokens, temperature, top_p, seed)
        self._settle(errors, len(answers))
        return answers

    async def stream_async(
        self,
        image: Image.Image,
        messages: Sequence[Message],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> AsyncIterator[str]:
        """The next assistant message's text pieces as the server streams them.

        Raises :class:`~icm.openai_http.ChatError` when the request fails (after retries).
        """
        conv = self._attach_image(list(messages), self._encode(image))
        body: dict[str, Any] = {"messages": conv, **self._generation_params(max_new_tokens, temperature, top_p, seed)}
        async for piece in self._client.stream({"model": self.model, **body, **self.extra_body}):
            yield piece

    async def aclose(self) -> None:
        """Close the HTTP client of the running event loop (for callers of the async API)."""
        await self._client.aclose()

    # ------------------------------------------------------------------ sync API

    def score_yes_no(
        self, images: Sequence[Image.Image], questions: Sequence[str]
    ) -> list[YesNoScore | NotJudged | Failed]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        return self.score_prompts_yes_no(images, [yes_no_prompt(q) for q in questions])

    def score_prompts_yes_no(
        self, images: Sequence[Image.Image], prompts: Sequence[str]
    ) -> list[YesNoScore | NotJudged | Failed]:
        """P(Yes) for ``prompts[i]`` about ``images[i]``, each prompt sent exactly as written."""
        answers, errors = self._sync(self._score_prompts(images, prompts))
        self._settle(errors, len(answers))
        return answers

    def choose(
        self, images: Sequence[Image.Image], question: str, options: Sequence[str]
    ) -> list[Choice | NotJudged | Failed]:
        answers, errors = self._sync(self._choose(images, question, options))
        self._settle(errors, len(answers))
        return answers

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Answer]]:
        """All queries about all images in one concurrent pass; each image encoded once."""
        answers, errors = self._sync(self._ask(images, queries))
        self._settle(errors, len(images) * len(queries))
        return answers

    def generate(
        self,
        images: Sequence[Image.Image],
        messages: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[str | None]:
        """Completion text per (image, conversation); deterministic (greedy) by default."""
        answers, errors = self._sync(self._generate(images, messages, max_new_tokens, temperature, top_p, seed))
        self._settle(errors, len(answers))
        return [None if isinstance(a, Failed) else a for a in answers]

    def stream(
        self,
        image: Image.Image,
        messages: Sequence[Message],
        on_token: Callable[[str], None],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> str:
        """Generate the next assistant message, calling ``on_token`` with each piece (on the
        backend's loop thread); the whole text. Raises :class:`~icm.openai_http.ChatError`."""

        async def run() -> str:
            pieces: list[str] = []
            async for piece in self.stream_async(
                image, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
            ):
                pieces.append(piece)
                on_token(piece)
            return "".join(pieces)

        return self._runner.run(run()).strip()

    def close(self) -> None:
        """Close the HTTP client and stop the backend's event-loop thread."""
        self._runner.close(self._client.aclose)
        self._client.reset()

    # ------------------------------------------------------------------ batches

    def _sync(self, coro: Coroutine[Any, Any, tuple[_T, list[ItemError]]]) -> tuple[_T, list[ItemError]]:
        """Run a batch on the backend's loop; its errors become this thread's :attr:`last_errors`."""
        self._local.errors = []
        answers, errors = self._runner.run(coro)
        self._local.errors = errors
        return answers, errors

    async def _score_yes_no(self, images: Sequence[Image.Image], questions: Sequence[str]) -> tuple[list[Any], list[ItemError]]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        return await self._score_prompts(images, [yes_no_prompt(q) for q in questions])

    async def _score_prompts(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[list[Any], list[ItemError]]:
        """Yes/no scoring of each prompt as written (:meth:`_score_yes_no` writes icm's around a question)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        urls = self._encode_all(images)
        return _split(await asyncio.gather(*(self._score_task(i, None, urls[i], p, None, ()) for i, p in enumerate(prompts))))

    async def _choose(
        self, images: Sequence[Image.Image], question: str, options: Sequence[str]
    ) -> tuple[list[Any], list[ItemError]]:
        labels = option_labels(len(options))
        prompt = moderation_choice_prompt(question, options)
        urls = self._encode_all(images)
        return _split(await asyncio.gather(
            *(self._score_task(i, None, url, prompt, labels, tuple(options)) for i, url in enumerate(urls))
        ))

    async def _ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> tuple[list[dict[str, Answer]], list[ItemError]]:
        prepared: list[tuple[Query, str, list[str] | None]] = []
        for q in queries:
            if q.kind == "yes_no":
                prepared.append((q, yes_no_prompt(q.question), None))
            elif q.kind == "choice":
                prepared.append((q, moderation_choice_prompt(q.question, q.options), option_labels(len(q.options))))
            else:
                raise ValueError(f"unknown query kind {q.kind!r}")
        urls = self._encode_all(images)
        tasks = [
            self._score_task(i, q.key, url, prompt, labels, q.options)
            for i, url in enumerate(urls)
            for q, prompt, labels in prepared
        ]
        flat, errors = _split(await asyncio.gather(*tasks))
        out: list[dict[str, Answer]] = [{} for _ in images]
        it = iter(flat)
        for slot in out:
            for q, _, _ in prepared:
                slot[q.key] = next(it)
        return out, errors

    async def _generate(
        self,
        images: Sequence[Image.Image],
        messages: Sequence[Sequence[Message]],
        max_new_tokens: int,
        temperature: float,
        top_p: float | None,
        seed: int | None,
    ) -> tuple[list[Any], list[ItemError]]:
        if len(images) != len(messages):
            raise ValueError(f"{len(images)} images but {len(messages)} conversations")
        urls = self._encode_all(images)
        convs = [self._attach_image(list(m), url) for m, url in zip(messages, urls, strict=True)]
        params = self._generation_params(max_new_tokens, temperature, top_p, seed)

        async def one(i: int, conv: list[Message]) -> _Result:
            try:
                completion = await self._request({"messages": conv, **params})
                text, _ = completion_text(completion)
                if not isinstance(text, str):
                    raise ChatError("the response has no message content", raw={"response": dump(completion)})
                return text, None
            except ChatError as e:
                return Failed(str(e), e.status, e.raw), ItemError(i, str(e), None, e.status, e.raw, e.kind)
            except Exception as e:  # noqa: BLE001 - an odd response must not fail the batch
                msg = f"unexpected {type(e).__name__}: {e}"
                return Failed(msg), ItemError(i, msg)

        return _split(await asyncio.gather(*(one(i, c) for i, c in enumerate(convs))))

    def _settle(self, errors: list[ItemError], total: int) -> None:
        """Count and log the errors of a batch of ``total`` requests; a configuration error stops the job here."""
        with self._lock:  # callers in several threads may finish at once
            self.stats.failures += len(errors)
        config = next((e for e in errors if e.status in CONFIG_STATUSES), None)
        if config is not None:
            what = {401: "the API key was rejected", 403: "access was refused", 404: "the model or the URL does not exist"}
            raise BackendConfigError(
                f"openai backend: {what.get(config.status or 0, 'the server refused the request')} "
                f"(model {self.model!r} at {redact_url(self.base_url)}): {config.error}"
            )
        if (
            errors
            and not self._answered
            and len(errors) == total
            and all(e.kind == "connect" for e in errors)
        ):
            raise BackendConfigError(
                f"openai backend: cannot reach the server at {redact_url(self.base_url)} (no request has ever been answered): "
                f"{errors[0].error}"
            )
        for err in errors:
            log.debug("openai backend: item %d%s failed: %s", err.index, f" ({err.key})" if err.key else "", err.error)
        if errors:
            log.warning(
                "openai backend: %d of %d requests failed (see last_errors); first: %s", len(errors), total, errors[0].error
            )
