"""One client for every OpenAI-compatible ``/chat/completions`` server we talk to.

The moderation backend (:class:`~icm.moderation.backends.openai_compat.OpenAIBackend`),
the data pipeline's text LLM (:class:`~icm.data.llm.TextClient`), the MEQ judge
(:class:`~icm.evaluation.meq_judge.Judge`) and chat streaming all send their requests
through :class:`ChatClient`, configured by one :class:`ServerSettings`.  Under it is the
official ``openai`` SDK's ``AsyncOpenAI`` (vLLM, SGLang, Ollama, LM Studio, llama.cpp's
server, OpenAI): it retries 408/409/429/5xx, connection errors and timeouts, honours
``Retry-After``, types the responses (logprobs included) and parses server-sent events.

What the SDK lacks is kept here, small: a bounded number of requests in flight per event
loop, counts of requests, retries and tokens (:class:`ChatUsage`), a configurable backoff
with full jitter (``Retry-After`` is a minimum, jittered on top, so clients told to wait
do not come back in a burst), a retry of a success whose body is not JSON (as for a 5xx),
requests without any ``Authorization`` header for local servers without a key, and one
error type (:class:`ChatError`) whose message names the HTTP status and the server's own
message (OpenAI, vLLM and FastAPI error shapes), a dropped or truncated answer as such,
and ``(gave up after N attempts)`` for transient failures that outlived their retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import weakref
from collections.abc import AsyncIterator, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from icm.openai_retry import (
    RETRY_STATUSES,
    backoff,
    is_retryable_status,
    retry_after,
    retry_wait,
    server_message,
    transport_failure,
)
from icm.redact import redact_text, redact_url

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "RETRY_STATUSES",
    "ChatClient",
    "ChatError",
    "ChatUsage",
    "ServerSettings",
    "api_key_from_env",
    "backoff",
    "base_url_from_env",
    "env_first",
    "is_retryable_status",
    "retry_after",
    "retry_wait",
    "server_message",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
BASE_URL_ENV = ("ICM_OPENAI_BASE_URL", "OPENAI_BASE_URL")
API_KEY_ENV = ("ICM_OPENAI_API_KEY", "OPENAI_API_KEY")

# Parameters the SDK's ``chat.completions.create`` takes by name; anything else in a
# request body (vLLM's ``guided_choice``, ``chat_template_kwargs`` ...) goes in ``extra_body``.
_SDK_PARAMS = frozenset(
    {"max_tokens", "temperature", "top_p", "seed", "logprobs", "top_logprobs", "response_format", "stop", "n",
     "presence_penalty", "frequency_penalty", "logit_bias", "user", "max_completion_tokens"}
)


# --------------------------------------------------------------------------- environment


def env_first(*names: str) -> str | None:
    """The value of the first of ``names`` set to a non-empty string in the environment."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def base_url_from_env(base_url: str | None = None, env: Collection[str] = BASE_URL_ENV, default: str = DEFAULT_BASE_URL) -> str:
    """``base_url``, else the first of ``env`` set (``$ICM_OPENAI_BASE_URL`` / ``$OPENAI_BASE_URL``), else ``default``."""
    return (base_url or env_first(*env) or default).rstrip("/")


def api_key_from_env(api_key: str | None = None, env: Collection[str] = API_KEY_ENV) -> str | None:
    """``api_key``, else the first of ``env`` set (``$ICM_OPENAI_API_KEY`` / ``$OPENAI_API_KEY``); None when unset."""
    return api_key or env_first(*env)


# --------------------------------------------------------------------------- settings


