"""The one client of OpenAI-compatible servers (icm.openai_http) and the sync runner (icm.aio).

Requests go through the real ``openai`` SDK into an ``httpx.MockTransport`` that plays the
server, so what is checked is what a server would receive and what a caller gets back:
bodies, headers, retries and their waits, counts, error messages, streaming.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from icm.aio import LoopThread, run_sync
from icm.openai_http import ChatClient, ChatError, ServerSettings

pytest.importorskip("openai")

URL = "http://judge.test/v1"


def completion(text: str = "Yes", prompt_tokens: int = 7, completion_tokens: int = 1) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class Server:
    """A scripted server behind httpx.MockTransport: each request takes the next reply (the last repeats)."""

    def __init__(self, *replies: httpx.Response | Callable[[httpx.Request], httpx.Response]) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return reply(request) if callable(reply) else reply

    def body(self, i: int = -1) -> dict[str, Any]:
        return json.loads(self.requests[i].content)


def client(server: Server, **settings: Any) -> ChatClient:
    opts: dict[str, Any] = {"base_url": URL, "model": "m", "max_retries": 2, "backoff_base": 0.01, "max_backoff": 0.05}
    opts.update(settings)
    return ChatClient(ServerSettings(**opts), transport=httpx.MockTransport(server))


def ask(c: ChatClient, **body: Any) -> Any:
    async def go() -> Any:
        try:
            return await c.complete_counted({"messages": [{"role": "user", "content": "q"}], **body})
        finally:
            await c.aclose()

    return asyncio.run(go())


def test_body_is_what_we_send_and_server_fields_pass_through() -> None:
    server = Server(httpx.Response(200, json=completion("Yes")))
    c = client(server, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    answer, attempts = ask(c, max_tokens=3, temperature=0, guided_choice=["Yes", "No"], logprobs=True, top_logprobs=5)
    assert answer.choices[0].message.content == "Yes" and attempts == 1
    assert server.body() == {
        "model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 3, "temperature": 0,
        "logprobs": True, "top_logprobs": 5, "guided_choice": ["Yes", "No"],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    assert server.requests[0].url == f"{URL}/chat/completions"
    assert (c.stats.requests, c.stats.retries, c.stats.prompt_tokens, c.stats.completion_tokens) == (1, 0, 7, 1)


def test_key_is_sent_as_bearer_and_no_key_sends_no_header_and_is_never_shown() -> None:
    server = Server(httpx.Response(200, json=completion()))
    keyed = client(server, api_key="sk-abcdefghijklmnop")
    ask(keyed)
    assert server.requests[-1].headers["authorization"] == "Bearer sk-abcdefghijklmnop"
    assert "sk-abcdefghijklmnop" not in repr(keyed) + repr(keyed.settings) + keyed.settings.model_dump_json()
    ask(client(server))
    assert "authorization" not in server.requests[-1].headers


def test_transient_failures_are_retried_with_our_backoff_and_retry_after_is_capped() -> None:
    server = Server(
        httpx.Response(503, text="upstream unavailable"),
        httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "100"}),
        httpx.Response(200, json=completion()),
    )
    c = client(server, max_retries=3, max_backoff=0.05)
    t0 = time.monotonic()
    _, attempts = ask(c)
    assert attempts == 3 and len(server.requests) == 3
    assert time.monotonic() - t0 < 5  # Retry-After: 100 waited at most max_backoff, the SDK's 0.5 s base not used
    assert (c.stats.requests, c.stats.retries) == (3, 2)


def test_a_failure_names_the_status_and_the_server_message() -> None:
    down = Server(httpx.Response(503, json={"object": "error", "message": "CUDA out of memory", "code": 503}))
    c = client(down, max_retries=1)
    with pytest.raises(ChatError) as info:
        ask(c)
    err = info.value
    assert err.status == 503 and err.retryable and err.attempts == 2 and len(down.requests) == 2
    assert str(err) == f"HTTP 503 from {URL}/chat/completions: CUDA out of memory (gave up after 2 attempts)"
    refused = Server(httpx.Response(401, json={"detail": "Invalid API key"}))
    with pytest.raises(ChatError) as info:
        ask(client(refused, max_retries=3))
    assert info.value.status == 401 and not info.value.retryable and len(refused.requests) == 1
    assert "HTTP 401" in str(info.value) and "Invalid API key" in str(info.value) and "gave up" not in str(info.value)


def test_malformed_json_fails_at_once_unless_asked_to_retry() -> None:
    broken = httpx.Response(200, content=b'{"choices": [{"mess', headers={"content-type": "application/json"})
    server = Server(broken, httpx.Response(200, json=completion("fine")))
    with pytest.raises(ChatError, match="truncated answer"):  # the JSON stops mid-string: named as cut off
        ask(client(server))
    assert len(server.requests) == 1
    server = Server(broken, httpx.Response(200, json=completion("fine")))
    answer, attempts = ask(ChatClient(client(server).settings, transport=httpx.MockTransport(server), retry_malformed_json=True))
    assert answer.choices[0].message.content == "fine" and attempts == 2


def test_concurrency_is_bounded_per_loop() -> None:
    state = {"now": 0, "max": 0}

    async def slow(request: httpx.Request) -> httpx.Response:
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        return httpx.Response(200, json=completion())

    c = ChatClient(ServerSettings(base_url=URL, model="m", max_concurrency=2), transport=httpx.MockTransport(slow))

    async def go() -> None:
        await asyncio.gather(*(c.complete({"messages": [{"role": "user", "content": str(i)}]}) for i in range(6)))
        await c.aclose()

    asyncio.run(go())
    assert state["max"] == 2 and c.stats.requests == 6


def test_streaming_reads_server_sent_events_and_a_plain_json_answer() -> None:
    events = "".join(
        f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': p}}]})}\n\n" for p in ("The ", "flower.")
    ) + "data: [DONE]\n\n"
    server = Server(
        httpx.Response(200, text=events, headers={"content-type": "text/event-stream"}),
        httpx.Response(200, json=completion("Plain answer.")),
    )
    c = client(server)

    async def pieces() -> list[str]:
        out = [p async for p in c.stream({"messages": [{"role": "user", "content": "q"}], "max_tokens": 9})]
        await c.aclose()
        return out

    assert asyncio.run(pieces()) == ["The ", "flower."]
    assert server.body(0)["stream"] is True and server.body(0)["max_tokens"] == 9
    assert asyncio.run(pieces()) == ["Plain answer."]


def test_run_sync_works_in_a_running_loop_and_from_threads_without_a_thread_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    assert run_sync(double(1)) == 2
    before = {t.ident for t in threading.enumerate()}

    async def inside() -> int:
        return run_sync(double(3))  # a sync caller inside a running loop

    assert asyncio.run(inside()) == 6
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(lambda x: run_sync(double(x)), range(20))) == [2 * x for x in range(20)]
    started: list[str] = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name) or real_start(self))
    for x in range(20):
        assert run_sync(double(x)) == 2 * x
    monkeypatch.undo()
    assert started == [], "run_sync started a thread per call"
    after = {t.ident for t in threading.enumerate()}
    assert after <= before, "run_sync left threads behind"

    runner = LoopThread("test-loop")
    assert runner.run(double(4)) == 8
    with pytest.raises(RuntimeError, match="its own event loop"):
        async def nested() -> int:
            return runner.run(double(5))

        runner.run(nested())
    runner.close()
    assert runner.run(double(6)) == 12  # starts again after close
    runner.close()
