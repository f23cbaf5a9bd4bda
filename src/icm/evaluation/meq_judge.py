"""Moderation explanation quality (MEQ) judged by an LLM behind any OpenAI-compatible API.

A judge model compares a model's explanation with a reference (human) explanation of the
same image and scores four criteria from 0 to 100: **Accuracy**, **Preciseness**,
**Comprehensiveness** and **Fluency**. The prompt (:func:`judge_messages`) is ours; it
asks for JSON, but :func:`parse_judgement` reads whatever comes back: a JSON object
(fenced or not, nested or not), a markdown table (criteria as rows or as columns),
``Accuracy: 85/100`` lines, stray text around any of them.

The client (:class:`Judge`) sends through :class:`~icm.openai_http.ChatClient` (the
``openai`` SDK), configured by :meth:`JudgeConfig.server`: requests run concurrently
(bounded), transient failures (connection errors, timeouts, 408, 409, 425, 429, 5xx,
and a success whose body is not JSON) are retried with exponential backoff honouring
``Retry-After``, and every reply is cached in SQLite keyed
by (model, hash of the request), so an interrupted run resumes where it stopped and a
rerun costs nothing. Failed requests are not cached: they are tried again next time.
Replies are cached as text and parsed when read, so a better parser needs no new calls.
An explanation the judge gives no usable score for is a *failure*, counted and reported
(:class:`~icm.evaluation.meq.MEQReport`), never a silent zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field, SecretStr

from icm.aio import run_sync
from icm.cache import ReplyCache, request_key
from icm.openai_http import ChatClient, ChatError, ChatUsage, ServerSettings, completion_text, env_first

CRITERIA: tuple[str, ...] = ("accuracy", "preciseness", "comprehensiveness", "fluency")
_CRITERION_RE = {
    "accuracy": r"accura(?:cy|te)",
    "preciseness": r"precise(?:ness)?|precision",
    "comprehensiveness": r"comprehensive(?:ness)?|completeness",
    "fluency": r"fluen(?:cy|t)",
}
_EXTRA_RETRY = frozenset({425})  # besides what the SDK retries (408, 409, 429, 5xx)

DEFAULT_CACHE = Path(os.environ.get("ICM_CACHE_DIR", Path.home() / ".cache" / "icm")) / "judge.sqlite"

# --------------------------------------------------------------------------- the prompt

JUDGE_SYSTEM = (
    "You are a careful, strict evaluator of image-moderation explanations. You compare a "
    "model's explanation of why an image is or is not inappropriate with a reference "
    "explanation written by a person who saw the image. You do not see the image: the "
    "reference is the truth."
)

JUDGE_TEMPLATE = """Reference explanation (written by a person who saw the image):
<<<
{reference}
>>>

Candidate explanation (written by a model):
<<<
{candidate}
>>>

Score the candidate against the reference on four criteria, each an integer from 0 to 100:
- accuracy: the candidate's facts (people, clothing, actions, setting, atmosphere) and its conclusion about whether the image is {term} agree with the reference; contradictions cost most.
- preciseness: the candidate makes no claims that the reference does not support (no invented details, no padding).
- comprehensiveness: the candidate covers every point the reference makes, including its reasons.
- fluency: the candidate is clear, coherent and well written, whatever its content.

Reply with one JSON object and nothing else, for example:
{{"accuracy": 80, "preciseness": 70, "comprehensiveness": 75, "fluency": 90, "rationale": "one sentence"}}"""  # noqa: E501 - prompt text, one criterion a line


def judge_messages(reference: str, candidate: str, *, term: str = "sexy") -> list[dict[str, str]]:
    """The chat messages sent to the judge for one explanation."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_TEMPLATE.format(reference=reference.strip(), candidate=candidate.strip(), term=term)},
    ]


# --------------------------------------------------------------------------- parsing

ParseMethod = Literal["json", "table", "text"]


class ParsedJudgement(BaseModel):
    scores: dict[str, float | None]
    methods: list[ParseMethod] = Field(default_factory=list)
    error: str | None = Field(default=None, description="What is missing or wrong; None when all four scores were read")

    @property
    def complete(self) -> bool:
        return all(self.scores.get(c) is not None for c in CRITERIA)

    @property
    def empty(self) -> bool:
        return all(self.scores.get(c) is None for c in CRITERIA)


def _criterion(name: str) -> str | None:
    n = re.sub(r"[*_`#:\"'\s]+", " ", name).strip().lower()
    for crit, pat in _CRITERION_RE.items():
        if re.fullmatch(rf"(?:{pat})(?: score)?(?: \(?0 ?[-–] ?100\)?)?", n):
            return crit
    return None