class ServerSettings(BaseModel):
    """How to reach one OpenAI-compatible server: the one object every client is built from.

    ``api_key`` is a :class:`~pydantic.SecretStr` (never shown in ``repr`` or dumps); no
    key means no ``Authorization`` header at all (local servers).  ``max_concurrency``
    bounds the requests in flight per event loop; ``timeout`` is per HTTP request;
    ``max_retries`` extra attempts of transient failures, waiting a random time up to
    ``backoff_base * 2**attempt`` (capped at ``max_backoff``: "full jitter"), or the
    server's ``Retry-After`` (capped at ``max_backoff``) plus a random time up to as much
    again (see :func:`retry_wait`).  ``extra_headers`` go with every request,
    ``extra_body`` is merged into every request body.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = DEFAULT_BASE_URL
    api_key: SecretStr | None = None
    model: str | None = None
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    backoff_base: float = Field(default=0.5, ge=0)
    max_backoff: float = Field(default=30.0, ge=0)
    max_concurrency: int = Field(default=8, ge=1)
    extra_headers: dict[str, str] = Field(default_factory=dict)
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_env(
        cls,
        *,
        base_url: str | None = None,
        api_key: str | SecretStr | None = None,
        base_url_env: Collection[str] = BASE_URL_ENV,
        api_key_env: Collection[str] = API_KEY_ENV,
        default_base_url: str = DEFAULT_BASE_URL,
        **fields: Any,
    ) -> ServerSettings:
        """Settings with the base URL and key taken from the arguments, else the environment."""
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        key = api_key_from_env(key, api_key_env)
        return cls(
            base_url=base_url_from_env(base_url, base_url_env, default_base_url),
            api_key=SecretStr(key) if key else None,
            **fields,
        )

    @property
    def url(self) -> str:
        """The chat-completions endpoint (for messages)."""
        return f"{self.base_url.rstrip('/')}/chat/completions"

    def secret(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None


# --------------------------------------------------------------------------- records


@dataclass
class ChatUsage:
    """Running totals for one client object (for run summaries and cost estimates).

    ``requests`` counts HTTP requests sent (retries included), ``retries`` the repeated
    ones, ``failures`` the items that got no answer (request failed after its retries,
    or the answer could not be read), ``parsed_fallbacks`` the answers read from text
    because the server gave no usable logprobs.  The client counts requests, retries
    and tokens; failures and fallbacks are counted by its users.
    """

    requests: int = 0
    retries: int = 0
    failures: int = 0
    parsed_fallbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_tokens": self.total_tokens}


class ChatError(Exception):
    """A request that failed for good (after its retries, at once for other 4xx) or an
    answer that cannot be read.

    ``status`` is the HTTP status when the server answered with one, ``retryable`` whether
    the last failure was a transient one, ``raw`` what could be kept of the response,
    ``attempts`` the HTTP requests it took and ``kind`` what went wrong: ``"connect"`` (no
    connection could be made: the server cannot be reached), ``"connection"`` (another
    transport error), ``"dropped"`` (the request was taken and the connection closed
    without a response), ``"truncated"`` (the answer was cut off), ``"timeout"``,
    ``"status"`` (an HTTP error status), ``"malformed"`` (a 200 whose body is not JSON or
    not a completion), or None.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        raw: dict[str, Any] | None = None,
        *,
        retryable: bool = False,
        attempts: int = 0,
        kind: str | None = None,
    ) -> None:
        super().__init__(redact_text(message))  # a base URL's user:password@ never reaches a message
        self.status = status
        self.raw = raw or {}
        self.retryable = retryable
        self.attempts = attempts
        self.kind = kind


# --------------------------------------------------------------------------- the client

async def retry_sleep(seconds: float) -> None:
    """Every wait before a retry goes through here (tests patch it to record the waits)."""
    await asyncio.sleep(seconds)


# HTTP requests sent by the current call (an httpx event hook counts into it).
_ATTEMPTS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("icm_chat_attempts", default=None)


