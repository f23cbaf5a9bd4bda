"""What a model is shown: the one place that words, builds, renders and encodes prompts.

The project's claim is that a tuned model is trained on exactly what it is scored on.
Every decision that guarantees it is made here, once:

* **wording**: the yes/no instruction, the option labels of moderation questions
  (B, C, D, ... without A, I, O) and the answer labels ("Yes"/"No", the label of the
  true option): :func:`yes_no_prompt`, :func:`moderation_choice_prompt`,
  :func:`option_labels`, :func:`yes_no_answer`, :func:`option_answer`;
* **conversations**: a question about an image is one user turn (after an optional
  system turn), and the image goes first in the first user turn, for local models
  (:func:`hf_conversation`, content part ``{"type": "image"}``) and for servers
  (:func:`openai_conversation`, an ``image_url`` part) alike; a training example is
  that conversation followed by the answer (:func:`training_conversation`);
* **templates**: which object owns the chat template (the processor's, else its
  tokenizer's: :func:`find_templater`), how a conversation is rendered
  (:func:`render_prompt`, with a fallback for templates without a system role) and the
  BOS rule (:func:`add_special_tokens`: the tokenizer adds BOS only when the rendered
  text does not already start with it), and encoding a rendered prompt with its images
  (:func:`encode_prompt`);
* **where the reply starts**: whitespace the template puts before the replies of a
  question with a fixed answer set (:func:`offered_answers`) that the tokenizer spells as
  tokens of its own belongs to the prompt (:func:`reply_lead`, decided per answer set),
  so the first trained token is the token the answer is read from.

The hf backend (scoring and generation), the training collator, chat and the openai
backend all call these; ``tests/test_prompt_parity.py`` checks that every built-in
policy's questions come out byte-identical, with identical token ids, through each.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import copy
import logging
import re
import weakref
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

Message = dict[str, Any]
"""An OpenAI-style chat message: ``role`` and ``content`` (a string or content parts)."""

# --------------------------------------------------------------------------- wording

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""The paper's option letters (MQA benchmark, generated Q-A pairs)."""

OPTION_LABELS = "BCDEFGHJKLMNPQRSTUVWXYZ"
"""Option labels of moderation questions: upper-case letters without A, I and O."""

YES = "Yes"
NO = "No"
ANSWER_LABELS = (YES, NO)
"""The answers of a yes/no question, as trained and as read from the next token."""

YES_NO_INSTRUCTION = "Answer with Yes or No."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def yes_no_prompt(question: str) -> str:
    """The text sent for a yes/no question (the paper's "Is the image sexy?" protocol)."""
    question = question.strip()
    if YES_NO_INSTRUCTION.lower() in question.lower():
        return question
    return f"{question}\n{YES_NO_INSTRUCTION}"


def yes_no_answer(positive: bool) -> str:
    """The answer label of a yes/no question: ``"Yes"`` or ``"No"``."""
    return YES if positive else NO


def option_labels(n: int) -> list[str]:
    """The labels of a moderation question's ``n`` options: B, C, D, E, F, G, H, J, ..."""
    if n < 2 or n > len(OPTION_LABELS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(OPTION_LABELS)} options, got {n}")
    return list(OPTION_LABELS[:n])


def option_answer(n: int, index: int) -> str:
    """The answer label of option ``index`` (0-based) of an ``n``-option moderation question."""
    labels = option_labels(n)
    if not 0 <= index < n:
        raise ValueError(f"option {index} of a question with {n} options")
    return labels[index]


def moderation_choice_prompt(question: str, options: Sequence[str]) -> str:
    """A moderation multiple-choice question: options labelled by :func:`option_labels`.

    Scoring (every backend) and training (``icm train``'s moderation examples, the
    reviewed-decision export) word attribute questions with this function only.
    """
    labels = option_labels(len(options))
    lines = [question.strip()]
    lines += [f"{label}. {option}" for label, option in zip(labels, options, strict=True)]
    lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)


def option_letters(n: int) -> list[str]:
    """The paper's letters for ``n`` options (A, B, C, ...): Q-A data and the MQA benchmark."""
    if n < 2 or n > len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} options, got {n}")
    return list(LETTERS[:n])


def choice_prompt(question: str, options: Sequence[str]) -> str:
    """A lettered multiple-choice question in the paper's (LLaVA evaluation) style, A, B, C, ...

    For the paper's Q-A format only; moderation questions use :func:`moderation_choice_prompt`.
    """
    letters = option_letters(len(options))
    lines = [question.strip()]
    lines += [f"{letter}. {option}" for letter, option in zip(letters, options, strict=True)]
    lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)


# --------------------------------------------------------------------------- conversations


def chat_conversation(system: str | None, turns: Sequence[Message]) -> list[Message]:
    """The text messages of a conversation about an image: the system turn (none when
    ``system`` is empty) and the turns so far; the image is placed later."""
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    return [*head, *(dict(t) for t in turns)]


def question_conversation(text: str, system: str | None = None) -> list[Message]:
    """The text messages of one question about an image (the image is placed later)."""
    return chat_conversation(system, [{"role": "user", "content": text}])


def _text_parts(content: Any) -> list[dict[str, Any]]:
    """Content as a list of parts; a string is one text part (``input_text`` reads as text)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    return [p if p.get("type") != "input_text" else {"type": "text", "text": p["text"]} for p in content]


def place_image(conversation: Sequence[Message], image_part: dict[str, Any], *, all_parts: bool = False) -> list[Message]:
    """A copy of ``conversation`` with ``image_part`` first in the first user turn.

    That turn's content becomes a list of parts (``all_parts``: every turn's does, as
    Hugging Face chat templates expect). Raises ``ValueError`` when the conversation has
    no user turn to show the image in.
    """
    out: list[Message] = []
    placed = False
    for message in conversation:
        message = copy.deepcopy(dict(message))
        message.setdefault("role", "user")
        if message["role"] == "user" and not placed:
            message["content"] = [copy.deepcopy(image_part), *_text_parts(message.get("content", ""))]
            placed = True
        elif all_parts:
            message["content"] = _text_parts(message.get("content", ""))
        out.append(message)
    if not placed:
        raise ValueError("a conversation about an image needs a user message")
    return out


def hf_conversation(conversation: Sequence[Message]) -> list[Message]:
    """Text messages -> Hugging Face content parts, the image in the first user turn."""
    return place_image(conversation, {"type": "image"}, all_parts=True)


def image_url_part(url: str, detail: str | None = None) -> dict[str, Any]:
    """An OpenAI ``image_url`` content part (``detail``: low / high / auto, or none)."""
    image_url: dict[str, Any] = {"url": url}
    if detail:
        image_url["detail"] = detail
    return {"type": "image_url", "image_url": image_url}


def openai_conversation(conversation: Sequence[Message], url: str, detail: str | None = None) -> list[Message]:
    """Text messages -> a chat-completions request's messages, the image in the first user turn."""
    return place_image(conversation, image_url_part(url, detail))


def training_conversation(prompt: str, answer: str, system: str | None = None) -> list[Message]:
    """A single-turn training example: the scored question (image first) and its answer."""
    return [
        *hf_conversation(question_conversation(prompt, system)),
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def merge_system(messages: Sequence[Message]) -> list[Message]:
    """For chat templates without a system role: the system text opens the first user turn."""
    system = "\n\n".join(
        "".join(p.get("text", "") for p in _text_parts(m.get("content"))) for m in messages if m.get("role") == "system"
    )
    rest = [copy.deepcopy(dict(m)) for m in messages if m.get("role") != "system"]
    if system:
        for m in rest:
            if m.get("role") == "user":
                content = m.get("content", "")
                if isinstance(content, str):
                    m["content"] = f"{system}\n\n{content}"
                else:
                    m["content"] = [{"type": "text", "text": f"{system}\n\n"}, *content]
                break
    return rest


# --------------------------------------------------------------------------- templates and tokens


def find_templater(processor: Any) -> Any:
    """The object whose chat template renders prompts: the processor's, else its tokenizer's."""
    tokenizer = getattr(processor, "tokenizer", processor)
    for owner in (processor, tokenizer):
        if getattr(owner, "chat_template", None):
            return owner
    raise ValueError("the checkpoint has no chat template (neither its processor nor its tokenizer)")


def render(templater: Any, conversation: Sequence[Message], *, generation_prompt: bool) -> str:
    """``conversation`` (content parts, image already placed) through the chat template."""
    return templater.apply_chat_template(list(conversation), add_generation_prompt=generation_prompt, tokenize=False)


def render_prompt(templater: Any, conversation: Sequence[Message]) -> str:
    """The generation prompt of a text conversation about one image (image in the first user turn).

    A template that rejects the system role ("System role not supported") gets the
    system text at the start of the first user turn instead. When the last turn is a
    question with a fixed answer set (:func:`offered_answers`: Yes/No, or the option
    labels it lists), the prompt ends with the template's :func:`reply_lead` for that set
    (usually nothing), as the collator's prompt segments do; free text gets no lead.
    """
    try:
        text = render(templater, hf_conversation(conversation), generation_prompt=True)
    except Exception:  # templates refuse a system role in their own ways (TemplateError, ValueError): retried, else re-raised
        if not any(m.get("role") == "system" for m in conversation):
            raise
        text = render(templater, hf_conversation(merge_system(conversation)), generation_prompt=True)
    answers = offered_answers(conversation[-1]) if conversation else None
    return text + (reply_lead(templater, answers) if answers else "")


def message_text(message: Message) -> str:
    """The text of a message (its text parts joined; images left out)."""
    return "".join(p.get("text", "") for p in _text_parts(message.get("content")) if p.get("type") == "text")


_OPTION_LINE = re.compile(r"^([A-Z])\. ", re.MULTILINE)


def offered_answers(question: str | Message) -> tuple[str, ...] | None:
    """The answers a question offers, read from its wording; ``None`` for free text.

    A yes/no question (:func:`yes_no_prompt`, ending in :data:`YES_NO_INSTRUCTION`) offers
    ``("Yes", "No")``; a lettered one (:func:`moderation_choice_prompt`,
    :func:`choice_prompt`, ending in :data:`CHOICE_INSTRUCTION`) offers the labels of its
    option lines (``"B. ..."``), in order. A message that is not a user turn offers none.
    """
    if isinstance(question, dict):
        if question.get("role", "user") != "user":
            return None
        question = message_text(question)
    text = question.rstrip()
    if text.lower().endswith(YES_NO_INSTRUCTION.lower()):
        return ANSWER_LABELS
    if text.endswith(CHOICE_INSTRUCTION):
        labels = tuple(_OPTION_LINE.findall(text))
        return labels if len(labels) >= 2 else None
    return None


_LEADS: weakref.WeakKeyDictionary[Any, tuple[str, dict[tuple[str, ...], str]]] = weakref.WeakKeyDictionary()
"""templater -> (the chat template the leads were computed for, {answer set: lead})."""

ALL_ANSWERS: tuple[str, ...] = (*ANSWER_LABELS, *OPTION_LABELS)


def reply_lead(templater: Any, answers: Sequence[str] | None = None) -> str:
    """The whitespace before a reply to a question offering ``answers`` that belongs to the prompt.

    ``""`` for most checkpoints. The scoring protocol reads the answer from the first
    token after the prompt, and the collator trains the reply's tokens after the prompt;
    they agree only if the reply's first token carries the answer. A template may put a
    separator before replies that the generation prompt lacks (LLaVA's ``ASSISTANT:``
    prompt, ``ASSISTANT: C</s>`` reply), and a tokenizer may spell it as a token of its
    own: real LLaVA-1.5's has ``\u2581C``, so its reply starts with the answer, but a
    byte-level BPE without a `` C`` token splits the reply into `` `` and ``C``, and the
    model would be trained on a space token at the very position the backend reads "C" from.

    The lead is decided per answer set, for the answers a question actually offers
    (``("Yes", "No")``, or one attribute's option labels: :func:`offered_answers`), so
    labels a question never offers cannot move its tokens; ``None`` means every label
    (Yes, No and all option labels). Cached per templater, chat template and answer set.
    The rule: render a question with each answer, tokenise the reply as the collator does
    (on its own, no special tokens). If every reply's first token decodes to its answer,
    the lead is ``""`` and nothing changes. Otherwise the replies' leading whitespace (the
    same text for every answer) is the lead, provided every reply without it starts with
    its answer's token; it then belongs to the prompt: :func:`render_prompt` appends it to
    the generation prompt of a question offering that set (scoring, chat), and
    :func:`split_reply` moves it from such a question's reply into the preceding prompt
    segment (training), so both tokenise the same text and the first trained token is the
    answer read. When neither choice makes every answer the first token, the lead stays
    ``""`` and a warning names the answers that are not read where they are trained.
    Free text (no answer set) has no lead.

    A server (the openai backend) renders its own generation prompt, without the lead:
    for such a checkpoint its model's first token is the whitespace, and the openai
    backend skips a whitespace-only first token and reads the answer from the next one.
    """
    key = tuple(answers) if answers is not None else ALL_ANSWERS
    template = str(getattr(templater, "chat_template", None))
    try:
        cached = _LEADS.get(templater)
    except TypeError:  # not weak-referenceable: computed every time
        cached = None
    if cached is None or cached[0] != template:
        cached = (template, {})
        try:
            _LEADS[templater] = cached
        except TypeError:
            pass
    if key not in cached[1]:
        cached[1][key] = _compute_reply_lead(templater, key)
    return cached[1][key]


def _compute_reply_lead(templater: Any, answers: Sequence[str]) -> str:
    tokenizer = getattr(templater, "tokenizer", templater)
    if not callable(getattr(tokenizer, "decode", None)):
        return ""
    conversation = hf_conversation(question_conversation("?"))
    try:
        prompt = render(templater, conversation, generation_prompt=True)
        replies: dict[str, str] = {}
        for answer in answers:
            turn = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
            full = render(templater, [*conversation, turn], generation_prompt=False)
            if not full.startswith(prompt):
                return ""  # the collator refuses such a template (render_segments)
            replies[answer] = full[len(prompt) :]
    except Exception:  # noqa: BLE001 - a template that cannot render the probe: nothing to decide
        return ""

    def misread(lead: str) -> list[str]:
        """Answers whose reply (less ``lead``) does not start with the answer's token."""
        wrong = []
        for answer, reply in replies.items():
            ids = tokenizer(reply[len(lead) :], add_special_tokens=False)["input_ids"]
            if not ids or tokenizer.decode(ids[:1]).strip() != answer:
                wrong.append(answer)
        return wrong

    wrong = misread("")
    if not wrong:
        return ""
    leads = {reply[: len(reply) - len(reply.lstrip())] for reply in replies.values()}
    lead = leads.pop() if len(leads) == 1 else ""
    if lead and not misread(lead):
        return lead
    logger.warning(
        "the chat template and tokenizer spell the replies %s with another first token: the model is "
        "trained on that token where the answer is read",
        ", ".join(wrong),
    )
    return ""


def split_reply(templater: Any, reply: str, answers: Sequence[str] | None = None) -> tuple[str, str]:
    """``(lead, rest)`` of a rendered reply to a question offering ``answers``: the
    :func:`reply_lead` of that set it starts with, if any (none for free text: ``answers`` None)."""
    if not answers:
        return "", reply
    lead = reply_lead(templater, answers)
    if lead and reply.startswith(lead) and len(reply) > len(lead):
        return lead, reply[len(lead) :]
    return "", reply


def add_special_tokens(tokenizer: Any, text: str) -> bool:
    """The BOS rule: let the tokenizer add BOS only when the rendered text does not start
    with it (the chat template may already hold it, as transformers assumes)."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos is not None and text.startswith(bos))


def _rgb(image: Any) -> Any:
    return image if getattr(image, "mode", "RGB") == "RGB" else image.convert("RGB")


def encode_prompt(
    processor: Any, images: Sequence[Any], texts: Sequence[str], *, padding: bool = False, add_bos: bool | None = None
) -> Any:
    """Rendered prompts with their images through the processor, under the BOS rule.

    Images are made RGB; returns the processor's ``BatchFeature`` of torch tensors. Every
    text is rendered by the same template, so the first one decides the BOS rule;
    ``add_bos`` overrides it (``False`` for a later segment of a conversation).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    kwargs: dict[str, Any] = {"padding": True} if padding else {}
    return processor(
        images=[_rgb(im) for im in images],
        text=list(texts),
        return_tensors="pt",
        add_special_tokens=add_special_tokens(tokenizer, texts[0]) if add_bos is None else add_bos,
        **kwargs,
    )
