"""Train/inference parity: every built-in policy's questions reach the model identically
through every consumer.

For each tiny checkpoint (LLaVA, Qwen2-VL, Idefics3) and each built-in policy (the term
and every attribute), the question text the engine asks is followed through:

* the hf backend's scoring path (:meth:`HFBackend.ask`; the texts it scores are captured,
  then rendered and encoded as it does, both whole and split by its prefix-cache plan);
* the training path (``moderation_examples`` -> ``TrainDataset`` segments ->
  ``ChatCollator``): the prompt tokens before the first labelled token, and that label;
* chat (``ChatSession.ask`` with an empty system prompt, on the hf backend: the inputs
  handed to ``model.generate`` are captured);
* the openai backend: the request messages a local HTTP server receives, rendered with
  the checkpoint's chat template after swapping the ``image_url`` part for the image.

The rendered prompts must be byte-identical and the token ids identical; the first
trained token must be one the backend reads the answer from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import icm.chat.streaming as streaming
from icm.chat import ChatSession, Sampling
from icm.moderation.backends.hf import HFBackend
from icm.moderation.backends.hf_answers import AnswerTokens
from icm.moderation.engine import build_queries
from icm.moderation.images import load_image
from icm.policy import load_policy
from icm.policy.loader import builtin_policy_names
from icm.prompting import OPTION_LABELS, find_templater, render
from icm.training.collator import ChatCollator
from icm.training.datasets import Example, TrainDataset, moderation_examples

from openai_recorder import Recorded, recording_server
from tiny_models import noise_image

POLICIES = ["icm-sexy", "horrifying", "gambling", "synth-shapes"]
MODELS = {"llava": ("tiny_llava_path", 32), "qwen2vl": ("tiny_qwen2vl_path", 56), "idefics3": ("tiny_idefics3_path", 32)}


def test_the_parity_test_covers_every_built_in_policy() -> None:
    assert sorted(builtin_policy_names()) == sorted(POLICIES)


@pytest.fixture(scope="module")
def server() -> Iterator[Recorded]:
    with recording_server() as rec:
        yield rec


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[HFBackend, Path]:
    fixture, size = MODELS[request.param]
    path = request.getfixturevalue(fixture)
    backend = HFBackend(model=str(path), device="cpu", batch_size=4, min_label_mass=0.0)
    image_path = tmp_path_factory.mktemp("parity") / f"{request.param}.png"
    noise_image(size, seed=3).save(image_path)
    return backend, image_path


def _scored_texts(backend: HFBackend, image: Any, queries: list) -> list[str]:
    """The user texts the backend's ask() scores, captured at its forward-pass entry point."""
    seen: list[str] = []
    real = backend._last_logprobs

    def spy(images: Any, items: Any) -> Any:
        seen.extend(text for _, text in items)
        return real(images, items)

    backend._last_logprobs = spy  # type: ignore[method-assign]
    try:
        answers = backend.ask([image], queries)
    finally:
        del backend._last_logprobs
    assert set(answers[0]) == {q.key for q in queries}
    return seen


def _answer_ids(answers: AnswerTokens, text: str, answer: str) -> list[int]:
    """The token ids the backend reads ``answer`` from, for the question ``text``."""
    if answer in ("Yes", "No"):
        return answers.yes_ids if answer == "Yes" else answers.no_ids
    n = sum(1 for line in text.splitlines() if line[:2] in {f"{c}." for c in OPTION_LABELS})
    return answers.labels(n)[OPTION_LABELS.index(answer)]


