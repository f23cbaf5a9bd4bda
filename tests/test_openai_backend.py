"""OpenAIBackend against a real OpenAI-compatible HTTP server on loopback.

The server (tests/fake_openai.py: FastAPI + uvicorn in a thread, ephemeral port on
127.0.0.1) replays scripted responses shaped like vLLM's and Ollama's, picked by a
``[k=NAME]`` tag in the question text, and records every request.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image

from icm.moderation.backends.base import BackendConfigError, Choice, Failed, NotJudged, Query, YesNoScore
from icm.moderation.backends.openai_compat import OpenAIBackend
from icm.moderation.backends.openai_parsing import (
    first_token_candidates,
    is_refusal,
    parse_choice_text,
    parse_yes_no_text,
)
from icm.policy.prompts_format import moderation_choice_prompt, yes_no_prompt

from fake_openai import MODEL, FakeOpenAIServer, Reply, text_body, vllm_error, vllm_logprobs_body


@pytest.fixture()
def make_backend(vlm: tuple[FakeOpenAIServer, str]) -> Iterator[Any]:
    made: list[OpenAIBackend] = []

    def make(**kw: Any) -> OpenAIBackend:
        opts: dict[str, Any] = dict(
            model=MODEL, base_url=vlm[1], api_key="sk-test", timeout=2.0, max_retries=2, backoff_base=0.01
        )
        opts.update(kw)
        backend = OpenAIBackend(**opts)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def img(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def decode_data_url(url: str) -> tuple[str, Image.Image]:
    m = re.fullmatch(r"data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)", url)
    assert m, url[:80]
    image = Image.open(io.BytesIO(base64.b64decode(m.group(2))))
    image.load()
    return m.group(1), image


def image_url_of(body: dict[str, Any]) -> str:
    first_user = next(m for m in body["messages"] if m["role"] == "user")
    part = first_user["content"][0]
    assert part["type"] == "image_url"
    return part["image_url"]["url"]


def softmax_share(first: list[float], second: list[float]) -> float:
    a = sum(math.exp(v) for v in first)
    b = sum(math.exp(v) for v in second)
    return a / (a + b)


# --------------------------------------------------------------------------- yes/no


def test_yes_no_probability_from_vllm_logprobs(fake: FakeOpenAIServer, make_backend: Any) -> None:
    top_a = [("Yes", -0.31), (" yes", -2.2), ("YES", -5.6), ("No", -1.45), ("no", -4.9), ("The", -6.3)]
    top_b = [("No", -0.07), ("Yes", -2.75), (" No", -5.1), ("I", -6.0)]
    fake.script("ya", Reply(json=vllm_logprobs_body(top_a, prompt_tokens=700)))
    fake.script("yb", Reply(json=vllm_logprobs_body(top_b, prompt_tokens=710)))
    backend = make_backend()
    questions = ["Is the image sexy? [k=ya]", "Does the image show a weapon? [k=yb]"]

    out = backend.score_yes_no([img(), img((0, 0, 255))], questions)

    exp_a = softmax_share([-0.31, -2.2, -5.6], [-1.45, -4.9])
    exp_b = softmax_share([-2.75], [-0.07, -5.1])
    assert out[0] is not None and out[1] is not None
    assert out[0].p_yes == pytest.approx(exp_a, rel=1e-9)
    assert out[1].p_yes == pytest.approx(exp_b, rel=1e-9)
    assert out[0].source == out[1].source == "logprobs"
    assert backend.last_errors == []

    body = fake.bodies("ya")[0]
    assert body["model"] == MODEL
    assert body["max_tokens"] == 16 and body["temperature"] == 0  # room to read a verbose or refusing answer
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    user = body["messages"][-1]
    assert user["role"] == "user"
    assert user["content"][0]["type"] == "image_url"
    assert user["content"][1] == {"type": "text", "text": yes_no_prompt(questions[0])}

    assert backend.stats.requests == 2
    assert backend.stats.prompt_tokens == 1410 and backend.stats.completion_tokens == 2
    assert backend.model_id == f"{MODEL}@{backend.base_url}"


@pytest.mark.parametrize(
    "top",
    [
        # "Yes" absent: imputed at the least listed logprob (-3.5, below the leftover mass).
        [("No", -0.2), ("Sorry", -2.5), ("I", -3.5)],
        # only one candidate returned: the leftover mass bounds the absent side.
        [("Yes", -0.02)],
    ],
)
def test_yes_no_one_side_missing_is_imputed_below_the_list(
    top: list[tuple[str, float]], fake: FakeOpenAIServer, make_backend: Any
) -> None:
    fake.script("half", Reply(json=vllm_logprobs_body(top)))
    out = make_backend().score_yes_no([img()], ["Is it? [k=half]"])

    listed = [lp for _, lp in top]
    bound = min(min(listed), math.log(1.0 - sum(math.exp(v) for v in listed)))
    yes = [lp for t, lp in top if t == "Yes"] or [bound]
    no = [lp for t, lp in top if t == "No"] or [bound]
    assert out[0] is not None and out[0].source == "logprobs"
    assert out[0].p_yes == pytest.approx(softmax_share(yes, no), rel=1e-9)
    assert out[0].raw["imputed"]["logprob"] == pytest.approx(bound)
    assert 0.0 < out[0].p_yes < 1.0


def test_yes_no_without_logprobs_is_read_from_text_at_the_stated_confidence(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script("t-yes", Reply(json=text_body("Yes.")))
    fake.script("t-no", Reply(json=text_body(" no")))
    nolp = text_body("Yes")
    nolp["choices"][0]["logprobs"] = None
    fake.script("t-null", Reply(json=nolp))
    fake.script("t-bad", Reply(json=text_body("Maybe")))
    backend = make_backend()

    out = backend.score_yes_no([img()] * 4, ["q [k=t-yes]", "q [k=t-no]", "q [k=t-null]", "q [k=t-bad]"])

    assert [o.p_yes for o in out[:3]] == [0.75, 0.25, 0.75]  # type: ignore[union-attr]  # one sample: never 0 or 1
    assert all(isinstance(o, YesNoScore) and o.source == "text" for o in out[:3])
    assert isinstance(out[3], NotJudged) and out[3].reason == "off-format" and out[3].raw["text"] == "Maybe"
    assert backend.last_errors == []  # an unreadable answer is not a failed request
    assert backend.stats.parsed_fallbacks == 3 and backend.stats.failures == 0


# --------------------------------------------------------------------------- choice


def test_choose_distribution_from_logprobs_and_parsed(fake: FakeOpenAIServer, make_backend: Any) -> None:
    options = ["no exposure", "partial exposure", "full exposure"]
    top = [("B", -1.2), (" C", -0.7), ("C", -2.05), ("D", -1.9), ("E", -2.5), ("The", -3.3), ("b", -3.0)]
    fake.script("c-lp", Reply(json=vllm_logprobs_body(top)))
    backend = make_backend()

    [lp_choice] = backend.choose([img()], "How exposed is the person? [k=c-lp]", options)

    a, b, c = math.exp(-1.2), math.exp(-0.7) + math.exp(-2.05), math.exp(-1.9)
    assert isinstance(lp_choice, Choice) and lp_choice.source == "logprobs"
    assert lp_choice.probs == pytest.approx([a / (a + b + c), b / (a + b + c), c / (a + b + c)], rel=1e-9)
    body = fake.bodies("c-lp")[0]
    assert body["messages"][-1]["content"][1]["text"] == moderation_choice_prompt("How exposed is the person? [k=c-lp]", options)
    assert "\nB. no exposure\nC. partial exposure\nD. full exposure\n" in body["messages"][-1]["content"][1]["text"]

    fake.script("c-txt", Reply(json=text_body("D. full exposure")))
    [parsed] = backend.choose([img()], "How exposed? [k=c-txt]", options)
    assert isinstance(parsed, Choice) and parsed.source == "text" and parsed.probs == [0.125, 0.125, 0.75]

    fake.script("c-bad", Reply(json=text_body("F")))
    [bad] = backend.choose([img()], "How exposed? [k=c-bad]", options)
    assert isinstance(bad, NotJudged) and bad.reason == "off-format" and "'F'" in bad.detail


def test_choose_missing_letters_share_the_leftover_mass(fake: FakeOpenAIServer, make_backend: Any) -> None:
    top = [("C", -0.05)]
    fake.script("c-miss", Reply(json=vllm_logprobs_body(top)))
    [choice] = make_backend().choose([img()], "Which? [k=c-miss]", ["x", "y", "z"])
    bound = min(-0.05, math.log((1 - math.exp(-0.05)) / 2))
    z = 2 * math.exp(bound) + math.exp(-0.05)
    assert isinstance(choice, Choice)
    assert choice.probs == pytest.approx([math.exp(bound) / z, math.exp(-0.05) / z, math.exp(bound) / z])


# --------------------------------------------------------------------------- failures


def test_429_retry_after_is_honoured(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script(
        "rl",
        Reply(429, json={"error": {"message": "Rate limit reached", "type": "requests"}}, headers={"Retry-After": "1"}),
        Reply(json=vllm_logprobs_body([("Yes", -0.2), ("No", -1.8)])),
    )
    backend = make_backend(backoff_base=0.01)
    t0 = time.monotonic()
    [score] = backend.score_yes_no([img()], ["q [k=rl]"])
    elapsed = time.monotonic() - t0

    assert fake.hits["rl"] == 2
    assert elapsed >= 0.9  # waited for Retry-After, not for the 10 ms backoff
    assert score is not None and score.p_yes == pytest.approx(softmax_share([-0.2], [-1.8]))
    assert backend.stats.retries == 1 and backend.stats.requests == 2 and backend.last_errors == []


def test_500_then_success_and_persistent_503_gives_up(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script("flaky", Reply(500, json=vllm_error(500, "CUDA error")), Reply(json=text_body("No")))
    fake.script("down", Reply(503, body=b"upstream unavailable"))
    backend = make_backend(max_retries=2)

    out = backend.score_yes_no([img(), img()], ["q [k=flaky]", "q [k=down]"])

    assert isinstance(out[0], YesNoScore) and out[0].p_yes == 0.25 and out[0].source == "text"
    assert isinstance(out[1], Failed) and out[1].status == 503 and "3 attempts" in out[1].error
    assert fake.hits["flaky"] == 2 and fake.hits["down"] == 3
    [err] = backend.last_errors
    assert err.index == 1 and err.status == 503
    assert "HTTP 503" in err.error and "upstream unavailable" in err.error and "3 attempts" in err.error
    assert backend.stats.retries == 1 + 2 and backend.stats.failures == 1


def test_client_errors_are_not_retried(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script("c4xx", Reply(400, json=vllm_error(400, "This model's maximum context length is 4096 tokens.")))
    backend = make_backend(max_retries=3)
    out = backend.score_yes_no([img(), img()], ["q [k=c4xx]", "fine [k=ok4xx]"])
    assert isinstance(out[0], Failed) and isinstance(out[1], YesNoScore)
    assert fake.hits["c4xx"] == 1
    [err] = backend.last_errors
    assert err.status == 400 and "HTTP 400" in err.error and "maximum context length" in err.error


@pytest.mark.parametrize(
    ("status", "payload", "message", "what"),
    [
        (404, {"error": {"message": "The model `gpt-x` does not exist", "code": "model_not_found"}}, "does not exist", "does not exist"),
        (401, {"detail": "Invalid API key"}, "Invalid API key", "API key was rejected"),
        (403, {"error": {"message": "Forbidden"}}, "Forbidden", "access was refused"),
    ],
)
def test_configuration_errors_stop_with_one_message(
    status: int, payload: dict[str, Any], message: str, what: str, fake: FakeOpenAIServer, make_backend: Any
) -> None:
    """401/403/404 cannot be fixed by a retry or another image: a BackendConfigError, not an item error."""
    fake.default = Reply(status, json=payload)
    backend = make_backend(max_retries=3)
    with pytest.raises(BackendConfigError) as info:
        backend.ask([img(), img()], [Query("term:t", "yes_no", "q"), Query("attr:a", "choice", "c", ("x", "y"))])
    assert what in str(info.value) and message in str(info.value) and f"HTTP {status}" in str(info.value)
    assert "sk-test" not in str(info.value)
    assert len(fake.requests) == 4  # one per query, none retried


def test_malformed_json_is_retried_then_a_per_item_error(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script("broken", Reply(body=b'{"id": "chatcmpl-1", "choices": [{"index": 0, "mess'))
    fake.script("nochoice", Reply(json={"object": "chat.completion", "choices": []}))
    backend = make_backend()
    out = backend.score_yes_no([img()] * 3, ["q [k=broken]", "q [k=ok]", "q [k=nochoice]"])
    assert isinstance(out[0], Failed) and isinstance(out[1], YesNoScore) and isinstance(out[2], Failed)
    errors = {e.index: e.error for e in backend.last_errors}
    assert "truncated answer" in errors[0] and "gave up after 3 attempts" in errors[0] and "no choices" in errors[2]
    assert fake.hits["broken"] == 3  # retried like a 5xx


def test_timeout_fails_only_that_item(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script("hang", Reply(json=text_body("Yes"), delay=2.0))
    backend = make_backend(timeout=0.25, max_retries=1)
    t0 = time.monotonic()
    out = backend.score_yes_no([img()] * 3, ["q [k=ok1]", "q [k=hang]", "q [k=ok2]"])
    elapsed = time.monotonic() - t0

    assert isinstance(out[0], YesNoScore) and isinstance(out[2], YesNoScore) and isinstance(out[1], Failed)
    [err] = backend.last_errors
    assert err.index == 1 and "timed out" in err.error and "timed out" in out[1].error
    assert fake.hits["hang"] == 2  # first try + one retry
    assert elapsed < 1.5  # did not wait for the server's 2 s hang


def test_connection_refused_is_retried_then_reported(make_backend: Any) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    s.close()
    backend = make_backend(base_url=dead, max_retries=1)
    with pytest.raises(BackendConfigError, match="cannot reach the server") as info:
        backend.score_yes_no([img(), img()], ["q", "q2"])
    assert dead in str(info.value) and "connection error" in str(info.value)
    [err, _] = backend.last_errors
    assert "connection error" in err.error
    assert backend.stats.requests == 4 and backend.stats.retries == 2


def test_connection_lost_after_answers_is_a_per_item_failure(
    vlm: tuple[FakeOpenAIServer, str], fake: FakeOpenAIServer, make_backend: Any
) -> None:
    """A server that answered before and then goes away: the items fail (and are retried by
    --resume), the job is not stopped as misconfigured."""
    backend = make_backend(max_retries=0)
    assert isinstance(backend.score_yes_no([img()], ["q"])[0], YesNoScore)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    backend.base_url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    s.close()
    [out] = backend.score_yes_no([img()], ["q"])
    assert isinstance(out, Failed) and "connection error" in out.error


# --------------------------------------------------------------------------- auth, images


def test_api_key_and_base_url_come_from_the_environment(
    vlm: tuple[FakeOpenAIServer, str],
    fake: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("ICM_OPENAI_BASE_URL", vlm[1])
    monkeypatch.setenv("ICM_OPENAI_API_KEY", "sk-icm-secret-123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-other")
    fake.script("autherr", Reply(400, json=vllm_error(400, "bad request")))
    caplog.set_level(logging.DEBUG)
    with OpenAIBackend(model=MODEL, max_retries=0) as backend:
        out = backend.score_yes_no([img(), img()], ["q [k=auth]", "q [k=autherr]"])
        assert "sk-icm-secret-123" not in repr(backend)
    assert out[0] is not None
    assert {r["headers"]["authorization"] for r in fake.requests} == {"Bearer sk-icm-secret-123"}
    assert "sk-icm-secret-123" not in caplog.text

    monkeypatch.delenv("ICM_OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY")
    fake.reset()
    with OpenAIBackend(model=MODEL) as backend:
        backend.score_yes_no([img()], ["q [k=noauth]"])
    assert "authorization" not in fake.requests[0]["headers"]


def test_images_arrive_as_decodable_data_urls_of_the_right_size(fake: FakeOpenAIServer, make_backend: Any) -> None:
    big = Image.effect_noise((3000, 1500), 40).convert("RGB")
    small = img(size=(300, 200))
    transparent = Image.new("RGBA", (80, 60), (10, 200, 10, 128))
    backend = make_backend(max_image_side=1024, image_detail="high")
    backend.score_yes_no([big, small, transparent], ["q [k=i-big]", "q [k=i-small]", "q [k=i-alpha]"])

    mime, got = decode_data_url(image_url_of(fake.bodies("i-big")[0]))
    assert (mime, got.format, got.size) == ("image/jpeg", "JPEG", (1024, 512))
    mime, got = decode_data_url(image_url_of(fake.bodies("i-small")[0]))
    assert (mime, got.size) == ("image/jpeg", (300, 200))
    assert got.convert("RGB").getpixel((150, 100)) == pytest.approx((200, 30, 30), abs=4)
    mime, got = decode_data_url(image_url_of(fake.bodies("i-alpha")[0]))
    assert (mime, got.mode, got.size) == ("image/png", "RGBA", (80, 60))
    assert got.getpixel((5, 5)) == (10, 200, 10, 128)
    part = fake.bodies("i-big")[0]["messages"][0]["content"][0]
    assert part["image_url"]["detail"] == "high"


# --------------------------------------------------------------------------- concurrency


def test_concurrency_is_bounded_by_max_concurrency(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.default = Reply(json=vllm_logprobs_body([("Yes", -0.1), ("No", -2.4)]), delay=0.15)
    backend = make_backend(max_concurrency=3)
    t0 = time.monotonic()
    out = backend.score_yes_no([img()] * 9, [f"q{i}" for i in range(9)])
    elapsed = time.monotonic() - t0
    assert all(o is not None for o in out)
    assert len(fake.requests) == 9
    assert 2 <= fake.max_inflight <= 3
    assert elapsed < 9 * 0.15  # ran concurrently, not one by one


def test_ask_sends_everything_in_one_pass_encoding_each_image_once(
    fake: FakeOpenAIServer, make_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each reply is held 1 s, so all nine requests overlap even on a loaded machine (at 0.2 s and a
    # 2 s client timeout, a busy CI box once saw a request retried and the overlap cut to eight).
    fake.default = Reply(json=vllm_logprobs_body([("Yes", -0.1), ("No", -2.4)]), delay=1.0)
    fake.script("ask-c", Reply(json=vllm_logprobs_body([("C", -0.1), ("B", -2.4)]), delay=1.0))
    backend = make_backend(max_concurrency=16, timeout=30.0)
    encoded: list[int] = []
    real_encode = backend._encode
    monkeypatch.setattr(backend, "_encode", lambda image: encoded.append(id(image)) or real_encode(image))
    images = [img((255, 0, 0)), img((0, 255, 0)), img((0, 0, 255))]
    queries = [
        Query("term:sexy", "yes_no", "Is the image sexy? [k=ask-y1]", term="sexy"),
        Query("term:violent", "yes_no", "Is the image violent? [k=ask-y2]", term="violent"),
        Query("attr:exposure", "choice", "How exposed? [k=ask-c]", ("none", "partial"), ("none", "partial")),
    ]

    out = backend.ask(images, queries)

    assert sorted(encoded) == sorted(id(i) for i in images)
    assert len(fake.requests) == 9
    assert fake.max_inflight == 9  # all questions about all images in flight together
    for slot in out:
        assert set(slot) == {"term:sexy", "term:violent", "attr:exposure"}
        assert slot["term:sexy"] is not None
        assert slot["term:sexy"].p_yes == pytest.approx(softmax_share([-0.1], [-2.4]))
        assert slot["attr:exposure"] is not None
        assert slot["attr:exposure"].probs == pytest.approx([1 - softmax_share([-0.1], [-2.4]), softmax_share([-0.1], [-2.4])])
    # every request about an image carries that image, and only three distinct payloads exist
    urls = Counter(image_url_of(r["body"]) for r in fake.requests)
    assert sorted(urls.values()) == [3, 3, 3]
    colors = {decode_data_url(u)[1].getpixel((10, 10)) for u in urls}
    assert len(colors) == 3


def test_ask_reports_errors_per_query_key(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script("ask-bad", Reply(400, json=vllm_error(400, "nope")))
    backend = make_backend()
    queries = [Query("good", "yes_no", "ok? [k=ask-good]"), Query("bad", "yes_no", "bad? [k=ask-bad]")]
    out = backend.ask([img(), img()], queries)
    assert all(isinstance(s["bad"], Failed) and "HTTP 400" in s["bad"].error for s in out)
    assert all(isinstance(s["good"], YesNoScore) for s in out)
    assert sorted((e.index, e.key) for e in backend.last_errors) == [(0, "bad"), (1, "bad")]


def test_sync_api_works_inside_a_running_loop_and_from_threads(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script("th-bad", Reply(400, json=vllm_error(400, "nope")))
    backend = make_backend()

    async def inside_loop() -> Any:
        return backend.score_yes_no([img()], ["q [k=loop]"])

    [score] = asyncio.run(inside_loop())
    assert isinstance(score, YesNoScore) and score.source == "logprobs"

    def worker(key: str) -> tuple[Any, list[Any]]:
        res = backend.score_yes_no([img()], [f"q [k={key}]"])
        return res, backend.last_errors

    with ThreadPoolExecutor(max_workers=2) as pool:
        good = pool.submit(worker, "th-good")
        bad = pool.submit(worker, "th-bad")
        (good_res, good_errs), (bad_res, bad_errs) = good.result(timeout=10), bad.result(timeout=10)
    assert isinstance(good_res[0], YesNoScore) and good_errs == []  # errors are per thread
    assert isinstance(bad_res[0], Failed) and len(bad_errs) == 1


# --------------------------------------------------------------------------- generate


def test_generate_attaches_image_to_first_user_turn(fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script("gen", Reply(json=text_body("The image shows a beach; it is safe.", completion_tokens=9)))
    backend = make_backend()
    conv = [{"role": "system", "content": "You are a moderator."}, {"role": "user", "content": "Explain. [k=gen]"}]
    original = [dict(m) for m in conv]

    assert backend.generate([img()], [conv], max_new_tokens=64) == ["The image shows a beach; it is safe."]
    assert conv == original  # caller's messages untouched
    body = fake.bodies("gen")[0]
    assert body["max_tokens"] == 64 and body["temperature"] == 0.0
    assert "top_p" not in body and "seed" not in body and "logprobs" not in body
    assert body["messages"][0] == original[0]
    assert body["messages"][1]["content"][0]["type"] == "image_url"
    assert body["messages"][1]["content"][1] == {"type": "text", "text": "Explain. [k=gen]"}
    assert backend.stats.completion_tokens == 9

    backend.generate([img()], [conv], temperature=0.7, top_p=0.9, seed=7)
    body = fake.bodies("gen")[1]
    assert (body["temperature"], body["top_p"], body["seed"]) == (0.7, 0.9, 7)


# --------------------------------------------------------------------------- pure helpers


def test_text_parsers_and_legacy_logprobs_format() -> None:
    assert parse_yes_no_text("**Yes**, it is") is True
    assert parse_yes_no_text("NO.") is False
    assert parse_yes_no_text("None of them") is None
    assert parse_choice_text("(B) partial", ["A", "B"]) == 1
    assert parse_choice_text("C", ["A", "B"]) is None
    assert parse_choice_text("Answer: A", ["A", "B"]) == 0
    legacy = {"tokens": ["Yes"], "token_logprobs": [-0.3], "top_logprobs": [{"Yes": -0.3, "No": -1.5}]}
    assert sorted(first_token_candidates(legacy) or []) == [("No", -1.5), ("Yes", -0.3)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", 0), (" C", 1), ("(B) no exposure", 0), ("B. Because the person is fully clothed.", 0),
        ("The answer is (C).", 1), ("Answer: D", 2), ("answer: d", 2), ("**C**", 1), ("The correct option is D.", 2),
        ("Option C", 1), ("Partial exposure.", 1),  # exactly one option's text
        # never misread: sentence starts, refusals, labels that are not options, lower case alone
        ("I'm sorry, but I can't help with that.", None), ("A woman in a swimsuit.", None), ("A", None),
        ("Based on the image, B.", None), ("E", None), ("b) partial", None), ("The image shows a beach.", None),
        ("", None),
    ],
)
def test_choice_text_is_read_or_left_unread(text: str, expected: int | None) -> None:
    assert parse_choice_text(text, ["B", "C", "D"], ["No exposure", "Partial exposure", "Full exposure"]) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", True), ("yes", True), (" Yes.", True), ("Yes, the image is suggestive.", True), ("**No**", False),
        ("no, it is not", False), ("The answer is yes.", True), ("Answer: No", False),
        ("None of them", None), ("Not sure", None), ("I'm sorry, but no.", None), ("Nope", None), ("Maybe", None),
    ],
)
def test_yes_no_text_is_read_or_left_unread(text: str, expected: bool | None) -> None:
    assert parse_yes_no_text(text) is expected


def test_refusal_phrasings() -> None:
    refusals = [
        "I'm sorry, but I can't help with that.", "I\u2019m sorry, I can\u2019t assist with this request.",
        "Sorry, I cannot help with that.", "I cannot provide a description of this image.",
        "I can't determine that from the image.", "As an AI, I do not evaluate explicit content.",
        "Unfortunately, I am unable to analyze this image.", "I apologize, but I won't comment on that.",
        "I must decline to answer.", "That request is against my guidelines.",
    ]
    answers = ["Yes", "No, the person is dressed.", "B. Because the image is calm.", "The answer is (C).",
               "The image shows a person on a beach."]
    assert all(is_refusal(t) for t in refusals), [t for t in refusals if not is_refusal(t)]
    assert not any(is_refusal(t) for t in answers)


@pytest.mark.parametrize(
    ("style", "field", "value"),
    [
        ("structured_outputs", "structured_outputs", {"choice": ["B", "C", "D"]}),
        ("guided_choice", "guided_choice", ["B", "C", "D"]),
        ("regex", "regex", "(B|C|D)"),
    ],
)
def test_guided_choice_styles(style: str, field: str, value: Any, fake: FakeOpenAIServer, make_backend: Any) -> None:
    fake.script("g", Reply(json=vllm_logprobs_body([("C", -0.1), ("B", -2.5)])))
    backend = make_backend(guided_choice=style)
    [choice] = backend.choose([img()], "Which? [k=g]", ["x", "y", "z"])
    assert isinstance(choice, Choice) and choice.source == "logprobs"
    assert fake.bodies("g")[0][field] == value
    with pytest.raises(ValueError, match="guided_choice"):
        make_backend(guided_choice="outlines")
    assert "structured_outputs" not in make_backend()._guided_params(["B", "C"])  # off by default
