"""`icm data generate` against a scripted OpenAI-compatible server on loopback.

The server (stdlib ``ThreadingHTTPServer`` in a thread, ephemeral port on 127.0.0.1)
answers like a vLLM/Ollama chat endpoint. The image a request is about is read from the
image itself (test image ``i`` is ``40 + i`` pixels wide); text-only Q-A requests carry
the ``img-<i>`` tag the MLLM wrote into its description. Per image the script gives a
realistic answer (three shapes of the multi-question answer, three shapes of Q-A table),
a malformed one (refusal, first person, no numbered parts, contradicting verdict, cut
off, no table) or a failing one (malformed JSON once, 503 twice, 429 once, 500 always).
Every request is logged with the image, the stage and whether it was answered.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from icm.data import GenerateConfig, generate, plan_prompts, read_records, read_rejected, split_combined_answer
from icm.data.inputs import file_sha256
from icm.policy import load_policy

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
LLM = "Qwen/Qwen2.5-7B-Instruct"
REPO = Path(__file__).resolve().parents[1]

# image index -> product category (positive ones first in each pair)
CATEGORIES = ["upper_bust", "whole_normal", "bite_finger", "lower_normal"]
N_IMAGES = 24
REFUSAL, FIRST_PERSON, NO_SECTIONS, CONTRADICTS, NO_TABLE, CUT_OFF = 3, 7, 10, 15, 18, 20
BAD_JSON_ONCE, BUSY_TWICE, RATE_LIMITED_ONCE, ALWAYS_500 = 5, 9, 11, 13
EXPECTED_REJECTED = {REFUSAL: "refusal", FIRST_PERSON: "first_person", NO_SECTIONS: "sections",
                     CONTRADICTS: "contradiction", NO_TABLE: "no_table", CUT_OFF: "truncated"}


def category(i: int) -> str:
    return CATEGORIES[i % len(CATEGORIES)]


def positive(i: int) -> bool:
    return "normal" not in category(i)


# --------------------------------------------------------------------------- replies


def combined_reply(i: int) -> str:
    sexy = positive(i)
    verdict = "The image is sexy" if sexy else "The image is not sexy"
    why = (f"because the close framing in front of the poster img-{i} and the pose draw attention to the body "
           "in a suggestive way." if sexy else
           f"because the clothing is ordinary and the poster img-{i}, the pose and the setting are not suggestive.")
    explicit = (f"A woman stands in front of a plain wall with a small poster labelled img-{i}. "
                "She wears a fitted top and her hair falls over her shoulders; her arms rest at her sides.")
    implicit = "The soft light and the calm setting give the picture a quiet, personal mood, like a casual portrait."
    if i == REFUSAL:
        return "I'm sorry, but I can't help with describing this image."
    if i == NO_SECTIONS:
        return f"{explicit} {implicit} {verdict} {why}"
    if i == FIRST_PERSON:
        verdict = "I think " + verdict[0].lower() + verdict[1:]
    if i == CONTRADICTS:
        verdict = "The image is not sexy" if sexy else "The image is sexy"
    if i == CUT_OFF:
        why = f"because the framing in front of the poster img-{i} and the way she"
    shape = i % 3
    if shape == 0:
        return f"1. Explicit content: {explicit}\n\n2. Implicit content: {implicit}\n\n3. {verdict} {why}"
    if shape == 1:
        return (f"Sure. Here are my answers.\n\n**1. Explicit content:**\n{explicit}\n\n**2. Implicit content:**\n"
                f"{implicit}\n\n**3. Is the image sexy?**\n{verdict} {why}")
    return f"### Explicit content\n{explicit}\n\n### Implicit content\n{implicit}\n\n### Verdict\n{verdict}, {why}"


def qa_reply(i: int) -> str:
    if i == NO_TABLE:
        return "Sure! 1. Is she standing? Yes. 2. What is on the wall? A poster."
    shape = i % 3
    if shape == 0:  # choices in one cell, text around the table
        return (
            "Here are the question-answer pairs:\n\n"
            "| type | question | choices | answer |\n|---|---|---|---|\n"
            "| yes/no | Is the woman standing? | | Yes |\n"
            "| yes/no | Is she lying on a bed? | | No |\n"
            "| choice | What is behind her? | A. A window B. A plain wall C. A car D. A tree | B |\n"
            "| choice | What does she wear? | A) A coat, B) A fitted top, C) A swimsuit, D) A scarf | B) A fitted top |\n"
            "| what | What is the mood of the picture? | | Quiet and personal. |\n"
            "| how | How are her arms placed? | | At her sides. |\n\n"
            "Let me know if you need more."
        )
    if shape == 1:  # the released data's shape: choices spread over four cells, placeholder cell
        return (
            "| Question | Choices | Answer |\n| --- | --- | --- |\n"
            "| What is behind the woman? |A. A window |B. A plain wall |C. A car |D. A tree |B. |\n"
            "| What does she wear? |A - A coat |B - A fitted top |C - A swimsuit |D - A scarf | |B. |\n"
            "| Where is the poster? |A. On the wall |B. On the floor |C. In her hand |D. On a car |. |\n"
        )
    return (  # ✓/✘ answers, bold, a missing cell
        "```markdown\n| Type | Question | Answer |\n|------|----------|--------|\n"
        "| Yes/No | **Is the woman smiling?** | ✘ |\n"
        "| Yes/No | Is there a poster on the wall? | ✓ |\n"
        "| What | What is on the poster? |\n"
        "| How | How is her hair styled? | It falls over her shoulders. |\n```"
    )


def completion(text: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1735689600, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def stage_of(text: str) -> str:
    if "Answer the three questions" in text:
        return "combined"
    if "question-answer pairs" in text:
        return "qa"
    if "Based on the explicit and the implicit content" in text:
        return "explanation"
    if "Describe only what is visibly" in text:
        return "explicit"
    if "beyond what is literally shown" in text:
        return "implicit"
    return "unknown"


class Script:
    """The server's state: the request log and per-(image, stage) attempt counts."""

    def __init__(self, delay: float = 0.0, bad_json: bool = True) -> None:
        self.delay = delay
        self.bad_json = bad_json
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.attempts: Counter[tuple[int, str]] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    def answered(self) -> Counter[tuple[int, str]]:
        with self.lock:
            return Counter((e["image"], e["stage"]) for e in self.log if e["status"] == 200 and e["ok"])

    def reply(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        msgs = body.get("messages") or []
        image_i, texts = None, []
        for m in msgs:
            content = m.get("content")
            if isinstance(content, list):
                for part in content:
                    if part.get("type") == "image_url":
                        data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                        with Image.open(io.BytesIO(data)) as im:
                            image_i = im.size[0] - 40
                    elif part.get("type") == "text":
                        texts.append(part["text"])
            elif isinstance(content, str):
                texts.append(content)
        last_user = next((m for m in reversed(msgs) if m.get("role") == "user"), {})
        lu = last_user.get("content")
        last_text = lu if isinstance(lu, str) else " ".join(p.get("text", "") for p in lu or [] if isinstance(p, dict))
        stage = stage_of(last_text)
        if image_i is None:
            m = re.search(r"img-(\d+)", " ".join(texts))
            image_i = int(m.group(1)) if m else -1
        with self.lock:
            self.attempts[(image_i, stage)] += 1
            attempt = self.attempts[(image_i, stage)]
        status, headers, ok = 200, {"Content-Type": "application/json"}, True
        if image_i == ALWAYS_500:
            status, payload = 500, json.dumps({"object": "error", "message": "CUDA out of memory"}).encode()
        elif image_i == BUSY_TWICE and stage == "qa" and attempt <= 2:
            status, payload = 503, b'{"error": {"message": "server busy"}}'
        elif image_i == RATE_LIMITED_ONCE and attempt == 1:
            status, payload = 429, b'{"error": {"message": "rate limited"}}'
            headers["Retry-After"] = "0"
        elif self.bad_json and image_i == BAD_JSON_ONCE and stage == "combined" and attempt == 1:
            payload, ok = b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "The im', False
        else:
            text = qa_reply(image_i) if stage == "qa" else combined_reply(image_i)
            payload = json.dumps(completion(text, 700 if stage != "qa" else 300, 120)).encode()
        with self.lock:
            self.log.append({"image": image_i, "stage": stage, "status": status, "ok": ok, "attempt": attempt,
                             "model": body.get("model")})
        return status, headers, payload


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script(delay=0.03)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(n) or b"{}")
            with script.lock:
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
            try:
                time.sleep(script.delay)
                status, headers, payload = script.reply(body)
            finally:
                with script.lock:
                    script.in_flight -= 1
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client was killed mid-request

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", script
    finally:
        httpd.shutdown()
        httpd.server_close()