def _hf_ids(backend: HFBackend, image: Any, rendered: str) -> list[int]:
    return backend._encode([image], [rendered])["input_ids"][0].tolist()


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("policy_name", POLICIES)
def test_every_consumer_shows_the_model_the_same_prompt(
    model: tuple[HFBackend, Path], policy_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, image_path = model
    policy = load_policy(policy_name)
    image = load_image(image_path).image
    queries = build_queries(policy)
    assert len(queries) == 1 + len(policy.attributes)

    # 1. the hf backend's scoring path: what it renders and the tokens it runs
    texts = _scored_texts(backend, image, queries)
    assert len(texts) == len(queries), "one scored text per question"
    rendered = {t: backend._render_user(t) for t in texts}
    ids = {t: _hf_ids(backend, image, r) for t, r in rendered.items()}
    plan = backend._plan(list(rendered.values()))
    assert plan is not None, "the prefix cache applies to every built-in question"
    prefix = _hf_ids(backend, image, plan.prefix_text)
    prefix = prefix[: len(prefix) - plan.cut]
    for t, r in rendered.items():
        assert prefix + plan.suffixes[r] == ids[t], "the prefix-cache split changes the tokens scored"

    # 2. training: the examples icm train makes for this policy, through the collator
    examples = [
        Example(messages=[], images=[str(image_path)], product=p.id, policy=policy_name, image_key=p.id)
        for p in policy.products
    ]
    train, skipped = moderation_examples(examples)
    assert skipped == 0
    collator = ChatCollator(backend.processor)
    dataset = TrainDataset(train).prepare(collator.templater)
    answers = AnswerTokens(backend.tokenizer)
    trained: set[str] = set()
    for i in range(len(dataset)):
        item = dataset[i]
        text = item["messages"][0]["content"][-1]["text"]
        assert text in rendered, f"training asks a question the backend never scores: {text!r}"
        assert item["segments"][0].text == rendered[text], "training renders the prompt differently"
        enc = collator.encode(item)
        first = next(k for k, label in enumerate(enc["labels"]) if label != -100)
        assert enc["input_ids"][:first] == ids[text], "training tokenizes the prompt differently"
        # the answer trained is one the backend reads (after any whitespace token the
        # template puts before replies: see test_the_first_trained_token_is_the_answer_read)
        answer = item["messages"][1]["content"][0]["text"]
        reply = [t for t in enc["labels"][first:] if t != -100]
        while reply and not backend.tokenizer.decode(reply[:1]).strip():
            reply = reply[1:]
        assert reply and reply[0] in _answer_ids(answers, text, answer), "the trained answer is not read back"
        trained.add(text)
    assert trained == set(rendered), "every question is trained"

    # 3. chat on the hf backend (no system prompt): the inputs handed to generate
    captured: list[Any] = []
    real_inputs = streaming.hf_inputs

    def spy(b: Any, im: Any, messages: Any) -> Any:
        enc = real_inputs(b, im, messages)
        captured.append((streaming.hf_prompt(b, messages), enc["input_ids"][0].tolist()))
        return enc

    monkeypatch.setattr(streaming, "hf_inputs", spy)
    session = ChatSession(backend, policy=policy, system_prompt="", sampling=Sampling(max_new_tokens=1))
    session.open_image(image_path)
    for t in texts:
        session.reset()
        event = session.ask(t)
        assert event.kind == "answer", event.text
        chat_text, chat_ids = captured[-1]
        assert chat_text == rendered[t], "chat renders the prompt differently"
        assert chat_ids == ids[t], "chat tokenizes the prompt differently"


@pytest.mark.parametrize("policy_name", POLICIES)
def test_the_openai_backend_requests_the_prompt_the_model_is_scored_and_trained_on(
    model: tuple[HFBackend, Path], policy_name: str, server: Recorded
) -> None:
    """The request's messages, rendered with the checkpoint's template after swapping the
    ``image_url`` part for the image, are the hf backend's prompt, byte for byte."""
    from icm.moderation.backends import create_backend

    backend, image_path = model
    policy = load_policy(policy_name)
    image = load_image(image_path).image
    queries = build_queries(policy)
    rendered = {t: backend._render_user(t) for t in _scored_texts(backend, image, queries)}
    templater = find_templater(backend.processor)

    server.requests.clear()
    remote = create_backend(
        "openai", model="tiny", base_url=server.url, api_key="sk-parity-test-key-0001", timeout=5.0, max_retries=0
    )
    try:
        remote.ask([image], queries)
    finally:
        remote.close()
    assert len(server.bodies) == len(queries)
    for body in server.bodies:
        messages = body["messages"]
        user = messages[-1]
        assert [m["role"] for m in messages] == ["user"]
        assert user["content"][0]["type"] == "image_url" and user["content"][0]["image_url"]["url"].startswith("data:image/")
        text = user["content"][1]["text"]
        assert text in rendered, f"the openai backend asks a question the hf backend does not: {text!r}"
        as_hf = [
            {"role": m["role"], "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
            for m in messages
        ]
        assert render(templater, as_hf, generation_prompt=True) == rendered[text], "the openai request differs"


@pytest.mark.parametrize(
    "model_name",
    [
        pytest.param(
            "llava",
            marks=pytest.mark.xfail(
                strict=True,
                reason="known divergence: the LLaVA template renders replies as 'ASSISTANT: C' after a 'ASSISTANT:' "
                "generation prompt, and the tiny tokenizer has no ' C' token, so training teaches a space token "
                "first while scoring reads the first token after the prompt",
            ),
        ),
        "qwen2vl",
        "idefics3",
    ],
)
def test_the_first_trained_token_is_the_answer_read(model_name: str, request: pytest.FixtureRequest) -> None:
    """The first labelled token of every synth-shapes training example (Yes/No and option
    labels) is one the hf backend reads its answer from at the same position."""
    fixture, _ = MODELS[model_name]
    path = request.getfixturevalue(fixture)
    from icm.moderation.backends.hf_processor import load_processor

    processor, _ = load_processor(str(path), local_files_only=True)
    collator = ChatCollator(processor)
    answers = AnswerTokens(processor.tokenizer)
    policy = load_policy("synth-shapes")
    image = noise_image(MODELS[model_name][1])
    examples = [Example(messages=[], images=[image], product=p.id, policy=policy.name, image_key=p.id) for p in policy.products]
    train, _ = moderation_examples(examples)
    wrong = []
    for ex in train:
        enc = collator.encode({"messages": ex.messages, "images": ex.images})
        first = next(k for k, label in enumerate(enc["labels"]) if label != -100)
        text, answer = ex.messages[0]["content"][-1]["text"], ex.messages[1]["content"][0]["text"]
        if enc["labels"][first] not in _answer_ids(answers, text, answer):
            wrong.append((answer, processor.tokenizer.decode(enc["labels"][first : first + 2])))
    assert not wrong, f"{len(wrong)} of {len(train)} examples train another first token, e.g. {wrong[:3]}"