_NUM = re.compile(r"(?<![\d.])(-?\d{1,3}(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d{1,3}))?(?![\d])")


def _number(value: Any) -> float | None:
    """A 0-100 score from a JSON value or a cell: 85, "85", "85/100", "8.5/10", "85%"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str):
        s = re.sub(r"\(?\b0\s*[-–]\s*100\b\)?", " ", value)
        m = _NUM.search(s)
        if not m:
            return None
        v = float(m.group(1))
        if m.group(2):
            denom = float(m.group(2))
            if denom <= 0:
                return None
            v = v * 100.0 / denom
    elif isinstance(value, dict):
        for k in ("score", "value", "rating"):
            if k in value:
                return _number(value[k])
        return None
    else:
        return None
    return v


def _walk_json(obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            crit = _criterion(str(k))
            if crit is not None and crit not in out:
                out[crit] = v
            elif isinstance(v, (dict, list)):
                _walk_json(v, out)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict) and ("criterion" in v or "criteria" in v or "name" in v):
                crit = _criterion(str(v.get("criterion") or v.get("criteria") or v.get("name")))
                if crit is not None and crit not in out:
                    out[crit] = v.get("score", v.get("value"))
                    continue
            _walk_json(v, out)


def _from_json(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    dec = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        _walk_json(obj, found)
        i = text.find("{", end)
    return found


def _cells(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|"):
        s = s[:-1]
    return [c.strip() for c in s.split("|")]


def _from_table(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    header: dict[int, str] | None = None
    for line in text.splitlines():
        if "|" not in line:
            header = None
            continue
        cells = _cells(line)
        if all(re.fullmatch(r":?-{2,}:?|", c) for c in cells):
            continue  # the separator row
        crits = {i: _criterion(c) for i, c in enumerate(cells)}
        named = {i: c for i, c in crits.items() if c}
        if len(named) >= 2 and all(_number(c) is None for c in cells):
            header = named  # criteria as columns: the scores are on the next row
            continue
        if header is not None:
            for i, crit in header.items():
                if i < len(cells) and crit not in found and _number(cells[i]) is not None:
                    found[crit] = cells[i]
            continue
        if len(named) == 1:  # criteria as rows: | Accuracy | 90 |
            (i, crit), = named.items()
            for c in cells[i + 1:]:
                if _number(c) is not None:
                    found.setdefault(crit, c)
                    break
    return found


def _from_text(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for crit, pat in _CRITERION_RE.items():
        rx = re.compile(
            rf"(?i)\b(?:{pat})\b[*_`\"']*\s*(?:score)?\s*(?:\(\s*0\s*[-–]\s*100\s*\))?\s*[:=\-–—]?\s*[*_`\"']*\s*"
            r"(-?\d{1,3}(?:\.\d+)?\s*(?:(?:/|out of)\s*\d{1,3})?)"
        )
        m = rx.search(text)
        if m:
            found[crit] = m.group(1)
    return found


def parse_judgement(text: str | None) -> ParsedJudgement:
    """The four 0-100 scores in a judge's reply, whatever its shape (see the module doc)."""
    scores: dict[str, float | None] = {c: None for c in CRITERIA}
    if not text or not text.strip():
        return ParsedJudgement(scores=scores, error="empty reply")
    methods: list[ParseMethod] = []
    bad: list[str] = []
    for method, fn in (("json", _from_json), ("table", _from_table), ("text", _from_text)):
        raw = fn(text)
        used = False
        for crit, value in raw.items():
            if scores[crit] is not None:
                continue
            v = _number(value)
            if v is None:
                continue
            if not 0.0 <= v <= 100.0:
                bad.append(f"{crit} {v:g} out of 0-100")
                continue
            scores[crit] = v
            used = True
        if used:
            methods.append(method)  # type: ignore[arg-type]
        if all(scores[c] is not None for c in CRITERIA):
            break
    missing = [c for c in CRITERIA if scores[c] is None]
    error = None
    if missing:
        error = ("no score for " + ", ".join(missing)) + (f" ({'; '.join(bad)})" if bad else "")
    return ParsedJudgement(scores=scores, methods=methods, error=error)


# --------------------------------------------------------------------------- client


