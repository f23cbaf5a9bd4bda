"""A scripted OpenAI-compatible server for the tests of the clients that talk to one.

The server (FastAPI) replays scripted responses shaped like vLLM's and Ollama's. A
request picks its script through a ``[k=NAME]`` tag in its question text; the server
counts hits per tag, records every request (headers and JSON body) and tracks the largest
number of requests in flight. :func:`fake_openai_server` runs it on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serve_helpers import live_server

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"

# --------------------------------------------------------------------------- responses


def vllm_logprobs_body(
    top: list[tuple[str, float]], *, prompt_tokens: int = 812, completion_tokens: int = 1
) -> dict[str, Any]:
    """A chat completion as vLLM returns it with ``logprobs=true, top_logprobs=N``.

    The sampled token is the most likely one (greedy) and is listed first.
    """

    def entry(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

    sampled, sampled_lp = max(top, key=lambda t: t[1])
    return {
        "id": "chatcmpl-5f0c0e0e8b1d4c9a",
        "object": "chat.completion",
        "created": 1735689600,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "reasoning_content": None, "content": sampled, "tool_calls": []},
                "logprobs": {
                    "content": [
                        {
                            **entry(sampled, sampled_lp),
                            "top_logprobs": [entry(t, lp) for t, lp in sorted(top, key=lambda t: -t[1])],
                        }
                    ]
                },
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        },
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def text_body(content: str, *, prompt_tokens: int = 600, completion_tokens: int = 1) -> dict[str, Any]:
    """A chat completion without logprobs, as Ollama's OpenAI endpoint returns it."""
    return {
        "id": "chatcmpl-412",
        "object": "chat.completion",
        "created": 1735689600,
        "model": "llava:13b",
        "system_fingerprint": "fp_ollama",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def vllm_error(status: int, message: str) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status}


# --------------------------------------------------------------------------- server


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    body: bytes | None = None  # sent verbatim instead of ``json`` (malformed responses)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


_KEY_RE = re.compile(r"\[k=([\w.-]+)\]")


def _texts(body: dict[str, Any]) -> str:
    out = []
    for msg in body.get("messages", []):
        content = msg.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p.get("text", "") for p in content if p.get("type") == "text"]
    return "\n".join(out)


class FakeOpenAIServer:
    """Scripted ``/v1/chat/completions``; the last reply of a script repeats."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.reset()

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            m = _KEY_RE.search(_texts(body))
            key = m.group(1) if m else "default"
            self.hits[key] += 1
            self.requests.append({"key": key, "headers": dict(request.headers), "body": body})
            script = self.scripts.get(key) or [self.default]
            reply = script.pop(0) if len(script) > 1 else script[0]
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            finally:
                self.inflight -= 1
            if reply.body is not None:
                return Response(reply.body, status_code=reply.status, headers=reply.headers, media_type="application/json")
            return JSONResponse(reply.json, status_code=reply.status, headers=reply.headers)

    def reset(self) -> None:
        self.scripts: dict[str, list[Reply]] = {}
        self.hits: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.inflight = 0
        self.max_inflight = 0
        self.default = Reply(json=vllm_logprobs_body([("Yes", -0.1), ("No", -2.4)]))

    def script(self, key: str, *replies: Reply) -> None:
        self.scripts[key] = list(replies)

    def bodies(self, key: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["key"] == key]


@contextlib.contextmanager
def fake_openai_server() -> Iterator[tuple[FakeOpenAIServer, str]]:
    """A :class:`FakeOpenAIServer` on a free loopback port: ``(server, base URL ending in /v1)``."""
    fake = FakeOpenAIServer()
    with live_server(fake.app, lifespan="off", timeout_graceful_shutdown=1) as url:
        yield fake, f"{url}/v1"