def _sdk_client_class() -> type:
    """``AsyncOpenAI`` with our backoff (imported on first use: ``import openai`` took 0.7-1.2 s here)."""
    global _SDK_CLASS
    if _SDK_CLASS is None:
        from openai import AsyncOpenAI

        class _IcmAsyncOpenAI(AsyncOpenAI):
            # Ours, not the SDK's: its backoff is fixed (0.5 s doubling to 8 s, Retry-After
            # up to 2 min); ours is the user's --backoff and caps Retry-After at max_backoff.
            icm_settings: ServerSettings
            icm_extra_retry: frozenset[int] = frozenset()

            def _calculate_retry_timeout(self, remaining_retries: int, options: Any, response_headers: Any = None) -> float:
                s = self.icm_settings
                attempt = max(0, options.get_max_retries(self.max_retries) - remaining_retries)
                return retry_wait(s, attempt, retry_after(response_headers))

            async def _sleep_for_retry(self, *, retries_taken: int, max_retries: int, options: Any, response: Any) -> None:
                headers = response.headers if response is not None else None
                await _sleep(self._calculate_retry_timeout(max_retries - retries_taken, options, headers))

            def _should_retry(self, response: Any) -> bool:
                if response.status_code in self.icm_extra_retry:
                    return True
                return bool(super()._should_retry(response))

        _SDK_CLASS = _IcmAsyncOpenAI
    return _SDK_CLASS


_SDK_CLASS: type | None = None


@dataclass
class _LoopState:
    sdk: Any
    sem: asyncio.Semaphore


