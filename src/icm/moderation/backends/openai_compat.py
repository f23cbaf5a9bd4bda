"""A backend for any OpenAI-compatible chat-completions server.

Works with vLLM, SGLang, Ollama, LM Studio, llama.cpp's server and OpenAI itself: the
image is sent as a ``data:`` URL in an ``image_url`` content part of the first user
message, and only ``httpx`` is used (no ``openai`` SDK), through
:class:`~icm.openai_http.ChatTransport`.

Probabilities follow the paper's protocol as closely as an HTTP API allows: the model is
asked with ``logprobs``/``top_logprobs`` and P(Yes) is the softmax over the
log-probabilities of the "Yes" and "No" variants among the first token's top candidates
(see :func:`yes_no_from_logprobs`).  That softmax is only an answer when the labels hold
at least ``min_label_mass`` of the first token's probability (default 0.5): a model
whose first token is "I" (of "I'm sorry, but I can't help with that.") has not answered
Yes or No, however the two tiny remaining shares compare.  Otherwise, and for servers that
return no logprobs, the answer text (up to ``answer_tokens`` tokens) is read: a refusal
is :class:`NotJudged` ``refused``, a clear answer ("Yes", "yes, the image ...",
"B. Because ...", "The answer is (B).", "Answer: B") is used with ``source="parsed"``
(a 0/1 probability), anything else is ``off-format``; it is never guessed at.
With ``guided_choice`` the server is asked to constrain the answer to the labels
(vLLM's ``structured_outputs``/``guided_choice``, SGLang's ``regex``); a server that
rejects the field is remembered and asked without it from then on.

Every request of a batch runs concurrently (bounded by ``max_concurrency``) on an event
loop owned by the backend in a background thread, so the synchronous API works from
plain code, worker threads and from inside a running event loop alike.  Transient
failures (429, 408, 5xx, connection errors, timeouts) are retried with exponential
backoff and jitter, honouring ``Retry-After``; other 4xx fail at once.  A request that
still fails gives :class:`~icm.moderation.backends.base.Failed` for that item (the engine
makes its image an error record) and an :class:`ItemError` in
:attr:`OpenAIBackend.last_errors`: one bad image never fails the batch.  401, 403 and 404
(a rejected key, an unknown model or a wrong URL), and a server that cannot be reached by
any request before it ever answered, raise
:class:`~icm.moderation.backends.base.BackendConfigError` instead: no image can succeed.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import logging
import math
import os
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, Sequence, TypeVar

from PIL import Image

from icm.moderation.backends.base import (
    DEFAULT_MIN_LABEL_MASS,
    REFUSAL_FIRST_WORDS,
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
from icm.openai_http import (
    DEFAULT_BASE_URL,
    RETRY_STATUSES,
    ChatError,
    ChatTransport,
    ChatUsage,
    api_key_from_env,
    base_url_from_env,
    choice_text,
    env_first,
    first_choice,
)
from icm.policy.prompts_format import moderation_choice_prompt, option_labels, yes_no_prompt

__all__ = [
    "DEFAULT_BASE_URL",
    "ItemError",
    "OpenAIBackend",
    "OpenAIUsage",
    "choice_from_logprobs",
    "encode_image",
    "is_refusal",
    "parse_choice_text",
    "parse_yes_no_text",
    "yes_no_from_logprobs",
]

log = logging.getLogger(__name__)

RETRYABLE_STATUS = RETRY_STATUSES  # plus every 5xx
CONFIG_STATUSES = frozenset({401, 403, 404})  # a rejected key, no access, an unknown model or URL
GUIDED_CHOICE_STYLES = ("off", "structured_outputs", "guided_choice", "regex")
_T = TypeVar("_T")


# --------------------------------------------------------------------------- records

# Running totals for one backend object: the transport's record, under its old name.
OpenAIUsage = ChatUsage


@dataclass
class ItemError:
    """Why one item of the last call got ``None``.

    ``index`` is the image's position in the batch, ``key`` the query key for
    :meth:`OpenAIBackend.ask` (``None`` for the other calls), ``status`` the HTTP status
    when the server answered with an error, ``raw`` what could be kept of the response.
    """

    index: int
    error: str
    key: str | None = None
    status: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)


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


# --------------------------------------------------------------------------- logprobs

# Characters a tokenizer or a model may put around an answer token: leading spaces
# (" Yes"), byte-level/sentencepiece space markers, punctuation ("Yes.", "(A").
_TOKEN_STRIP = " \t\r\n.,!?:;\"'`*()[]{}<>_-"


def _norm_token(token: str) -> str:
    token = token.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n")
    return token.strip(_TOKEN_STRIP)


def _logsumexp(values: Sequence[float]) -> float:
    if not values:
        return -math.inf
    m = max(values)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(v - m) for v in values))


def _first_token_candidates(logprobs: Any) -> list[tuple[str, float]] | None:
    """``(token, logprob)`` candidates for the first generated token, or None.

    Reads the chat format (``logprobs.content[0].top_logprobs``, as vLLM, SGLang and
    OpenAI return it) and the legacy completions format (``logprobs.top_logprobs[0]`` a
    ``{token: logprob}`` dict).  The sampled token is added when the top list lacks it.
    """
    if not isinstance(logprobs, dict):
        return None
    out: list[tuple[str, float]] = []
    content = logprobs.get("content")
    if isinstance(content, list) and content:
        first = content[0] or {}
        for entry in first.get("top_logprobs") or []:
            tok, lp = entry.get("token"), entry.get("logprob")
            if isinstance(tok, str) and isinstance(lp, (int, float)):
                out.append((tok, float(lp)))
        tok, lp = first.get("token"), first.get("logprob")
        if isinstance(tok, str) and isinstance(lp, (int, float)) and tok not in {t for t, _ in out}:
            out.append((tok, float(lp)))
    elif isinstance(logprobs.get("top_logprobs"), list) and logprobs["top_logprobs"]:
        first_top = logprobs["top_logprobs"][0] or {}
        out = [(t, float(v)) for t, v in first_top.items() if isinstance(v, (int, float))]
        tokens, lps = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
        if tokens and lps and isinstance(lps[0], (int, float)) and tokens[0] not in first_top:
            out.append((tokens[0], float(lps[0])))
    return out or None


def _distribution(
    candidates: Sequence[tuple[str, float]], labels: Sequence[str], match: Callable[[str], str | None]
) -> tuple[list[float], dict[str, Any]] | None:
    """Softmax over ``labels`` from first-token candidates; None if no label is present.

    The probability mass of every variant of a label (" Yes", "YES", "Yes.") is summed.
    A label absent from the list was not among the top candidates, so its logprob is at
    most the smallest listed one, and all absent labels together hold at most the mass
    the list leaves over.  Each absent label is given
    ``min(smallest listed logprob, log(unlisted mass / number absent))``: the largest
    value consistent with the list, so the result is never more confident than the
    server's numbers support.
    """
    per_label: dict[str, list[float]] = {label: [] for label in labels}
    for tok, lp in candidates:
        label = match(tok)
        if label is not None and label in per_label:
            per_label[label].append(lp)
    present = {k: _logsumexp(v) for k, v in per_label.items() if v}
    present = {k: v for k, v in present.items() if v > -math.inf}
    if not present:
        return None
    missing = [label for label in labels if label not in present]
    imputed: float | None = None
    if missing:
        listed = [lp for _, lp in candidates]
        leftover = 1.0 - sum(math.exp(lp) for lp in listed)
        leftover_lp = math.log(max(leftover, 1e-300) / len(missing))
        imputed = min(min(listed), leftover_lp)
    logps = [present.get(label, imputed if imputed is not None else -math.inf) for label in labels]
    norm = _logsumexp(logps)
    probs = [math.exp(lp - norm) for lp in logps]
    raw: dict[str, Any] = {
        "logprobs": {k: present[k] for k in labels if k in present},
        "label_mass": math.exp(_logsumexp(list(present.values()))),
    }
    if missing:
        raw["imputed"] = {"labels": missing, "logprob": imputed}
    return probs, raw


def _match_yes_no(token: str) -> str | None:
    t = _norm_token(token).lower()
    return t if t in ("yes", "no") else None


def yes_no_from_logprobs(candidates: Sequence[tuple[str, float]]) -> tuple[float, dict[str, Any]] | None:
    """P(Yes) from first-token ``(token, logprob)`` candidates; None if neither side is listed.

    ``P(Yes) = sum_yes / (sum_yes + sum_no)`` over the case/space/punctuation variants of
    "Yes" and "No" (a two-way softmax on their summed log-probabilities); a side missing
    from the list is imputed as described in :func:`_distribution`.  ``raw["label_mass"]``
    is the probability the listed Yes/No variants hold together: the caller decides
    whether that is enough to be an answer.
    """
    res = _distribution(candidates, ["yes", "no"], _match_yes_no)
    if res is None:
        return None
    probs, raw = res
    return probs[0], raw


def choice_from_logprobs(
    candidates: Sequence[tuple[str, float]], letters: Sequence[str]
) -> tuple[list[float], dict[str, Any]] | None:
    """A distribution over option ``letters`` from first-token candidates; None if none is listed.

    Labels match in upper case only (" B", "B.", "(B"): lower-case single letters are
    more often words or abbreviations ("a", "e.g.") than answers.  ``raw["label_mass"]``
    is the probability the listed labels hold together.
    """

    def match(token: str) -> str | None:
        t = _norm_token(token)
        return t if len(t) == 1 else None

    return _distribution(candidates, list(letters), match)


# --------------------------------------------------------------------------- answer text

# How models decline. Matched anywhere in the first sentence or two of an answer (case
# and curly apostrophes ignored), so "I'm sorry, but ...", "Sorry, I can't ...", "As an
# AI, I cannot ...", "I cannot assist with that request." and "Unfortunately, I'm unable
# to ..." all count.
_REFUSAL_RE = re.compile(
    r"\b(?:"
    r"i'?m sorry|i am sorry|sorry, (?:but )?i|i apologi[sz]e|my apologies"
    r"|i (?:can ?not|can't|won't|will not|am unable|'m unable|am not able|'m not able|must decline|do not feel comfortable|don't feel comfortable)"
    r"|i'm unable|i'm not able|unable to (?:help|assist|comply|provide|answer|determine|analy[sz]e|evaluate)"
    r"|(?:can't|cannot|can not|won't) (?:help|assist|comply|provide|answer|do that|fulfil)"
    r"|as an ai\b|as a language model|not (?:able|comfortable|permitted|allowed) to"
    r"|against (?:my|the) (?:guidelines|policy|policies)"
    r")",
    re.IGNORECASE,
)


def is_refusal(text: str | None) -> bool:
    """Whether an answer declines to answer ("I'm sorry, but I can't help with that.")."""
    if not text:
        return False
    t = text.replace("\u2019", "'").replace("\u2018", "'")[:300]
    return bool(_REFUSAL_RE.search(t))


def _refused_or_off_format(text: str | None, top_token: str | None) -> str:
    """``refused`` when the text (or, with one generated token, that token) declines."""
    if is_refusal(text):
        return "refused"
    words = re.findall(r"[A-Za-z']+", text or "")
    first = (words[0] if words else _norm_token(top_token or "")).lower()
    if len(words) <= 1 and first in REFUSAL_FIRST_WORDS:  # only one token generated: judge by it
        return "refused"
    return "off-format"


# The answer is at the start, or after an "answer is" / "Answer:" lead-in, possibly in
# brackets or bold: "B", "(B)", "**B**", "B. Because ...", "The answer is (B).",
# "Answer: B", "The correct option is B".
_LEAD_IN = r"(?:(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*(?:option\s+)?)?"
_YES_NO_RE = re.compile(r"^[\W_]*" + _LEAD_IN + r"[\W_]*(yes|no)\b", re.IGNORECASE)
_LABEL_RE = re.compile(r"^[\W_]*" + _LEAD_IN + r"[\W_]*([A-Z])(?![A-Za-z0-9'])", re.IGNORECASE)


def parse_yes_no_text(text: str) -> bool | None:
    """True/False for an answer that says yes or no first, else None.

    Reads "Yes", "yes, the image ...", "**No**.", "The answer is yes.", "Answer: No";
    not "None of them", "I'm sorry" or "Not sure".
    """
    m = _YES_NO_RE.match(text or "")
    return None if m is None else m.group(1).lower() == "yes"


def parse_choice_text(text: str, letters: Sequence[str], options: Sequence[str] | None = None) -> int | None:
    """The index of the option an answer names first, else None.

    Reads an upper-case label at the start or after an "answer is" lead-in ("B",
    " (B)", "B. Because ...", "The answer is (B).", "Answer: B"), or, with ``options``,
    an answer that is exactly one option's text ("Partial exposure.").  A label in
    lower case counts only after a lead-in ("answer: b"); a label that is not one of
    ``letters`` is not an answer.
    """
    t = (text or "").strip()
    m = _LABEL_RE.match(t)
    if m is not None:
        label = m.group(1)
        led_in = bool(m.group(0)[: m.start(1)].strip(" \t\r\n*_([{\"'`"))
        if (label.isupper() or led_in) and label.upper() in letters:
            return list(letters).index(label.upper())
    if options:
        bare = re.sub(r"[\W_]+", " ", t).strip().lower()
        hits = [i for i, o in enumerate(options) if re.sub(r"[\W_]+", " ", o).strip().lower() == bare]
        if len(hits) == 1:
            return hits[0]
    return None


# --------------------------------------------------------------------------- backend


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if not loop.is_closed():
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass
    if thread is not threading.current_thread():
        thread.join(timeout=5)


class OpenAIBackend(Backend):
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
        max_retries: extra attempts for 408/429/5xx, connection errors and timeouts.
        backoff_base / max_backoff: the retry delay is ``backoff_base * 2**attempt``
            (capped at ``max_backoff``) with jitter; ``Retry-After`` wins when given
            (also capped at ``max_backoff``).
        image_detail: the ``detail`` field of image parts (OpenAI: "low"/"high"/"auto");
            omitted when None.
        max_image_side: downscale images whose longer side exceeds this (None: never).
        image_format: "auto" (PNG for images with transparency, else JPEG), "jpeg", "png".
        top_logprobs: candidates requested for the first token (OpenAI and vLLM's default
            ``--max-logprobs`` allow at most 20).
        use_logprobs: set False for servers that reject the ``logprobs`` parameter; the
            answers are then parsed from text (``source="parsed"``).
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
        image_detail: str | None = None,
        max_image_side: int | None = 1024,
        image_format: Literal["auto", "jpeg", "png"] = "auto",
        jpeg_quality: int = 90,
        top_logprobs: int = 20,
        use_logprobs: bool = True,
        min_label_mass: float = DEFAULT_MIN_LABEL_MASS,
        answer_tokens: int = 16,
        guided_choice: Literal["off", "structured_outputs", "guided_choice", "regex"] | bool = "off",
        system_prompt: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        model = model or env_first("ICM_OPENAI_MODEL")
        if not model:
            raise ValueError("OpenAIBackend needs a model name (argument or ICM_OPENAI_MODEL)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.model = model
        self.base_url = base_url_from_env(base_url)
        self._api_key = api_key_from_env(api_key)
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff_base = float(backoff_base)
        self.max_backoff = float(max_backoff)
        self.image_detail = image_detail
        self.max_image_side = max_image_side
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.top_logprobs = top_logprobs
        self.use_logprobs = use_logprobs
        if not 0.0 <= min_label_mass <= 1.0:
            raise ValueError(f"min_label_mass must be between 0 and 1, got {min_label_mass}")
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loop_pid: int | None = None
        self._finalizer: weakref.finalize | None = None
        self._http: ChatTransport | None = None  # made on the loop thread, bound to that loop

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key={'set' if self._api_key else 'unset'}, max_concurrency={self.max_concurrency})"
        )

    @property
    def model_id(self) -> str:
        return f"{self.model}@{self.base_url}"

    @property
    def last_errors(self) -> list[ItemError]:
        """Per-item errors of this thread's most recent call (empty when all answered)."""
        return list(getattr(self._local, "errors", []))

    # ------------------------------------------------------------------ public API

    def score_yes_no(
        self, images: Sequence[Image.Image], questions: Sequence[str]
    ) -> list[YesNoScore | NotJudged | Failed]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        urls = self._encode_all(images)

        async def batch() -> list[Any]:
            return await asyncio.gather(
                *(self._score_task(i, None, urls[i], yes_no_prompt(q), None, ()) for i, q in enumerate(questions))
            )

        return self._finish(self._run(batch()))

    def choose(
        self, images: Sequence[Image.Image], question: str, options: Sequence[str]
    ) -> list[Choice | NotJudged | Failed]:
        labels = option_labels(len(options))
        prompt = moderation_choice_prompt(question, options)
        urls = self._encode_all(images)

        async def batch() -> list[Any]:
            return await asyncio.gather(
                *(self._score_task(i, None, url, prompt, labels, tuple(options)) for i, url in enumerate(urls))
            )

        return self._finish(self._run(batch()))

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Answer]]:
        """All queries about all images in one concurrent pass; each image encoded once."""
        prepared: list[tuple[Query, str, list[str] | None]] = []
        for q in queries:
            if q.kind == "yes_no":
                prepared.append((q, yes_no_prompt(q.question), None))
            elif q.kind == "choice":
                prepared.append((q, moderation_choice_prompt(q.question, q.options), option_labels(len(q.options))))
            else:
                raise ValueError(f"unknown query kind {q.kind!r}")
        urls = self._encode_all(images)

        async def batch() -> list[Any]:
            tasks: list[Awaitable[Any]] = []
            for i, url in enumerate(urls):
                for q, prompt, labels in prepared:
                    tasks.append(self._score_task(i, q.key, url, prompt, labels, q.options))
            return await asyncio.gather(*tasks)

        flat = self._finish(self._run(batch()))
        out: list[dict[str, Answer]] = [{} for _ in images]
        it = iter(flat)
        for slot in out:
            for q, _, _ in prepared:
                slot[q.key] = next(it)
        return out

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
        if len(images) != len(messages):
            raise ValueError(f"{len(images)} images but {len(messages)} conversations")
        urls = self._encode_all(images)
        convs = [self._attach_image(list(m), url) for m, url in zip(messages, urls)]
        params: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}
        if top_p is not None:
            params["top_p"] = top_p
        if seed is not None:
            params["seed"] = seed

        async def one(i: int, conv: list[Message]) -> tuple[str | None, ItemError | None]:
            try:
                data = await self._request({"messages": conv, **params})
                text, _ = self._message(data)
                if text is None:
                    raise ChatError("the response has no message content", raw={"response": data})
                return text, None
            except ChatError as e:
                return None, ItemError(i, str(e), None, e.status, e.raw)
            except Exception as e:  # noqa: BLE001 - an odd response must not fail the batch
                return None, ItemError(i, f"unexpected {type(e).__name__}: {e}")

        async def batch() -> list[Any]:
            return await asyncio.gather(*(one(i, c) for i, c in enumerate(convs)))

        return self._finish(self._run(batch()))

    def close(self) -> None:
        """Close the HTTP client and stop the backend's event-loop thread."""
        with self._lock:
            loop, thread, http = self._loop, self._thread, self._http
            same_process = self._loop_pid == os.getpid()
            self._loop = self._thread = self._http = None
            self._loop_pid = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if loop is None or thread is None or not same_process:
            return
        if http is not None and thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(http.aclose(), loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - best effort on shutdown
                log.debug("closing the HTTP client failed", exc_info=True)
        _stop_loop(loop, thread)

    # ------------------------------------------------------------------ internals

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

    def _image_part(self, url: str) -> dict[str, Any]:
        image_url: dict[str, Any] = {"url": url}
        if self.image_detail:
            image_url["detail"] = self.image_detail
        return {"type": "image_url", "image_url": image_url}

    def _question_messages(self, url: str, text: str) -> list[Message]:
        msgs: list[Message] = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": [self._image_part(url), {"type": "text", "text": text}]})
        return msgs

    def _attach_image(self, messages: list[Message], url: str) -> list[Message]:
        """A copy of ``messages`` with the image put first in the first user turn."""
        messages = copy.deepcopy(messages)
        for msg in messages:
            if msg.get("role") == "user":
                content = msg.get("content")
                if isinstance(content, str):
                    parts: list[Any] = [{"type": "text", "text": content}]
                elif isinstance(content, list):
                    parts = list(content)
                else:
                    parts = []
                msg["content"] = [self._image_part(url), *parts]
                return messages
        raise ValueError("a conversation needs a user message to attach the image to")

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

    @staticmethod
    def _message(data: Any) -> tuple[str | None, Any]:
        """Message text and logprobs of the first choice; raises on an unexpected shape."""
        choice = first_choice(data)
        if choice is None:
            raise ChatError("the response has no choices", raw={"response": data})
        return choice_text(choice), choice.get("logprobs")

    async def _post_scoring(self, messages: list[Message], labels: Sequence[str]) -> tuple[Any, bool]:
        """POST a scoring request; ``(response, guided)``. A rejected guided field is dropped for good."""
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
                    log.warning(
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
        yes_no = labels is None
        valid = ["Yes", "No"] if yes_no else list(labels or [])
        try:
            data, guided = await self._post_scoring(self._question_messages(url, prompt), valid)
            self._answered = True
            text, logprobs = self._message(data)
        except ChatError as e:
            return Failed(str(e), e.status, e.raw), ItemError(index, str(e), key, e.status, e.raw)
        except Exception as e:  # noqa: BLE001 - an odd response must not fail the batch
            msg = f"unexpected {type(e).__name__}: {e}"
            return Failed(msg), ItemError(index, msg, key)
        text = text if isinstance(text, str) else None
        candidates = _first_token_candidates(logprobs)
        mass: float | None = None
        top = max(candidates, key=lambda c: c[1])[0] if candidates else None
        if candidates:
            res = yes_no_from_logprobs(candidates) if yes_no else choice_from_logprobs(candidates, valid)
            mass = 0.0 if res is None else float(res[1]["label_mass"])
            if res is not None and mass >= self.min_label_mass:
                value, raw = res
                raw = {"text": text, **raw}
                if yes_no:
                    return YesNoScore(float(value), source="logprobs", raw=raw), None  # type: ignore[arg-type]
                return Choice(list(value), source="logprobs", raw=raw), None  # type: ignore[arg-type]
        raw_nj: dict[str, Any] = {"text": text, "label_mass": mass, "top_token": top}
        # With guided output the text is forced to be a label: it says nothing when the
        # logprobs show the model wanted to say something else.
        if not (guided and candidates) and not is_refusal(text):
            if yes_no:
                answer = parse_yes_no_text(text or "")
                if answer is not None:
                    self.stats.parsed_fallbacks += 1
                    return YesNoScore(1.0 if answer else 0.0, source="guided" if guided else "parsed", raw={"text": text, "label_mass": mass}), None
            else:
                idx = parse_choice_text(text or "", valid, options)
                if idx is not None:
                    self.stats.parsed_fallbacks += 1
                    probs = [1.0 if j == idx else 0.0 for j in range(len(valid))]
                    return Choice(probs, source="guided" if guided else "parsed", raw={"text": text, "label_mass": mass}), None
        reason = _refused_or_off_format(None if (guided and candidates) else text, top)
        shown = (text or "").strip().replace("\n", " ")
        shown = shown[:80] + ("..." if len(shown) > 80 else "")
        detail = f"answered {shown!r}" if shown else "no answer text"
        if mass is not None:
            detail += f"; P(valid labels)={mass:.3g} < {self.min_label_mass:g}"
        elif self.use_logprobs:
            detail += "; no logprobs returned"
        return NotJudged(reason, detail, raw_nj), None  # type: ignore[arg-type]

    def _finish(self, results: Sequence[tuple[_T, ItemError | None]]) -> list[_T]:
        """Split (answer, error) pairs, record the errors for :attr:`last_errors`."""
        errors = [err for _, err in results if err is not None]
        with self._lock:  # callers in several threads may finish at once
            self.stats.failures += len(errors)
        self._local.errors = errors
        config = next((e for e in errors if e.status in CONFIG_STATUSES), None)
        if config is not None:
            what = {401: "the API key was rejected", 403: "access was refused", 404: "the model or the URL does not exist"}
            raise BackendConfigError(
                f"openai backend: {what.get(config.status or 0, 'the server refused the request')} "
                f"(model {self.model!r} at {self.base_url}): {config.error}"
            )
        if (
            errors
            and not self._answered
            and len(errors) == len(results)
            and all(e.status is None and e.error.startswith("connection error") for e in errors)
        ):
            raise BackendConfigError(
                f"openai backend: cannot reach the server at {self.base_url} (no request has ever been answered): "
                f"{errors[0].error}"
            )
        for err in errors:
            log.debug("openai backend: item %d%s failed: %s", err.index, f" ({err.key})" if err.key else "", err.error)
        if errors:
            log.warning(
                "openai backend: %d of %d requests failed (see last_errors); first: %s",
                len(errors),
                len(results),
                errors[0].error,
            )
        return [answer for answer, _ in results]

    # ------------------------------------------------------------------ HTTP

    def _transport(self) -> ChatTransport:
        # Runs on the backend's loop thread only, so no lock is needed.
        if self._http is None:
            self._http = ChatTransport(
                self.base_url,
                api_key=self._api_key,
                max_concurrency=self.max_concurrency,
                timeout=self.timeout,
                max_retries=self.max_retries,
                backoff_base=self.backoff_base,
                max_backoff=self.max_backoff,
                stats=self.stats,
                logger=log,
            )
        self._http.stats = self.stats  # whatever object the caller counts in now
        return self._http

    async def _request(self, body: dict[str, Any]) -> Any:
        """POST one chat completion with retries; the parsed JSON or :class:`ChatError`."""
        return await self._transport().post({"model": self.model, **body, **self.extra_body})

    # ------------------------------------------------------------------ event loop

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        """The backend's event loop, started in a daemon thread on first use (or after a fork)."""
        with self._lock:
            if (
                self._loop is not None
                and self._thread is not None
                and self._loop_pid == os.getpid()
                and self._thread.is_alive()
            ):
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:
                    try:
                        loop.run_until_complete(loop.shutdown_asyncgens())
                    finally:
                        loop.close()

            thread = threading.Thread(target=run, name="icm-openai-backend", daemon=True)
            thread.start()
            ready.wait()
            self._loop, self._thread, self._loop_pid = loop, thread, os.getpid()
            self._http = None  # bound to the previous loop, if any
            self._finalizer = weakref.finalize(self, _stop_loop, loop, thread)
            return loop

    def _run(self, coro: Awaitable[_T]) -> _T:
        """Run ``coro`` on the backend's loop and wait for it (safe inside a running loop)."""
        loop = self._ensure_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError("OpenAIBackend's sync API cannot be called from its own event loop")
        fut = asyncio.run_coroutine_threadsafe(coro, loop)  # type: ignore[arg-type]
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise
