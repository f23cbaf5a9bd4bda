"""Answers in letters the question did not offer, and the reply lead per answer set (issue 19).

Moderation questions letter their options B, C, D, ... (never A, I or O:
:func:`icm.prompting.option_labels`). A model that letters options A, B, C, ... (as the
paper's MQA data does) answers one letter off; its mass on the never-offered "A" (or a
bare "I") must make the answer off-format ("label not offered"), never a neighbouring
option and never a refusal. Replayed against a loopback server that answers like such
a model (tests/fake_openai.py) through the real CLI, job, engine and backend, and on the
tiny LLaVA's real tokenizer for the hf backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.backends.base import Choice, NotJudged, Query
from icm.moderation.backends.openai_compat import OpenAIBackend
from icm.moderation.job import read_records

from fake_openai import MODEL, FakeOpenAIServer, Reply, text_body, vllm_logprobs_body

# Three regions, like icm-sexy's body-region attribute: upper -> B, lower -> C, legs -> D.
POLICY = """
name: region-check
term: {id: bare, question: "Is a part of the body bare? [k=term]"}
attributes:
  - id: region
    question: "Which part of the body is bare? [k=region]"
    values:
      - {id: upper, description: Upper body}
      - {id: lower, description: Lower body or buttocks}
      - {id: legs, description: Legs}
products:
  - {id: upper_bare, assignment: {region: upper}, description: The upper body is bare.}
  - {id: lower_bare, assignment: {region: lower}, description: The lower body is bare.}
  - {id: legs_bare, assignment: {region: legs}, description: The legs are bare.}
rule_sets:
  - name: general-audience
    audience: everyone
    rules:
      - {products: [lower_bare], label: violate}
    default: allow
"""

NINE = tuple(f"option {k}" for k in range(9))  # lettered B, C, D, E, F, G, H, J, K: no I

runner = CliRunner()


def _with_text(body: dict[str, Any], text: str) -> dict[str, Any]:
    body["choices"][0]["message"]["content"] = text
    return body


@pytest.fixture()
def backend(vlm: tuple[FakeOpenAIServer, str]) -> Iterator[OpenAIBackend]:
    b = OpenAIBackend(MODEL, base_url=vlm[1], api_key="sk-loopback-secret", max_retries=0, timeout=5.0)
    yield b
    b.close()


def _ask_choice(backend: OpenAIBackend, options: tuple[str, ...]) -> Choice | NotJudged:
    image = Image.new("RGB", (16, 16), (200, 150, 120))
    answer = backend.ask([image], [Query("attr:x", "choice", "Which one? [k=choice]", options)])[0]["attr:x"]
    assert isinstance(answer, (Choice, NotJudged)), answer
    return answer


# ------------------------------------------------------------------ openai: through the CLI


def test_mass_on_the_never_offered_a_is_not_read_one_option_off(fake, vlm, tmp_path, monkeypatch):
    """The model letters A, B, C: it saw the lower body (its "B", our C) and put 0.3 on its
    "A". Main read our B (upper body): allow, a product and a P(violation) of a guess."""
    monkeypatch.setenv("ICM_OPENAI_API_KEY", "sk-loopback-secret")
    (tmp_path / "policy.yaml").write_text(POLICY)
    Image.new("RGB", (24, 24), (210, 160, 140)).save(tmp_path / "photo.png")
    fake.script("term", Reply(json=vllm_logprobs_body([("Yes", -0.02), ("No", -4.0)])))
    fake.script("region", Reply(json=vllm_logprobs_body([("B", -0.45), ("A", -1.2), ("C", -3.5)])))
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["moderate", str(tmp_path / "photo.png"), "--policy", str(tmp_path / "policy.yaml"),
                                 "--backend", "openai", "--model", MODEL, "--base-url", vlm[1], "--out", str(out)])
    assert result.exit_code == 0, result.output
    (record,), bad = read_records(out)
    assert bad == 0 and record.ok
    assert record.verdict == "review" and record.product is None and record.label is None
    assert record.attributes == {}
    assert record.unanswered["attr:region"].startswith("off-format: label not offered: A (p=0.301)")


# ------------------------------------------------------------------ openai: the backend


def test_a_letter_past_the_last_option_in_logprobs_is_off_format(fake, backend):
    fake.script("choice", Reply(json=vllm_logprobs_body([("E", -0.2), ("C", -1.8), ("B", -4.0)])))
    answer = _ask_choice(backend, ("upper", "lower", "legs"))  # B, C, D
    assert isinstance(answer, NotJudged) and answer.reason == "off-format"
    assert answer.detail.startswith("label not offered: E")


@pytest.mark.parametrize(
    "reply",
    [
        text_body("I"),  # Ollama: no logprobs
        text_body("I. Buttocks"),
        _with_text(vllm_logprobs_body([("I", -0.05), ("J", -3.2), ("H", -4.0)]), "I"),
    ],
    ids=["text", "text-with-option", "logprobs"],
)
def test_the_letter_i_is_a_label_not_offered_not_a_refusal(fake, backend, reply):
    fake.script("choice", Reply(json=reply))
    answer = _ask_choice(backend, NINE)
    assert isinstance(answer, NotJudged)
    assert answer.reason == "off-format" and "label not offered" in answer.detail, answer


def test_a_real_refusal_starting_with_i_is_still_refused(fake, backend):
    fake.script("choice", Reply(json=_with_text(
        vllm_logprobs_body([("I", -0.01), ("As", -5.0), ("C", -8.5)]), "I'm sorry, but I can't help with that.")))
    answer = _ask_choice(backend, NINE)
    assert isinstance(answer, NotJudged) and answer.reason == "refused"


@pytest.mark.parametrize("text", ["A", "(A)", "The answer is A."])
def test_a_text_answer_in_a_letter_not_offered_says_so(fake, backend, text):
    fake.script("choice", Reply(json=text_body(text)))
    answer = _ask_choice(backend, ("upper", "lower", "legs"))
    assert isinstance(answer, NotJudged) and answer.reason == "off-format"
    assert answer.detail.startswith("label not offered: answered 'A'")


def test_a_well_lettered_answer_is_still_read(fake, backend):
    fake.script("choice", Reply(json=vllm_logprobs_body([("C", -0.05), ("B", -3.2), ("A", -7.0)])))
    answer = _ask_choice(backend, ("upper", "lower", "legs"))
    assert isinstance(answer, Choice) and answer.source == "logprobs" and answer.probs[1] > 0.9


def test_a_whitespace_only_first_token_is_skipped(fake, backend):
    """A server renders its generation prompt without the reply lead: its model writes the
    space first, then the answer. The logprobs are read from the answer's token, not
    parsed from the text as a 0/1 guess."""
    body = vllm_logprobs_body([("\u0120", -0.01), ("\u0120E", -6.0)])
    answer_entry = {"token": "E", "logprob": -0.1, "bytes": [69], "top_logprobs": [
        {"token": "E", "logprob": -0.1, "bytes": [69]}, {"token": "C", "logprob": -2.5, "bytes": [67]}]}
    body["choices"][0]["logprobs"]["content"].append(answer_entry)
    fake.script("choice", Reply(json=_with_text(body, " E")))
    answer = _ask_choice(backend, ("a", "b", "c", "d", "e"))  # B, C, D, E, F
    assert isinstance(answer, Choice) and answer.source == "logprobs"
    assert answer.probs[3] == pytest.approx(0.9, abs=0.03) and 0.05 < answer.probs[1] < 0.1


# ------------------------------------------------------------------ hf: the tiny LLaVA's tokenizer


@pytest.fixture(scope="module")
def llava(tiny_llava_path: Path) -> Any:
    pytest.importorskip("torch")
    from icm.moderation.backends.hf import HFBackend

    return HFBackend(model=str(tiny_llava_path), device="cpu", batch_size=2)


def _dist(backend: Any, top: dict[str, float]) -> Any:
    import torch

    tok = backend.tokenizer
    logits = torch.full((len(tok),), -30.0)
    for piece, value in top.items():
        logits[tok.convert_tokens_to_ids(piece)] = value
    return torch.log_softmax(logits, -1)


def test_hf_mass_on_a_letter_not_offered_is_off_format(llava):
    groups = llava._letters(3)  # B, C, D
    off = llava._choice(_dist(llava, {"B": 0.0, "A": -0.8, "C": -3.0}), groups)
    assert isinstance(off, NotJudged) and off.reason == "off-format"
    assert off.detail.startswith("label not offered: A") and off.raw["unoffered"]["A"] > 0.25
    past = llava._choice(_dist(llava, {"E": 0.0, "C": -1.0}), groups)
    assert isinstance(past, NotJudged) and past.detail.startswith("label not offered: E")
    read = llava._choice(_dist(llava, {"C": 0.0, "B": -3.0, "A": -8.0}), groups)
    assert isinstance(read, Choice) and max(range(3), key=read.probs.__getitem__) == 1


def test_hf_a_bare_i_in_a_lettered_question_is_a_label_not_offered(llava):
    groups = llava._letters(9)  # B ... K without I
    answer = llava._choice(_dist(llava, {"I": 0.0, "J": -4.0}), groups)
    assert isinstance(answer, NotJudged) and answer.reason == "off-format"
    assert answer.detail.startswith("label not offered")
    yes_no = llava._yes_no(_dist(llava, {"I": 0.0, "No": -9.0}))  # a yes/no question: "I" starts a refusal
    assert isinstance(yes_no, NotJudged) and yes_no.reason == "refused"


# ------------------------------------------------------------------ training masks


def test_training_masks_come_from_the_whole_conversations_offsets(tiny_llava_path):
    """After the image prompt a conversation is tokenised as one text, as a chat model reads
    it, and the labels are exactly the replies' tokens. A yes/no reply keeps its space
    (" Yes" is a token of the tiny LLaVA: the lead of Yes/No is empty), and so does free text:
    main moved every reply's space into the prompt, a lead decided from all 23 option labels."""
    pytest.importorskip("torch")
    from icm.moderation.backends.hf_processor import load_processor
    from icm.prompting import find_templater, render, yes_no_prompt
    from icm.training.collator import IGNORE_INDEX, ChatCollator, render_segments

    from tiny_models import noise_image

    processor, _ = load_processor(str(tiny_llava_path), local_files_only=True)
    collator = ChatCollator(processor)
    tok = processor.tokenizer
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": yes_no_prompt("Is it red?")}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]},
        {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Because it is red."}]},
    ]
    enc = collator.encode({"messages": messages, "images": [noise_image(32)]})
    ids, labels = enc["input_ids"], enc["labels"]
    first = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tok.convert_ids_to_tokens(ids[first]) == "\u0120Yes"  # the token the backend reads Yes from
    templater = find_templater(processor)
    prompt = render(templater, messages[:1], generation_prompt=True)
    rest = render(templater, messages, generation_prompt=False)[len(prompt):]
    assert ids[first:] == tok(rest, add_special_tokens=False)["input_ids"]
    trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
    replies = [seg.text for seg in render_segments(templater, messages) if seg.assistant]
    assert replies[0].startswith(" Yes</s>") and replies[1].startswith(" Because it is red.</s>")
    assert trained == "".join(replies)