def make_images(root: Path) -> tuple[Path, dict[int, Path]]:
    """Images 0..N-1: folders per category for most, a CSV for the last four."""
    folder = root / "by_product"
    paths: dict[int, Path] = {}
    rows = ["image,product"]
    for i in range(N_IMAGES):
        colour = (10 * i % 256, 120, 200 - 5 * i)
        if i < N_IMAGES - 4:
            p = folder / category(i) / f"img{i:02d}.png"
        else:
            p = root / "listed" / f"img{i:02d}.png"
            rows.append(f"listed/img{i:02d}.png,{category(i)}")
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 30), colour).save(p)
        paths[i] = p
    (root / "more.csv").write_text("\n".join(rows) + "\n")
    return folder, paths


def base_cmd(url: str, inputs: list[Path], out: Path) -> list[str]:
    return [
        sys.executable, "-m", "icm.cli.main", "data", "generate", *map(str, inputs), "--out", str(out),
        "--mllm-model", MODEL, "--mllm-base-url", url, "--llm-model", LLM, "--concurrency", "3",
        "--retries", "2", "--backoff", "0.01", "--timeout", "10", "--json",
    ]


def check_exactly_once(out: Path, paths: dict[int, Path]) -> None:
    policy = load_policy("icm-sexy")
    ids = {i: f"{policy.resolve_category(category(i)).id}-{file_sha256(p)[:16]}" for i, p in paths.items()}
    lines = (out / "records.jsonl").read_text().splitlines()
    records = read_records(out)
    assert len(lines) == len(records), "a records.jsonl line is not a record"
    got = Counter(r.id for r in records)
    assert all(n == 1 for n in got.values()), f"duplicated records: {[k for k, n in got.items() if n > 1]}"
    rejected = read_rejected(out)
    keys = Counter(r.key for r in rejected)
    assert all(n == 1 for n in keys.values()), f"duplicated rejections: {[k for k, n in keys.items() if n > 1]}"
    items = {r.id: r for r in rejected if r.item}
    expected_written = {ids[i] for i in range(N_IMAGES) if i not in EXPECTED_REJECTED and i != ALWAYS_500}
    assert set(got) == expected_written
    assert {i for i in range(N_IMAGES) if ids[i] in items} == set(EXPECTED_REJECTED)
    for i, reason in EXPECTED_REJECTED.items():
        assert items[ids[i]].reason == reason, (i, items[ids[i]])
        assert items[ids[i]].raw, "a quarantined item keeps the raw model output"
    assert ids[ALWAYS_500] not in got and ids[ALWAYS_500] not in items
    # Q-A rows that could not be used are quarantined one by one, with the record kept
    rows = [r for r in rejected if not r.item]
    assert rows and all(r.id in got for r in rows)
    assert {r.reason for r in rows} == {"no_answer"}


