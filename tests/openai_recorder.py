"""A local OpenAI-compatible server that records every request and answers "Yes" with
logprobs: for tests that check what a backend sends (messages, headers), not how it
reads varied answers (tests/test_openai_backend.py has the full fake server for that).

:func:`misbehaving_server` answers like it but, request by request, as a faulty server or
proxy may: HTTP 200 with a body that is not JSON, an answer cut off mid-body, a request
dropped without any response, 429 with ``Retry-After``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    """The server's API root and the requests it received (lower-cased headers, JSON body)."""

    url: str
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, body in self.requests]


def _reply(model: Any) -> bytes:
    top = [{"token": "Yes", "logprob": -0.05}, {"token": "No", "logprob": -3.0}, {"token": "B", "logprob": -3.5}]
    return json.dumps({
        "id": "chatcmpl-rec", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{
            "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Yes"},
            "logprobs": {"content": [{"token": "Yes", "logprob": -0.05, "top_logprobs": top}]},
        }],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }).encode()


@contextmanager
def _serving(httpd: ThreadingHTTPServer) -> Iterator[str]:
    """Serve ``httpd`` in a thread and yield its base URL; shut it down afterwards."""
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def recording_server() -> Iterator[Recorded]:
    """Serve on a free loopback port for the duration of the block."""
    rec = Recorded(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            rec.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            data = _reply(body.get("model"))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    with _serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as rec.url:
        yield rec


# --------------------------------------------------------------------------- misbehaving servers

# What a misbehaving server may do with one request (``misbehaving_server``):
#   "ok": a complete answer (``answer(body)``), "invalid-json": HTTP 200 whose body is not JSON,
#   "truncated": the headers promise the whole answer, half of it is sent, the connection closed,
#   "cut-json": half the answer sent as if it were all of it (Content-Length of the half),
#   "drop": the request is read and the connection closed without any response,
#   "429": HTTP 429 with ``Retry-After: 1``.
Behaviour = str


@dataclass
class Misbehaving:
    """The server's API root and, per request, what it did and when it arrived (monotonic seconds)."""

    url: str
    done: list[Behaviour] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)


def yes_answer(body: dict[str, Any]) -> bytes:
    """A logprobs answer (Yes for yes/no questions, B for choices), like ``recording_server``'s."""
    return _reply(body.get("model"))


@contextmanager
def misbehaving_server(
    decide: Callable[[int, dict[str, Any]], Behaviour], answer: Callable[[dict[str, Any]], bytes] = yes_answer
) -> Iterator[Misbehaving]:
    """A loopback server that does ``decide(n, body)`` with its ``n``-th request (0-based)."""
    rec = Misbehaving(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                what = decide(len(rec.done), body)
                rec.done.append(what)
                rec.arrived.append(time.monotonic())
            if what == "drop":
                self.close_connection = True
                return
            if what == "429":
                data = b'{"error": {"message": "Rate limit reached", "type": "requests"}}'
                self._send(429, data, {"Retry-After": "1"})
                return
            data = answer(body)
            if what == "invalid-json":
                data = b"<html><body>upstream glitch</body></html>"
            if what == "cut-json":
                data = data[: len(data) // 2]
            if what == "truncated":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(200, data, {})

        def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the default backlog of 5 makes the 6th concurrent client wait a second
        daemon_threads = True

    with _serving(Server(("127.0.0.1", 0), Handler)) as rec.url:
        yield rec
