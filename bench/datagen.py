"""Data generation: one request at a time (the paper's scripts) against `icm data generate`'s pipeline.

A local OpenAI-compatible server answers every chat request after 100-300 ms (uniform,
seeded) and fails 10% of them with a transient 503. Both ways generate the same ICM-Instruct
records (the MLLM's combined description + explanation, then the text LLM's Q-A table) for
the same images, in one run:

* sequential: for each image, one request, wait, the next (a failed request is retried at
  once, up to 5 attempts, as a careful script would), records appended to a JSONL file;
* ours: :func:`icm.data.generate.generate` (the public entry point behind ``icm data
  generate``) at ``--concurrency`` requests in flight, with its retries and backoff.

Prints records/s for both, the ratio, and the records lost (images without a record) and
duplicated (written twice) by each; both must be 0. The goal is at least 20x at concurrency 32.

    .venv/bin/python bench/datagen.py                  # 300 images, concurrency 32
    .venv/bin/python bench/datagen.py --images 300 --concurrency 64
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

MODEL = "bench-mllm"
CATEGORIES = ["upper_bust", "whole_normal"]  # icm-sexy products: one sexy, one not


def positive(i: int) -> bool:
    return i % 2 == 0


def combined_reply(i: int) -> str:
    sexy = positive(i)
    verdict = "The image is sexy" if sexy else "The image is not sexy"
    why = (f"because the close framing in front of the poster img-{i} and the pose draw attention to the body "
           "in a suggestive way." if sexy else
           f"because the clothing is ordinary and the poster img-{i}, the pose and the setting are not suggestive.")
    explicit = (f"A woman stands in front of a plain wall with a small poster labelled img-{i}. "
                "She wears a fitted top and her hair falls over her shoulders; her arms rest at her sides.")
    implicit = "The soft light and the calm setting give the picture a quiet, personal mood, like a casual portrait."
    return f"1. Explicit content: {explicit}\n\n2. Implicit content: {implicit}\n\n3. {verdict} {why}"


QA_REPLY = (
    "| type | question | choices | answer |\n|---|---|---|---|\n"
    "| yes/no | Is the woman standing? | | Yes |\n"
    "| yes/no | Is she lying on a bed? | | No |\n"
    "| choice | What is behind her? | A. A window B. A plain wall C. A car D. A tree | B |\n"
    "| what | What is the mood of the picture? | | Quiet and personal. |\n"
    "| how | How are her arms placed? | | At her sides. |\n"
)


class Server:
    """The simulated deployment: latency 100-300 ms, 10% transient failures, counts requests."""

    def __init__(self, *, seed: int = 0, min_ms: float = 100, max_ms: float = 300, fail: float = 0.10) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.min_ms, self.max_ms, self.fail = min_ms, max_ms, fail
        self.requests = self.failures = 0
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                status, payload = server.reply(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 256
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reply(self, body: dict[str, Any]) -> tuple[int, bytes]:
        with self.lock:
            delay = self.rng.uniform(self.min_ms, self.max_ms) / 1000
            failed = self.rng.random() < self.fail
            self.requests += 1
            self.failures += failed
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(delay)
        finally:
            with self.lock:
                self.in_flight -= 1
        if failed:
            return 503, b'{"error": {"message": "server busy (injected)"}}'
        image_i, is_qa = -1, False
        for m in body.get("messages") or []:
            content = m.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            for part in parts:
                if part.get("type") == "image_url":
                    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    with Image.open(io.BytesIO(data)) as im:
                        image_i = im.size[0] - 40
                elif "question-answer pairs" in (part.get("text") or ""):
                    is_qa = True
        text = QA_REPLY if is_qa else combined_reply(image_i)
        out = {
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": body.get("model", MODEL),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 500, "completion_tokens": 120, "total_tokens": 620},
        }
        return 200, json.dumps(out).encode()


def make_images(root: Path, n: int) -> Path:
    folder = root / "by_product"
    for i in range(n):
        p = folder / CATEGORIES[0 if positive(i) else 1] / f"img{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 30), (i % 256, 120, 200 - i % 200)).save(p)
    return folder


def sequential(folder: Path, url: str, out: Path, *, attempts: int = 5) -> tuple[float, Counter[str]]:
    """The paper's way: one image at a time, one request at a time; returns seconds and records per image."""
    from icm.data.generate import GenerateConfig
    from icm.data.generate_prompts import qa_prompt, split_combined_answer
    from icm.data.inputs import load_samples
    from icm.policy import load_policy
    from icm.policy.prompts import stage_prompts

    policy = load_policy("icm-sexy")
    config = GenerateConfig(inputs=[str(folder)])
    samples, _ = load_samples([str(folder)], policy)
    written: Counter[str] = Counter()
    t0 = time.perf_counter()

    def ask(client: httpx.Client, messages: list[dict[str, Any]]) -> str:
        for _ in range(attempts):
            r = client.post("/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0})
            if r.status_code == 200:
                return r.json()["choices"][0]["message"]["content"]
        raise RuntimeError(f"gave up after {attempts} attempts: {r.status_code}")

    with httpx.Client(base_url=url, timeout=30) as client, open(out, "w", encoding="utf-8") as fh:
        for s in samples:
            prompts = stage_prompts(policy, s.product.id)
            data = base64.b64encode(Path(s.path).read_bytes()).decode()
            image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
            answer = ask(client, [{"role": "user", "content": [image, {"type": "text", "text": prompts.combined}]}])
            parts = split_combined_answer(answer)
            explanation = parts[2] if parts else answer
            qa = ask(client, [{"role": "user", "content": qa_prompt(policy, config, explanation)}])
            fh.write(json.dumps({"image": str(s.path), "product": s.product.id, "answer": answer, "qa": qa}) + "\n")
            fh.flush()
            written[str(s.path)] += 1
    return time.perf_counter() - t0, written


def ours(folder: Path, url: str, out: Path, concurrency: int) -> tuple[float, Counter[str], Any]:
    from icm.data.generate import GenerateConfig, generate
    from icm.data.outputs import read_records

    config = GenerateConfig(
        inputs=[str(folder)], out=str(out), policy="icm-sexy", mllm_model=MODEL, mllm_base_url=url,
        concurrency=concurrency, max_retries=5, backoff=0.05, timeout=30,
    )
    t0 = time.perf_counter()
    summary = generate(config)
    seconds = time.perf_counter() - t0
    written: Counter[str] = Counter(r.image for r in read_records(out))
    return seconds, written, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import openai  # noqa: F401 - imported before the timings, as below

    import icm.data.generate  # noqa: F401 - imports (openai's alone takes about a second) are not part of either timing

    with tempfile.TemporaryDirectory(prefix="icm-bench-datagen-") as tmp:
        root = Path(tmp)
        folder = make_images(root, args.images)
        with Server(seed=args.seed) as server:
            seq_s, seq_written = sequential(folder, server.url, root / "sequential.jsonl")
            seq_requests, seq_failures = server.requests, server.failures
            server.requests = server.failures = server.max_in_flight = 0
            our_s, our_written, summary = ours(folder, server.url, root / "ours", args.concurrency)
        n = args.images
        rows = [
            ("sequential (1 request at a time)", seq_s, seq_written, seq_requests, seq_failures, 1),
            (f"icm data generate (concurrency {args.concurrency})", our_s, our_written, server.requests, server.failures,
             server.max_in_flight),
        ]
        print(f"{n} images, 2 requests each (description+explanation, Q-A), latency 100-300 ms, 10% injected 503s")
        print(f"{'':40} {'records/s':>10} {'seconds':>8} {'requests':>9} {'failed':>7} {'in flight':>9} {'lost':>5} {'dup':>4}")
        for name, secs, written, reqs, fails, peak in rows:
            lost = sum(1 for i in range(n) if not any(f"img{i:04d}.png" in k for k in written))
            dup = sum(v - 1 for v in written.values() if v > 1)
            print(f"{name:40} {sum(written.values()) / secs:10.2f} {secs:8.1f} {reqs:9d} {fails:7d} {peak:9d} {lost:5d} {dup:4d}")
        ratio = (sum(our_written.values()) / our_s) / (sum(seq_written.values()) / seq_s)
        print(f"speed-up: {ratio:.1f}x (goal: at least 20x at concurrency 32)")
        print(f"pipeline summary: written {summary.written}, rejected {summary.rejected}, failed {summary.failed}")


if __name__ == "__main__":
    main()
