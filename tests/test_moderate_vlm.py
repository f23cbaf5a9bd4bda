"""`icm moderate --backend openai` against a loopback server that behaves like real VLMs.

The server is tests/fake_openai.py's FakeOpenAIServer (FastAPI + uvicorn on
127.0.0.1): a request picks its scripted reply by the ``[k=NAME]`` tag in its question,
so the policy below tags its term question ``[k=term]`` and its attribute question
``[k=hue]``. The replies are what real servers send: vLLM chat completions with top
logprobs, Ollama-style text without logprobs, FastAPI/vLLM error bodies.

What a user relies on, checked through the real CLI, job, engine and backend:

* a server that is down makes every record an error (exit code 1) and ``--resume``
  retries them; a partly failing server makes the image an error naming the query;
* 401 stops the job at once with one message;
* refusals, in several phrasings, with and without logprobs, are never an answer: no
  image is allowed and none gets a product;
* verbose answers ("The answer is (B).", "B. Because ...", lowercase "yes",
  leading-space tokens, no logprobs) are read correctly or marked off-format;
* guided choice is asked for when enabled and dropped for good once the server rejects it;
* the HTTP server answers 502/503 for failures and stores no decision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.job import read_records

from fake_openai import MODEL, FakeOpenAIServer, Reply, text_body, vllm_error, vllm_logprobs_body
from square_policy import square_policy

POLICY = square_policy("vlm-check")
runner = CliRunner()

# ------------------------------------------------------------------ replies real VLMs give

DOWN = Reply(503, json={"object": "error", "message": "Service Unavailable", "type": "ServiceUnavailable", "code": 503},
             headers={"Retry-After": "0"})
YES = Reply(json=vllm_logprobs_body([("Yes", -0.02), ("No", -4.2), ("I", -6.0)]))
NO = Reply(json=vllm_logprobs_body([("No", -0.03), ("Yes", -3.9), ("The", -6.5)]))
RED = Reply(json=vllm_logprobs_body([("B", -0.05), ("C", -3.1), ("The", -5.0)]))
BLUE = Reply(json=vllm_logprobs_body([("C", -0.04), ("B", -3.4), ("The", -5.5)]))


def _with_text(body: dict[str, Any], text: str) -> dict[str, Any]:
    body["choices"][0]["message"]["content"] = text
    return body


# The numbers: the first token "I" (of "I'm sorry") at -0.01, "No" at -9, "Yes" at
# -11. Renormalising Yes/No alone would read P(Yes) = 0.12, a confident "not red".
REFUSAL_LOGPROBS = Reply(json=_with_text(
    vllm_logprobs_body([("I", -0.01), ("Sorry", -5.2), ("No", -9.0), ("Yes", -11.0)]),
    "I'm sorry, but I can't help with that.",
))
REFUSAL_LOGPROBS_CHOICE = Reply(json=_with_text(
    vllm_logprobs_body([("I", -0.01), ("As", -5.0), ("C", -8.5), ("B", -9.5)]),
    "I'm sorry, but I can't help with that.",
))
REFUSALS_TEXT = [
    "I'm sorry, but I can't help with that.",
    "Sorry, I can\u2019t assist with that request.",
    "I cannot provide an assessment of this image.",
    "As an AI developed to follow content guidelines, I am unable to evaluate sexual content.",
    "Unfortunately, I'm not able to help with this image.",
    "I apologize, but I won't analyze images like this.",
]


def _image(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (24, 24), colour).save(path)
    return path


# ------------------------------------------------------------------ fixtures


@pytest.fixture()
def work(tmp_path: Path, vlm: tuple[FakeOpenAIServer, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Three red and three blue squares, the policy file and the CLI arguments."""
    monkeypatch.setenv("ICM_OPENAI_API_KEY", "sk-loopback-secret")
    policy = tmp_path / "vlm-check.yaml"
    policy.write_text(POLICY)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        _image(imgs / f"red{i}.png", (220, 20 + i, 20))
        _image(imgs / f"blue{i}.png", (20, 20 + i, 220))
    out = tmp_path / "out.jsonl"
    args = ["moderate", str(imgs), "--policy", str(policy), "--backend", "openai", "--model", MODEL,
            "--base-url", vlm[1], "--out", str(out)]
    return {"args": args, "out": out, "imgs": imgs}


def _run(work: dict[str, Any], *extra: str) -> tuple[Any, list[Any]]:
    result = runner.invoke(app, work["args"] + list(extra), env={"COLUMNS": "200"})
    records, bad = read_records(work["out"])
    assert bad == 0
    return result, records


