"""`icm chat`: the ChatSession library layer, token streaming (tiny hf model, OpenAI-style
server-sent events on loopback) and one end-to-end run of the CLI with piped input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from icm.chat import ChatSession, Sampling, policy_context
from icm.moderation.backends.base import Backend, Choice, YesNoScore
from icm.moderation.engine import Moderator
from icm.policy import load_policy

from serve_helpers import live_server

try:  # the fake OpenAI-compatible server's annotations need it at module level
    from fastapi import Request
except ImportError:  # pragma: no cover - the test that uses it skips
    Request = None  # type: ignore[assignment,misc]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


class EchoBackend(Backend):
    """Answers with what it was shown: the image's mean colour and the last question.

    Records every conversation and image it gets. Scores like a redness detector, so
    /verdict gives a real engine decision.
    """

    name = "echo"
    capabilities = frozenset({"score_yes_no", "choose", "generate"})

    def __init__(self) -> None:
        self.calls: list[tuple[Image.Image, list[dict[str, Any]], dict[str, Any]]] = []

    @staticmethod
    def red(image: Image.Image) -> float:
        a = np.asarray(image.convert("RGB"), dtype=np.float64)
        return float((a[..., 0] / (a.sum(axis=-1) + 1e-9)).mean())

    def score_yes_no(self, images, questions):
        return [YesNoScore(p_yes=min(1.0, max(0.0, (self.red(im) - 0.2) * 1.6)), source="echo") for im in images]

    def choose(self, images, question, options):
        out = []
        for im in images:
            probs = [0.01] * len(options)
            probs[0 if self.red(im) > 0.5 else -1] = 1.0
            out.append(Choice(probs=probs, source="echo"))
        return out

    def generate(self, images, messages, *, max_new_tokens=256, temperature=0.0, top_p=None, seed=None):
        out = []
        for im, conv in zip(images, messages, strict=True):
            self.calls.append((im, [dict(m) for m in conv], {"temperature": temperature, "seed": seed}))
            mean = tuple(int(v) for v in np.asarray(im.convert("RGB")).reshape(-1, 3).mean(axis=0))
            out.append(f"colour {mean}; you asked: {conv[-1]['content']}")
        return out


def _solid(tmp_path: Path, name: str, colour: tuple[int, int, int]) -> Path:
    p = tmp_path / name
    Image.new("RGB", (24, 24), colour).save(p)
    return p


def test_conversation_history_policy_context_and_commands(tmp_path):
    backend = EchoBackend()
    s = ChatSession(backend, policy="icm-sexy", sampling=Sampling(temperature=0.7, seed=5))
    assert s.handle("hello").kind == "error"  # no image yet
    red, blue = _solid(tmp_path, "red.png", (240, 10, 10)), _solid(tmp_path, "blue.png", (10, 10, 240))
    assert s.handle(f"/image {red}").kind == "info"

    pieces: list[str] = []
    e1 = s.handle("What is shown?", on_token=pieces.append)
    assert e1.kind == "answer" and e1.text == "colour (240, 10, 10); you asked: What is shown?"
    assert "".join(pieces) == e1.text
    e2 = s.handle("And the rules?")
    # the second question carries the first turn; the system prompt carries the policy
    _, conv, opts = backend.calls[-1]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user"]
    assert conv[1]["content"] == "What is shown?" and conv[2]["content"] == e1.text
    assert opts == {"temperature": 0.7, "seed": 5}
    system = conv[0]["content"]
    assert "icm-sexy" in system and "Is the image sexy?" in system and "'icm-default'" in system
    assert system == policy_context(load_policy("icm-sexy"), load_policy("icm-sexy").rule_set("icm-default"))
    assert e2.kind == "answer"

    # /rules switches the rule set and keeps the conversation
    ev = s.handle("/rules adult-platform")
    assert ev.kind == "info" and "adult-platform" in ev.text
    s.handle("Now?")
    _, conv, _ = backend.calls[-1]
    assert "'adult-platform'" in conv[0]["content"] and len(conv) == 6
    assert conv[0]["content"] != system
    bad = s.handle("/rules martian")
    assert bad.kind == "error" and "martian" in bad.text and "children" in bad.text
    assert s.rule_set.name == "adult-platform"

    # /verdict is the engine's decision, and it joins the system prompt
    v = s.handle("/verdict")
    expected = Moderator(EchoBackend(), policy="icm-sexy", rules="adult-platform").moderate_paths([str(red)])[0]
    assert v.kind == "verdict" and v.record is not None
    assert (v.record.verdict, v.record.product, v.record.rule) == (expected.verdict, expected.product, expected.rule)
    assert v.record.sha256 == expected.sha256
    s.handle("Why?")
    _, conv, _ = backend.calls[-1]
    assert f"verdict on this image under 'adult-platform': {expected.verdict}" in conv[0]["content"]
    assert expected.product in conv[0]["content"]

    # /image starts over with the new image
    ev = s.handle(f"/image {blue}")
    assert ev.kind == "info" and "24x24" in ev.text and s.history == [] and s.last_verdict is None
    ans = s.handle("What is shown?")
    im, conv, _ = backend.calls[-1]
    assert im.getpixel((0, 0)) == (10, 10, 240) and len(conv) == 2 and ans.text.startswith("colour (10, 10, 240)")

    missing = s.handle(f"/image {tmp_path / 'nope.jpg'}")
    assert missing.kind == "error" and "no such file" in missing.text
    (tmp_path / "notes.jpg").write_text("a shopping list")
    assert "text" in s.handle(f"/image {tmp_path / 'notes.jpg'}").text
    assert s.image is not None and s.image.image.getpixel((0, 0)) == (10, 10, 240), "a bad /image keeps the old one"

    assert s.handle("/reset").kind == "info" and s.history == []
    assert "/verdict" in s.handle("/help").text and "children" in s.handle("/help").text
    assert s.handle("/frobnicate").kind == "error"
    assert s.handle("/quit").kind == "quit"


def test_detector_can_give_verdicts_but_not_chat(tmp_path):
    from icm.moderation.backends import create_backend

    with create_backend("detector") as det:
        s = ChatSession(det, rules="children")
        s.open_image(EXAMPLES / "flower.jpg")
        ev = s.handle("is this ok?")
        assert ev.kind == "error" and "cannot generate text" in ev.text and "/verdict" in ev.text
        assert s.history == []
        v = s.handle("/verdict")
        assert v.kind == "verdict" and v.record.verdict == "allow" and v.record.rules == "children"


def test_sampling_is_validated():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            Sampling(**bad)
    assert Sampling().greedy and not Sampling(temperature=0.5).greedy


# --------------------------------------------------------------------------- hf streaming


@pytest.fixture(scope="module")
def tiny_chat(tiny_llava_path):
    from icm.moderation.backends.hf import HFBackend

    backend = HFBackend(model=str(tiny_llava_path), batch_size=1)
    yield backend
    backend.close()


def test_hf_streams_tokens_deterministically_by_default(tiny_chat, monkeypatch):
    generate = tiny_chat.model.generate
    lengths: list[tuple[int, int]] = []

    def spy(**kwargs):
        out = generate(**kwargs)
        lengths.append((kwargs["input_ids"].shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(tiny_chat.model, "generate", spy)
    pieces: list[str] = []
    s = ChatSession(tiny_chat, sampling=Sampling(max_new_tokens=12))
    s.open_image(EXAMPLES / "grace_hopper.jpg")
    ev = s.ask("What is in the image?", on_token=pieces.append)
    assert ev.kind == "answer" and ev.text
    assert len(pieces) >= 2, f"the answer came in one piece: {pieces!r}"
    assert "".join(pieces).strip() == ev.text
    prompt_len, total_len = lengths[-1]
    assert 0 < total_len - prompt_len <= 12  # max_new_tokens

    again = ChatSession(tiny_chat, sampling=Sampling(max_new_tokens=12))
    again.open_image(EXAMPLES / "grace_hopper.jpg")
    assert again.ask("What is in the image?").text == ev.text, "greedy decoding is deterministic"
    # a second turn sees the first: the prompt grows, so the answer is generated anew
    second = s.ask("Which rule applies if the audience is children?")
    assert second.kind == "answer" and len(s.history) == 4
    assert lengths[-1][0] > total_len, "the second prompt holds the first question and answer"


def test_hf_sampling_is_reproducible_with_a_seed(tiny_chat):
    def answer(seed: int) -> str:
        s = ChatSession(tiny_chat, sampling=Sampling(temperature=1.5, top_p=0.95, seed=seed, max_new_tokens=16))
        s.open_image(EXAMPLES / "flower.jpg")
        return s.ask("Describe the image.").text

    a, b = answer(1), answer(1)
    assert a == b
    others = {answer(seed) for seed in (2, 3, 4)}
    assert others != {a}, "different seeds should not all give the same sampled answer"


# --------------------------------------------------------------------------- openai streaming


class _SSEServer:
    """An OpenAI-compatible /chat/completions on loopback, streaming or not."""

    def __init__(self, mode: str = "stream") -> None:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse

        self.mode = mode
        self.requests: list[dict[str, Any]] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def completions(request: Request):
            body = await request.json()
            self.requests.append({"body": body, "auth": request.headers.get("authorization")})
            if self.mode == "error":
                return JSONResponse({"error": {"message": "model overloaded"}}, status_code=503)
            if self.mode == "json" or not body.get("stream"):
                return JSONResponse({"choices": [{"message": {"role": "assistant", "content": "Plain answer."}}]})

            async def events():
                for piece in ("The image ", "shows a ", "flower."):
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        self.app = app

    def __enter__(self) -> _SSEServer:
        self._running = live_server(self.app)
        self.url = self._running.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running.__exit__(None, None, None)


def test_openai_backend_streams_server_sent_events():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from icm.moderation.backends.openai_compat import OpenAIBackend

    for mode, expected_pieces in (("stream", ["The image ", "shows a ", "flower."]), ("json", ["Plain answer."])):
        with _SSEServer(mode) as srv:
            backend = OpenAIBackend("served-vlm", base_url=f"{srv.url}/v1", api_key="sk-test")
            s = ChatSession(backend, rules="children", sampling=Sampling(seed=11, max_new_tokens=40))
            s.open_image(EXAMPLES / "flower.jpg")
            pieces: list[str] = []
            ev = s.ask("What is it?", on_token=pieces.append)
            assert ev.kind == "answer" and pieces == expected_pieces and ev.text == "".join(pieces).strip()
            req = srv.requests[-1]
            body = req["body"]
            assert req["auth"] == "Bearer sk-test"
            assert body["stream"] is True and body["model"] == "served-vlm" and body["max_tokens"] == 40
            assert body["temperature"] == 0.0 and body["seed"] == 11 and "top_p" not in body
            roles = [m["role"] for m in body["messages"]]
            assert roles == ["system", "user"] and "'children'" in body["messages"][0]["content"]
            user = body["messages"][1]["content"]
            assert user[0]["type"] == "image_url" and user[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
            assert user[1] == {"type": "text", "text": "What is it?"}
            backend.close()
    with _SSEServer("error") as srv:
        backend = OpenAIBackend("served-vlm", base_url=f"{srv.url}/v1", max_retries=1, backoff_base=0.01)
        s = ChatSession(backend)
        s.open_image(EXAMPLES / "flower.jpg")
        ev = s.ask("What is it?")
        assert ev.kind == "error" and "503" in ev.text and "overloaded" in ev.text
        assert len(srv.requests) == 2, "a streamed answer is retried like every other request"
        assert s.history == [], "a failed turn is not part of the conversation"
        backend.close()


# --------------------------------------------------------------------------- end to end


def test_icm_chat_end_to_end_with_piped_input(tiny_llava_path, tmp_path):
    script = "\n".join([
        "What is in the image?",
        "/rules children",
        "/verdict",
        "Why is it flagged?",
        "/rules nope",
        f"/image {EXAMPLES / 'flower.jpg'}",
        "/quit",
        "never read",
    ]) + "\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "icm.cli.main", "chat", str(EXAMPLES / "grace_hopper.jpg"),
         "--model", str(tiny_llava_path), "--max-new-tokens", "8", "--verdict-backend", "detector"],
        input=script, capture_output=True, text=True, timeout=240, env=env,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "icm chat: " in out and "grace_hopper.jpg (512x600)" in out and "greedy" in out
    lines = out.splitlines()
    answers = [line for line in lines if line.startswith("assistant> ")]
    assert len(answers) == 2 and all(len(a) > len("assistant> ") for a in answers)
    assert "rule set: children (A service for children under 13)" in out
    verdict = next(line for line in lines if line.startswith("verdict: "))
    assert "rules: children" in verdict and verdict.split()[1] in ("ALLOW", "REVIEW", "BLOCK")
    assert "  reason: P(sexy)=" in out
    if importlib.util.find_spec("nudenet") is not None:
        assert "  box: FACE_FEMALE" in out  # the detector's box on the face
    assert "error: policy 'icm-sexy' has no rule set 'nope'" in out
    assert "image: " in out and "flower.jpg (640x427); new conversation" in out
    assert "never read" not in out
