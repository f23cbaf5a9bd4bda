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
from icm.prompting import OPTION_LABELS, find_templater, offered_answers, render, reply_lead
from icm.training.collator import ChatCollator
from icm.training.datasets import Example, TrainDataset, moderation_examples

from openai_recorder import Recorded, recording_server
from tiny_models import noise_image, scored_texts

POLICIES = sorted(builtin_policy_names())  # every built-in policy, the taxonomy included
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
    with scored_texts(backend) as seen:
        answers = backend.ask([image], queries)
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
        # the first token trained, right after the prompt scored, is one the backend reads
        answer = item["messages"][1]["content"][0]["text"]
        assert enc["labels"][first] in _answer_ids(answers, text, answer), "the trained answer is not read back"
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
    ``image_url`` part for the image, are the hf backend's prompt, byte for byte, up to the
    template's reply lead for the answers the question offers (:func:`icm.prompting.reply_lead`,
    the tiny LLaVA's space before C): a server renders its own generation prompt and its
    model writes that first."""
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
        served = render(templater, as_hf, generation_prompt=True)
        assert served + reply_lead(templater, offered_answers(text)) == rendered[text], "the openai request differs"


@pytest.mark.parametrize("model_name", list(MODELS))
def test_the_first_trained_token_is_the_answer_read(model_name: str, request: pytest.FixtureRequest) -> None:
    """The first labelled token of every synth-shapes training example (Yes/No and option
    labels) is one the hf backend reads its answer from at the same position.

    The tiny LLaVA's template renders a reply as ``ASSISTANT: C</s>`` after the generation
    prompt ``ASSISTANT:``, and its tokenizer has no `` C`` token: the space is prompt
    (:func:`icm.prompting.reply_lead`), in training and in scoring alike.
    """
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


def test_a_reply_whose_first_token_is_the_answer_keeps_the_templates_prompt() -> None:
    """Where the tokenizer spells the reply `` C</s>`` with ``\u2581C`` first (real LLaVA-1.5's
    SentencePiece vocabulary does), nothing moves: the scoring prompt is the template's own
    generation prompt and the collator trains the whole reply, its first token the answer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from icm.prompting import question_conversation, render_prompt
    from icm.training.collator import render_segments
    from icm.training.tiny import LLAVA_CHAT_TEMPLATE

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    words = " ".join(["Yes", "No", *OPTION_LABELS, "USER", "ASSISTANT", "Is", "it", "red?"])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<image>"], show_progress=False)
    sp.train_from_iterator([words] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=LLAVA_CHAT_TEMPLATE
    )
    assert tokenizer.convert_ids_to_tokens(tokenizer(" C</s>", add_special_tokens=False)["input_ids"]) == ["\u2581C", "</s>"]
    assert reply_lead(tokenizer) == ""
    assert render_prompt(tokenizer, question_conversation("Is it red?")).endswith("ASSISTANT:")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "C"}]},
    ]
    prompt, reply = render_segments(tokenizer, messages)
    assert prompt.text.endswith("ASSISTANT:") and reply.text.startswith(" C</s>")


def test_the_tiny_llavas_space_before_replies_is_prompt(tiny_llava_path: Path) -> None:
    """The byte-level tiny LLaVA spells `` C`` as a space token and ``C``: for a question
    offering C the space is prompt, in the scoring prompt and in the collator's prompt
    segment, and the reply trained starts with the answer. Free text keeps its space."""
    from icm.moderation.backends.hf_processor import load_processor
    from icm.prompting import moderation_choice_prompt, question_conversation, render_prompt
    from icm.training.collator import render_segments

    processor, _ = load_processor(str(tiny_llava_path), local_files_only=True)
    templater = find_templater(processor)
    tokens = processor.tokenizer.convert_ids_to_tokens(processor.tokenizer(" C", add_special_tokens=False)["input_ids"])
    assert tokens == ["\u0120", "C"]
    question = moderation_choice_prompt("What colour is it?", ["Red", "Blue", "Green"])
    assert reply_lead(templater, ("B", "C", "D")) == " "
    assert render_prompt(templater, question_conversation(question)).endswith("ASSISTANT: ")
    assert render_prompt(templater, question_conversation("Describe the image.")).endswith("ASSISTANT:")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": "C"}]},
    ]
    prompt, reply = render_segments(templater, messages)
    assert prompt.text.endswith("ASSISTANT: ") and reply.text.startswith("C</s>")
    assert prompt.text + reply.text == render(templater, messages, generation_prompt=False)
    free = [messages[0] | {"content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]
    prompt, reply = render_segments(templater, free)
    assert prompt.text.endswith("ASSISTANT:") and reply.text.startswith(" A red square.")


def test_the_lead_is_decided_for_the_answers_a_question_offers() -> None:
    """On the demo's tokenizer (``icm demo e2e``: trained on the synth task's texts) `` B``,
    `` C``, `` D``, `` Yes`` and `` No`` are tokens of their own, `` E`` is not: the lead of
    an attribute offering B, C, D and of Yes/No is empty, so letters the demo never asks
    (E, J-Z) cannot move its answers' tokens (issue 19: product accuracy 0.952 -> 0.741)."""
    from icm.demo.teacher import synth_corpus
    from icm.prompting import moderation_choice_prompt, question_conversation, render_prompt, yes_no_prompt
    from icm.training.tiny import build_tokenizer

    tokenizer = build_tokenizer("llava", vocab_size=1200, extra_texts=synth_corpus())
    assert tokenizer.convert_ids_to_tokens(tokenizer(" E", add_special_tokens=False)["input_ids"]) == ["\u0120", "E"]
    assert reply_lead(tokenizer, ("B", "C", "D")) == ""
    assert reply_lead(tokenizer, ("Yes", "No")) == ""
    assert reply_lead(tokenizer, ("B", "C", "D", "E", "F")) == " "  # E is split: space and letter
    assert render_prompt(tokenizer, question_conversation(yes_no_prompt("Is it red?"))).endswith("ASSISTANT:")
    three = moderation_choice_prompt("Which part?", ["upper", "lower", "whole"])
    assert render_prompt(tokenizer, question_conversation(three)).endswith("ASSISTANT:")
    five = moderation_choice_prompt("Which part?", ["a", "b", "c", "d", "e"])
    assert render_prompt(tokenizer, question_conversation(five)).endswith("ASSISTANT: ")