# ------------------------------------------------------------------ failures are errors


def test_a_server_that_is_down_makes_every_record_an_error_and_resume_retries(fake, work):
    fake.default = DOWN
    result, records = _run(work)
    assert result.exit_code == 1, result.output
    assert len(records) == 6
    for r in records:
        assert not r.ok and r.verdict is None and r.product is None and r.p_violation is None
        assert "term:red: HTTP 503" in r.error and "attr:hue: HTTP 503" in r.error and "4 attempts" in r.error
        assert set(r.failed_queries) == {"term:red", "attr:hue"}
    assert "errors: 6" in result.output.replace("\n", " ")

    # the server comes back: --resume retries exactly the failed images, once each
    fake.reset()
    fake.script("term", YES)
    fake.script("hue", RED)
    result, records = _run(work, "--resume")
    assert result.exit_code == 0, result.output
    assert len(records) == 6 and all(r.ok for r in records)
    assert sorted(Path(r.path).name for r in records) == sorted(p.name for p in work["imgs"].iterdir())
    assert all(r.product == "red_square" and r.verdict == "block" for r in records)
    assert fake.hits["term"] == fake.hits["hue"] == 6


def test_partial_failure_makes_the_image_an_error_naming_the_query(fake, work):
    fake.script("term", NO)
    fake.script("hue", Reply(500, json=vllm_error(500, "CUDA error: an illegal memory access"), headers={"Retry-After": "0"}))
    result, records = _run(work)
    assert result.exit_code == 1
    for r in records:
        assert not r.ok and r.verdict is None
        assert r.error.startswith("openai backend failed on 1 of 2 queries: attr:hue: HTTP 500")
        assert "CUDA error" in r.error and "term:red" not in r.error
        assert list(r.failed_queries) == ["attr:hue"]