class ChatClient:
    """Chat completions on one server, for use inside any event loop.

    The SDK client (with its ``httpx`` connection pool) and the semaphore are made on
    first use in the running event loop and belong to it; a client used from several
    loops keeps one of each per loop.  :meth:`aclose` closes the current loop's.

    Args:
        settings: where and how to send (see :class:`ServerSettings`).
        stats: the :class:`ChatUsage` to count into (shared with the caller).
        transport: an ``httpx`` transport (tests use ``httpx.MockTransport``).
        retry_malformed_json: retry a success whose body is not JSON, within the same
            retry budget, as a 5xx is (the moderation backend and the judge do; else it fails at once).
        extra_retry_statuses: 4xx statuses retried besides the SDK's 408, 409 and 429.
        message_limit: the most characters of the server's error message kept.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        stats: ChatUsage | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_malformed_json: bool = False,
        extra_retry_statuses: Collection[int] = (),
        message_limit: int = 500,
    ) -> None:
        self.settings = settings
        self.stats = stats if stats is not None else ChatUsage()
        self._transport = transport
        self.retry_malformed_json = retry_malformed_json
        self.extra_retry_statuses = frozenset(extra_retry_statuses)
        self.message_limit = message_limit
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"ChatClient(url={redact_url(self.settings.url)!r}, api_key={'set' if self.settings.api_key else 'unset'})"

    @property
    def url(self) -> str:
        return self.settings.url

    # ------------------------------------------------------------------ per loop

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            s = self.settings
            owner = self

            async def count(request: httpx.Request) -> None:
                owner.stats.requests += 1
                box = _ATTEMPTS.get()
                if box is not None:
                    box[0] += 1

            http = httpx.AsyncClient(
                timeout=httpx.Timeout(s.timeout),
                limits=httpx.Limits(max_connections=s.max_concurrency, max_keepalive_connections=s.max_concurrency),
                transport=self._transport,
                event_hooks={"request": [count]},
            )
            cls = _sdk_client_class()
            sdk = cls(
                base_url=s.base_url,
                # The SDK insists on a key; without one each request omits the header (see _headers).
                api_key=s.secret() or "no-key",
                max_retries=s.max_retries,
                timeout=s.timeout,
                http_client=http,
            )
            sdk.icm_settings = s
            sdk.icm_extra_retry = self.extra_retry_statuses
            state = _LoopState(sdk, asyncio.Semaphore(s.max_concurrency))
            self._states[loop] = state
        return state

    def _headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = dict(self.settings.extra_headers)
        if self.settings.api_key is None:
            from openai import Omit

            headers["Authorization"] = Omit()
        return headers

    def _split(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``create(...)`` keyword arguments for a request body (unknown fields in ``extra_body``)."""
        merged = {**body, **self.settings.extra_body}
        model = merged.pop("model", None) or self.settings.model
        if not model:
            raise ChatError("no model name for the request")
        kwargs: dict[str, Any] = {"model": model, "messages": merged.pop("messages")}
        extra = {k: merged.pop(k) for k in list(merged) if k not in _SDK_PARAMS and k != "stream"}
        kwargs.update(merged)
        if extra:
            kwargs["extra_body"] = extra
        kwargs["extra_headers"] = self._headers()
        return kwargs

    # ------------------------------------------------------------------ calls

    async def complete(self, body: Mapping[str, Any]) -> Any:
        """One chat completion (an SDK ``ChatCompletion``) with retries, or :class:`ChatError`."""
        completion, _ = await self.complete_counted(body)
        return completion

    @contextlib.contextmanager
    def _counting(self) -> Iterator[list[int]]:
        """Count the HTTP requests of one call (the event hook adds to the box); retries go to the stats."""
        box = [0]
        token = _ATTEMPTS.set(box)
        try:
            yield box
        finally:
            try:
                _ATTEMPTS.reset(token)
            except ValueError:  # a stream closed from another context
                pass
            self.stats.retries += max(0, box[0] - 1)

    async def complete_counted(self, body: Mapping[str, Any]) -> tuple[Any, int]:
        """:meth:`complete`, also giving the number of HTTP requests it took."""
        state = self._state()
        kwargs = self._split(body)
        try:
            with self._counting() as box:
                async with state.sem:
                    while True:
                        try:
                            completion = await state.sdk.chat.completions.create(**kwargs)
                            break
                        except json.JSONDecodeError:
                            # Ours: the SDK never retries a success it cannot parse; we do, as a 5xx,
                            # within the same budget of attempts.
                            if not self.retry_malformed_json or box[0] > self.settings.max_retries:
                                raise
                            await _sleep(backoff(self.settings, box[0] - 1))
        except Exception as exc:  # noqa: BLE001 - every failure becomes one ChatError
            raise self._error(exc, box[0]) from None
        attempts = max(1, box[0])
        usage = getattr(completion, "usage", None)
        self.stats.prompt_tokens += _int(getattr(usage, "prompt_tokens", 0))
        self.stats.completion_tokens += _int(getattr(usage, "completion_tokens", 0))
        if not hasattr(completion, "choices"):  # a server that answered a JSON string or list
            raise ChatError(f"the response from {self.url} is not a chat completion", raw={"response": completion},
                            attempts=attempts, kind="malformed")
        return completion, attempts

    async def stream(self, body: Mapping[str, Any]) -> AsyncIterator[str]:
        """The answer's text pieces as the server streams them (``"stream": true``).

        A server that answers with a plain JSON completion instead gives its whole text
        as one piece.  Failures (after the SDK's retries) raise :class:`ChatError`.
        """
        state = self._state()
        kwargs = self._split(body)
        with self._counting() as box:
            async with state.sem:
                try:
                    async with state.sdk.chat.completions.with_streaming_response.create(**kwargs, stream=True) as resp:
                        if "text/event-stream" not in resp.headers.get("content-type", ""):
                            data = await resp.json()
                            text = _dict_text(data)
                            if text:
                                yield text
                            return
                        async for chunk in await resp.parse():
                            err = getattr(chunk, "error", None) or (chunk.model_extra or {}).get("error")
                            if err:
                                raise ChatError(f"the server reported an error: {err}")
                            for choice in chunk.choices or []:
                                piece = choice.delta.content if choice.delta is not None else None
                                if piece:
                                    yield piece
                            usage = getattr(chunk, "usage", None)
                            if usage is not None:
                                self.stats.prompt_tokens += _int(getattr(usage, "prompt_tokens", 0))
                                self.stats.completion_tokens += _int(getattr(usage, "completion_tokens", 0))
                except ChatError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure becomes one ChatError
                    raise self._error(exc, box[0]) from None

    def _error(self, exc: BaseException, attempts: int) -> ChatError:
        """Our :class:`ChatError` for what the SDK (or the response) raised."""
        import openai

        url = self.url
        attempts = max(1, attempts)
        gave_up = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            msg = f"HTTP {status} from {url}: {server_message(exc.response, self.message_limit)}"
            retryable = is_retryable_status(status) or status in self.extra_retry_statuses
            return ChatError(msg + (gave_up if retryable else ""), status, retryable=retryable, attempts=attempts,
                             kind="status")
        if isinstance(exc, openai.APITimeoutError):
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "timeout"
            msg = f"request timed out after {self.settings.timeout:g}s ({cause})"
            return ChatError(msg + gave_up, retryable=True, attempts=attempts, kind="timeout")
        if isinstance(exc, openai.APIConnectionError):
            err = exc.__cause__ or exc
            kind, what = transport_failure(err)
            if kind == "dropped":
                msg = f"dropped answer: {url} took the request and closed the connection without a response"
            elif kind == "truncated":
                msg = f"truncated answer: {url} closed the connection in the middle of its answer"
            else:
                msg = "connection error"
            return ChatError(f"{msg}: {what}{gave_up}", retryable=True, attempts=attempts, kind=kind)
        if isinstance(exc, json.JSONDecodeError):
            doc = exc.doc or ""
            if not doc.strip():
                msg = f"empty answer: HTTP 200 without a body from {url}"
            elif exc.pos >= len(doc.rstrip()) or exc.msg.startswith("Unterminated string"):  # the input ran out
                msg = f"truncated answer: the JSON from {url} ends after {len(doc)} characters, unfinished"
            else:
                msg = f"malformed JSON in the response from {url} (HTTP 200: {doc.strip()[:60]!r})"
            return ChatError(msg + gave_up, 200, retryable=True, attempts=attempts, kind="malformed")
        if isinstance(exc, openai.OpenAIError):
            return ChatError(f"{type(exc).__name__}: {exc}", attempts=attempts)
        return ChatError(f"unexpected {type(exc).__name__}: {exc}", attempts=attempts)

    async def aclose(self) -> None:
        """Close the current loop's SDK client; the client can be used again."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        state = self._states.pop(loop, None)
        if state is not None:
            await state.sdk.close()

    def reset(self) -> None:
        """Forget every loop's SDK client without closing them (their loops are gone)."""
        self._states.clear()