# --------------------------------------------------------------------------- tests


def test_split_combined_answer_shapes():
    for i in (0, 1, 2):
        parts = split_combined_answer(combined_reply(i))
        assert parts is not None, combined_reply(i)
        explicit, implicit, explanation = parts
        assert explicit.startswith("A woman stands") and f"img-{i}" in explicit
        assert implicit.startswith("The soft light")
        assert explanation.startswith("The image is")
    assert split_combined_answer(combined_reply(NO_SECTIONS)) is None
    assert split_combined_answer("") is None
    three = "She stands by a wall.\n\nThe mood is calm.\n\nThe image is not sexy because it is ordinary."
    assert split_combined_answer(three) == ("She stands by a wall.", "The mood is calm.",
                                            "The image is not sexy because it is ordinary.")


def test_dry_run_prints_the_policy_prompts_and_sends_nothing(tmp_path, server):
    url, script = server
    folder, _ = make_images(tmp_path)
    out = tmp_path / "out"
    cmd = base_cmd(url, [folder], out)
    cmd.remove("--json")
    done = subprocess.run([*cmd, "--dry-run", "--mode", "separate", "--yes-no", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    policy = load_policy("icm-sexy")
    hint = policy.resolve_category("upper_bust").description
    assert hint in done.stdout and "Describe only what is visibly" in done.stdout
    assert "2 yes/no" in done.stdout
    assert "20 images" in done.stdout and "nothing was sent" in done.stdout
    assert script.log == [] and not (out / "records.jsonl").exists()
    plan = plan_prompts(GenerateConfig(inputs=[str(folder)], dry_run=True))
    assert plan.requests_per_image == 2 and sum(plan.products.values()) == 20


def test_library_run_then_rerun_is_free(tmp_path, server):
    url, script = server
    folder, paths = make_images(tmp_path)
    out = tmp_path / "out"
    cfg = GenerateConfig(
        inputs=[str(folder), str(tmp_path / "more.csv")], out=str(out), mllm_model=MODEL, mllm_base_url=url,
        llm_model=LLM, concurrency=4, max_retries=2, backoff=0.01, timeout=10,
    )
    first = generate(cfg)
    # image 5's malformed JSON is retried like a 5xx (issue 19); only the always-500 image fails
    assert first.failed == 1 and {f.image for f in first.failures} == {str(paths[ALWAYS_500])}
    assert first.written == N_IMAGES - len(EXPECTED_REJECTED) - 1
    assert first.rejected == len(EXPECTED_REJECTED)
    assert first.retries >= 2 + 1 + 2 + 1  # 503 twice, 429 once, 500 on both retries, the malformed JSON once
    assert first.prompt_tokens > 0 and first.completion_tokens > 0
    assert script.max_in_flight <= 4
    models = {e["model"] for e in script.log}
    assert models == {MODEL, LLM}
    second = generate(cfg)
    assert second.written == 0 and second.skipped == N_IMAGES - 1 and second.failed == 1
    check_exactly_once(out, paths)
    third_log = len(script.log)
    third = generate(cfg)
    # only the permanently failing image is asked again; everything else is done or cached
    asked = {e["image"] for e in script.log[third_log:]}
    assert asked == {ALWAYS_500}
    assert third.written == 0 and third.skipped == N_IMAGES - 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 1 and summary["records_total"] == len(read_records(out))
    # a record carries every stage's output
    rec = next(r for r in read_records(out) if r.image == str(paths[0]))
    assert rec.explicit and "img-0" in rec.explicit.text and rec.implicit and rec.explanation
    assert rec.explanation.verdict is True and rec.explanation.expected is True and rec.positive
    assert [q.kind for q in rec.qa] == ["yes_no", "yes_no", "choice", "choice", "what", "how"]
    assert rec.qa[3].choices == ["A coat", "A fitted top", "A swimsuit", "A scarf"] and rec.qa[3].answer == "B"


def test_separate_mode_asks_each_stage_in_one_conversation(tmp_path, server):
    url, script = server
    _folder, paths = make_images(tmp_path)
    one = tmp_path / "one.csv"
    one.write_text(f"image,product\n{paths[4]},upper_bust\n")
    out = tmp_path / "sep"
    cfg = GenerateConfig(inputs=[str(one)], out=str(out), mllm_model=MODEL, mllm_base_url=url, llm_model=LLM,
                         mode="separate", max_retries=0)
    # the server answers every image stage with the combined text; in separate mode the
    # explanation stage must come back as its own text, so give it a proper answer
    original = script.reply

    def reply(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        status, headers, payload = original(body)
        stage = script.log[-1]["stage"]
        texts = {"explicit": "A woman stands in front of a plain wall with a poster labelled img-4, in a fitted top.",
                 "implicit": "The picture has a calm, personal mood, like a casual portrait at home.",
                 "explanation": "The image is sexy because the close framing draws attention to her body."}
        if stage in texts:
            payload = json.dumps(completion(texts[stage], 500, 40)).encode()
        return status, headers, payload

    script.reply = reply  # type: ignore[method-assign]
    summary = generate(cfg)
    assert summary.written == 1, summary
    stages = [e["stage"] for e in script.log]
    assert sorted(stages) == ["explanation", "explicit", "implicit", "qa"]
    rec = read_records(out)[0]
    assert rec.meta["mode"] == "separate" and rec.explanation and rec.explanation.verdict is True


def test_sigkill_midway_then_resume_writes_every_record_once(tmp_path, server):
    """A real subprocess, a real SIGKILL, a resume: each image ends up exactly once, and
    no response cached before the kill is asked for again."""
    url, script = server
    script.bad_json = False  # keep this run's failures to the one permanent one
    folder, paths = make_images(tmp_path)
    out = tmp_path / "out"
    cmd = base_cmd(url, [folder, tmp_path / "more.csv"], out)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    records = out / "records.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and len(records.read_bytes().splitlines()) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()!r}"
    before_kill = len(script.log)
    with sqlite3.connect(out / "cache.sqlite") as db:
        cached = {(key.split(":", 1)[0], stage) for key, stage in db.execute("SELECT key, stage FROM replies")}  # key: sha:stage:prompt
    partial = len(read_records(out))
    assert 4 <= partial < N_IMAGES - len(EXPECTED_REJECTED) - 1
    # a kill can land in the middle of a line: leave one half-written behind
    with open(records, "a") as fh:
        fh.write('{"id": "upper_chest-0123456789abcdef", "image": "/tmp/x.png", "pol')

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert resumed.returncode == 1, resumed.stderr  # image 13 still fails, so the exit says so
    summary = json.loads(resumed.stdout)
    assert summary["skipped"] >= partial and summary["repaired_bytes"] > 0
    assert [f["image"] for f in summary["failures"]] == [str(paths[ALWAYS_500])]
    check_exactly_once(out, paths)

    # nothing that was cached before the kill was requested again after it
    sha_to_i = {file_sha256(p): i for i, p in paths.items()}
    asked_again = {(e["image"], e["stage"]) for e in script.log[before_kill:] if e["status"] == 200}
    cached_i = {(sha_to_i[sha], stage) for sha, stage in cached}
    assert not (asked_again & cached_i), sorted(asked_again & cached_i)
    # and every (image, stage) was answered successfully at most twice: once, plus at most
    # once more for a request in flight at the moment of the kill
    assert max(script.answered().values()) <= 2

    # a third run finds everything done: no request but the failing image's
    n = len(script.log)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert json.loads(again.stdout)["written"] == 0
    assert {e["image"] for e in script.log[n:]} == {ALWAYS_500}
    check_exactly_once(out, paths)