def test_401_stops_the_job_at_once_with_one_message(fake, work):
    fake.default = Reply(401, json={"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
    result, records = _run(work, "--batch-size", "2")
    assert result.exit_code == 2
    out = result.output
    assert out.count("API key was rejected") == 1 and "Incorrect API key provided" in out and "--resume" in out
    assert "sk-loopback-secret" not in out
    assert records == []  # no error record per image
    assert len(fake.requests) == 4  # the first batch (2 images x 2 queries), nothing retried, nothing after


def test_a_key_revoked_mid_run_stops_the_job_and_resume_finishes_it(fake, work):
    fake.script("term", NO, NO, Reply(401, json={"detail": "API key revoked"}))
    fake.script("hue", BLUE)
    result, records = _run(work, "--batch-size", "1")
    assert result.exit_code == 2 and "API key revoked" in result.output
    assert len(records) == 2 and all(r.ok and r.verdict == "allow" for r in records)  # what was done is kept
    fake.reset()
    fake.script("term", NO)
    fake.script("hue", BLUE)
    result, records = _run(work, "--resume")
    assert result.exit_code == 0 and len(records) == 6 and fake.hits["term"] == 4


def test_unknown_model_404_stops_the_job(fake, work):
    fake.default = Reply(404, json=vllm_error(404, f"The model `{MODEL}` does not exist."))
    result, records = _run(work)
    assert result.exit_code == 2 and "does not exist" in result.output and records == []


# ------------------------------------------------------------------ refusals are never answers


def _assert_refused(records: list[Any]) -> None:
    assert len(records) == 6
    for r in records:
        assert r.ok, r.error
        assert r.verdict == "review" and r.product is None and r.rule is None and r.basis == "refused"
        assert r.p_violation is None and r.label is None
        assert any(v.startswith("refused") for v in r.unanswered.values()), r.unanswered
        assert "refused" in r.reason


def test_refusals_with_logprobs_are_not_read_as_answers(fake, work):
    fake.script("term", REFUSAL_LOGPROBS)
    fake.script("hue", REFUSAL_LOGPROBS_CHOICE)
    result, records = _run(work, "--json")
    assert result.exit_code == 0
    _assert_refused(records)
    for r in records:
        assert r.term.p_yes is None  # not the 0.12 a Yes/No renormalisation gives
        assert r.attributes == {} and set(r.unanswered) == {"term:red", "attr:hue"}
        assert "P(valid labels)=" in r.unanswered["term:red"]


@pytest.mark.parametrize("text", REFUSALS_TEXT)
def test_refusals_in_text_without_logprobs(fake, work, text):
    fake.default = Reply(json=text_body(text, completion_tokens=14))
    result, records = _run(work)
    assert result.exit_code == 0
    _assert_refused(records)


def test_a_refused_attribute_with_a_clear_term_answer_is_still_review_without_product(fake, work):
    fake.script("term", NO)
    fake.script("hue", Reply(json=text_body("I'm sorry, but I can't help with that.")))
    result, records = _run(work)
    _assert_refused(records)
    assert "attr:hue refused" in " ".join(result.output.split())  # the summary table says why
    assert all(r.term.p_yes is not None and r.term.p_yes < 0.1 for r in records)
    assert all(list(r.unanswered) == ["attr:hue"] for r in records)


def test_the_refusal_threshold_is_configurable(fake, work):
    # top token "The" holds most of the mass: below the default 0.5 the answer is not read
    fake.script("term", Reply(json=_with_text(vllm_logprobs_body([("The", -0.4), ("No", -1.5), ("Yes", -4.0)]), "The")))
    fake.script("hue", BLUE)
    _, records = _run(work)
    assert all(r.verdict == "review" and "term:red" in r.unanswered for r in records)
    assert all(r.unanswered["term:red"].startswith("off-format") for r in records)
    # 0.2 accepts it (P(No) = 0.223 + P(Yes) = 0.018 >= 0.2)
    _, records = _run(work, "--min-label-mass", "0.2")
    assert all(r.verdict == "allow" and r.term.source == "logprobs" and not r.unanswered for r in records)


# ------------------------------------------------------------------ verbose answers


@pytest.mark.parametrize(
    ("term", "hue", "product"),
    [
        (text_body("The answer is yes."), text_body("The answer is (B)."), "red_square"),
        (text_body("yes"), text_body("B. Because the square is clearly red."), "red_square"),
        (text_body("Yes, the image is mostly red."), text_body("Answer: B"), "red_square"),
        (text_body("No."), text_body("**C**"), "blue_square"),
        (text_body("no, it is blue"), text_body("The correct option is C."), "blue_square"),
        (vllm_logprobs_body([(" Yes", -0.05), (" No", -3.0), ("\u0120yes", -5.0)]),
         vllm_logprobs_body([(" B", -0.1), ("\u0120C", -2.5)]), "red_square"),
        (vllm_logprobs_body([("\u2581No", -0.02), ("\u2581Yes", -4.0)]), vllm_logprobs_body([("\u2581C", -0.02)]), "blue_square"),
    ],
    ids=["answer-is", "lowercase-and-because", "yes-comma-and-answer-colon", "bold", "correct-option",
         "leading-space-tokens", "sentencepiece-tokens"],
)
def test_verbose_answers_are_read_correctly(fake, work, term, hue, product):
    fake.script("term", Reply(json=term))
    fake.script("hue", Reply(json=hue))
    result, records = _run(work)
    assert result.exit_code == 0, result.output
    assert all(r.ok and r.product == product and not r.unanswered for r in records), [(r.product, r.unanswered) for r in records]
    from_text = "logprobs" not in json.dumps(term)
    assert all(any("read from the answer text" in n for n in r.notes) == from_text for r in records)
    assert {r.verdict for r in records} == {"block" if product == "red_square" else "allow"}


@pytest.mark.parametrize(
    ("term", "hue"),
    [
        ("Maybe.", "The square is reddish."),
        ("It is hard to say.", "E"),  # E is not an option of a 2-option question (B, C)
        ("None of the above", "Both"),
        ("Based on the image, the colour cannot be determined.", "A"),  # "A" is not a label
    ],
)
def test_off_format_answers_are_never_misread_or_allowed(fake, work, term, hue):
    fake.script("term", Reply(json=text_body(term)))
    fake.script("hue", Reply(json=text_body(hue)))
    result, records = _run(work)
    assert result.exit_code == 0
    for r in records:
        assert r.ok and r.verdict != "allow" and r.product is None
        assert r.term.p_yes is None and r.attributes == {}
        assert set(r.unanswered) == {"term:red", "attr:hue"}
        assert all(v.startswith(("off-format", "refused")) for v in r.unanswered.values())


def test_one_off_format_answer_turns_allow_into_review(fake, work):
    fake.script("term", NO)
    fake.script("hue", Reply(json=text_body("Blue-ish, I think")))
    _, records = _run(work)
    assert all(r.verdict == "review" and r.term.p_yes < 0.1 and r.unanswered["attr:hue"].startswith("off-format") for r in records)


# ------------------------------------------------------------------ guided choice


def test_guided_choice_is_requested_and_a_rejection_is_remembered(fake, work):
    fake.script("term", YES)
    fake.script("hue", RED)
    result, records = _run(work, "--guided-choice", "structured_outputs")
    assert result.exit_code == 0 and all(r.product == "red_square" for r in records)
    assert {json.dumps(b["structured_outputs"]) for b in fake.bodies("term")} == {'{"choice": ["Yes", "No"]}'}
    assert {json.dumps(b["structured_outputs"]) for b in fake.bodies("hue")} == {'{"choice": ["B", "C"]}'}

    # a server that does not know the field: rejected once, then never sent again
    fake.reset()
    rejected = Reply(400, json=vllm_error(400, "Unrecognized request argument supplied: structured_outputs"))
    fake.script("term", rejected, YES)
    fake.script("hue", rejected, RED)
    result, records = _run(work, "--guided-choice", "structured_outputs", "--batch-size", "1")
    assert result.exit_code == 0 and all(r.ok and r.product == "red_square" for r in records)
    guided = [r for r in fake.requests if "structured_outputs" in r["body"]]
    assert len(guided) == 2 and len(fake.requests) == 6 * 2 + 2  # only the first image's two queries tried it


def test_guided_text_is_not_trusted_over_logprobs_that_refuse(fake, work):
    """Constrained decoding forces a label into the text; the logprobs still show a refusal."""
    fake.script("term", Reply(json=_with_text(vllm_logprobs_body([("I", -0.01), ("No", -9.0), ("Yes", -11.0)]), "No")))
    fake.script("hue", Reply(json=_with_text(vllm_logprobs_body([("I", -0.02), ("B", -8.0)]), "B")))
    _, records = _run(work, "--guided-choice", "guided_choice")
    _assert_refused(records)
    assert all(b["guided_choice"] == ["Yes", "No"] for b in fake.bodies("term"))


# ------------------------------------------------------------------ the HTTP server


def test_the_server_answers_502_and_503_for_failures_and_stores_no_decision(fake, vlm, tmp_path, monkeypatch, caplog):
    pytest.importorskip("sqlalchemy")
    from fastapi.testclient import TestClient

    from icm.moderation.backends.openai_compat import OpenAIBackend
    from icm.moderation.engine import Moderator
    from icm.policy import load_policy
    from icm.serve import ServeConfig, create_app

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    policy_file = tmp_path / "vlm-check.yaml"
    policy_file.write_text(POLICY)
    backend = OpenAIBackend(model=MODEL, base_url=vlm[1], max_retries=1, backoff_base=0.01)
    mod = Moderator(backend, policy=load_policy(str(policy_file)))
    cfg = ServeConfig(db=str(tmp_path / "d.sqlite"), allowed_hosts=["testserver"])
    buf = tmp_path / "red.png"
    _image(buf, (220, 20, 20))
    data = buf.read_bytes()
    try:
        with TestClient(create_app(cfg, moderator=mod), client=("127.0.0.1", 50123)) as c:
            fake.script("term", YES)
            fake.script("hue", DOWN)
            r = c.post("/v1/moderate", files={"image": ("red.png", data, "image/png")})
            assert r.status_code == 502 and r.json()["error"] == "backend_failed"
            # the upstream's error text stays in the server log, under the reference the body gives
            ref = r.json()["detail"].split("(error ", 1)[1].split(";", 1)[0]
            assert "attr:hue: HTTP 503" not in r.json()["detail"]
            assert any(ref in m and "attr:hue: HTTP 503" in m for m in caplog.messages)

            fake.reset()
            fake.default = Reply(json=text_body("I'm sorry, but I can't help with that."))
            r = c.post("/v1/moderate", files={"image": ("red.png", data, "image/png")})
            assert r.status_code == 200 and r.json()["record"]["verdict"] == "review"
            assert r.json()["record"]["product"] is None

            fake.reset()
            fake.default = Reply(401, json={"detail": "Invalid API key"})
            r = c.post("/v1/moderate", files={"image": ("red.png", data, "image/png")})
            assert r.status_code == 503 and r.json()["error"] == "backend_unavailable"
            assert MODEL not in r.json()["detail"]  # the backend's address and model stay in the server log

            decisions = c.get("/v1/decisions").json()
            assert decisions["total"] == 1 and decisions["decisions"][0]["verdict"] == "review"
    finally:
        backend.close()
