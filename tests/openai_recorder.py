"""A local OpenAI-compatible server that records every request and answers "Yes" with
logprobs: for tests that check what a backend sends (messages, headers), not how it
reads varied answers (tests/test_openai_backend.py has the full fake server for that)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
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

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    rec.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield rec
    finally:
        httpd.shutdown()
        httpd.server_close()