class JudgeConfig(BaseModel):
    """How to reach the judge. ``api_key`` defaults to ``$ICM_JUDGE_API_KEY`` / ``$OPENAI_API_KEY``."""

    model: str
    base_url: str = Field(default_factory=lambda: env_first("ICM_JUDGE_BASE_URL", "OPENAI_BASE_URL") or "https://api.openai.com/v1")
    api_key: SecretStr | None = Field(default_factory=lambda: (lambda k: SecretStr(k) if k else None)(env_first("ICM_JUDGE_API_KEY", "OPENAI_API_KEY")))
    concurrency: int = Field(default=8, ge=1, le=256)
    timeout: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    backoff_base: float = Field(default=1.0, ge=0)
    max_backoff: float = Field(default=30.0, ge=0)
    temperature: float = 0.0
    max_tokens: int = 400
    term: str = "sexy"
    cache: Path | None = DEFAULT_CACHE
    json_mode: bool = Field(default=False, description="Send response_format={'type': 'json_object'} (servers that support it)")

    def server(self) -> ServerSettings:
        """The judge server as the :class:`~icm.openai_http.ServerSettings` every client takes."""
        return ServerSettings(
            base_url=self.base_url.rstrip("/"), api_key=self.api_key, model=self.model, timeout=self.timeout,
            max_retries=self.max_retries, backoff_base=self.backoff_base, max_backoff=self.max_backoff,
            max_concurrency=self.concurrency,
        )


@dataclass
class ExplanationPair:
    id: str
    reference: str
    candidate: str


class JudgeResult(BaseModel):
    id: str
    scores: dict[str, float | None]
    reply: str | None = None
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    methods: list[str] = Field(default_factory=list)


def _content(completion: Any) -> str:
    """The judge's reply text; :class:`ChatError` when there is none."""
    text, choice = completion_text(completion)
    if choice is None or getattr(choice, "message", None) is None:
        raise ChatError("the response has no choices[0].message")
    if not isinstance(text, str) or not text.strip():
        raise ChatError("the judge returned an empty message")
    return text


class Judge:
    """Scores explanation pairs with an LLM judge; see the module docstring."""

    def __init__(self, config: JudgeConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._transport = transport
        self.cache = ReplyCache(config.cache) if config.cache else None
        self.stats = ChatUsage()

    @property
    def requests(self) -> int:
        """HTTP requests sent by this judge (retries included)."""
        return self.stats.requests

    @property
    def retries(self) -> int:
        return self.stats.retries

    def body(self, pair: ExplanationPair) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {
            "model": c.model,
            "messages": judge_messages(pair.reference, pair.candidate, term=c.term),
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
        }
        if c.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    async def _one(self, http: ChatClient, pair: ExplanationPair) -> JudgeResult:
        body = self.body(pair)
        key = request_key(body)
        model = self.config.model
        if self.cache is not None:
            hit = self.cache.get(model, key)
            if hit is not None:
                p = parse_judgement(hit.text)
                return JudgeResult(id=pair.id, scores=p.scores, reply=hit.text, error=p.error, cached=True, methods=list(p.methods))
        try:  # the client holds its semaphore through the retries: at most ``concurrency`` pairs in flight
            completion, attempts = await http.complete_counted(body)
        except ChatError as exc:
            return JudgeResult(id=pair.id, scores={c: None for c in CRITERIA}, error=str(exc), attempts=exc.attempts)
        try:
            reply = _content(completion)
        except ChatError as exc:
            return JudgeResult(id=pair.id, scores={c: None for c in CRITERIA}, error=str(exc), attempts=attempts)
        if self.cache is not None:
            self.cache.put(model, key, reply, stage="judge")
        p = parse_judgement(reply)
        return JudgeResult(id=pair.id, scores=p.scores, reply=reply, error=p.error, attempts=attempts, methods=list(p.methods))

    async def judge_async(
        self, pairs: Sequence[ExplanationPair], on_result: Callable[[JudgeResult], None] | None = None
    ) -> list[JudgeResult]:
        http = ChatClient(
            self.config.server(),
            stats=self.stats,
            transport=self._transport,
            retry_malformed_json=True,
            extra_retry_statuses=_EXTRA_RETRY,
            message_limit=300,
        )

        async def run(pair: ExplanationPair) -> JudgeResult:
            r = await self._one(http, pair)
            if on_result is not None:
                on_result(r)
            return r

        try:
            return list(await asyncio.gather(*(run(p) for p in pairs)))
        finally:
            await http.aclose()

    def judge(self, pairs: Sequence[ExplanationPair], on_result: Callable[[JudgeResult], None] | None = None) -> list[JudgeResult]:
        """Judge every pair (concurrently); works with or without a running event loop (:func:`~icm.aio.run_sync`)."""
        return run_sync(self.judge_async(pairs, on_result))

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