async def _sleep(seconds: float) -> None:
    await retry_sleep(seconds)  # looked up at each call, so a patched retry_sleep is used


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _dict_text(data: Any) -> str:
    """The message text of a plain-JSON chat completion (the streaming fallback)."""
    try:
        choice = data["choices"][0]
    except (TypeError, KeyError, IndexError):
        return ""
    if not isinstance(choice, dict):
        return ""
    text = (choice.get("message") or {}).get("content")
    if text is None and isinstance(choice.get("text"), str):
        text = choice["text"]
    return text if isinstance(text, str) else ""


def completion_text(completion: Any) -> tuple[Any, Any]:
    """``(message text, choice)`` of a completion's first choice; ``(None, None)`` without choices.

    The text is ``message.content`` (text parts joined when a server sends a list), or
    the completions-style ``text`` some servers put on the choice instead.
    """
    choices = getattr(completion, "choices", None) or []
    if not choices:
        return None, None
    choice = choices[0]
    message = getattr(choice, "message", None)
    text = getattr(message, "content", None) if message is not None else None
    if isinstance(text, list):
        text = "".join(p.get("text", "") if isinstance(p, dict) else str(getattr(p, "text", "")) for p in text)
    if text is None:
        extra = getattr(choice, "model_extra", None) or {}
        if isinstance(extra.get("text"), str):
            text = extra["text"]
    return text, choice


def dump(obj: Any) -> Any:
    """A response as plain data (for error records)."""
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        try:
            return to_dict()
        except Exception:  # noqa: BLE001 - best effort for a record
            return repr(obj)
    return obj


__all__ += ["completion_text", "dump", "retry_sleep", "transport_failure"]
