"""Pydantic records for every stage of ICM-Instruct data generation.

One image with its attribute product goes through the stages

* :class:`DescriptionRecord` (``explicit``: what is visible; ``implicit``: atmosphere, intent),
* :class:`ExplanationRecord`: why the image is or is not the term, with the verdict read
  from the text,
* :class:`QAPair`: question-answer pairs an LLM wrote from the explanation,

and ends as one :class:`InstructRecord` (a line of ``records.jsonl``). Everything that
fails a check is kept as a :class:`Rejected` (a line of ``rejected.jsonl``) with a reason
code from :data:`REASONS` and a human-readable detail, never silently dropped.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, Field

from icm.policy.prompts_format import CHOICE_INSTRUCTION, YES_NO_INSTRUCTION, option_letters

QAKind = Literal["yes_no", "choice", "what", "how", "open"]
QA_KINDS: tuple[str, ...] = ("yes_no", "choice", "what", "how", "open")
Source = Literal["generated", "icm-instruct"]

REASONS: dict[str, str] = {
    # explanation / description quality (the paper's filters, and ours)
    "refusal": "the model refused or did not answer",
    "first_person": "the text speaks in the first person",
    "no_verdict": "the explanation never says whether the image is the term",
    "contradiction": "the explanation's verdict contradicts the image's product",
    "mixed_verdict": "the explanation says both that the image is and is not the term",
    "truncated": "the text stops mid-sentence",
    "too_short": "the text is too short to be a description",
    "empty": "the model returned no text",
    "sections": "the multi-question answer could not be split into its three parts",
    # Q-A tables
    "no_table": "the reply holds no markdown table",
    "empty_table": "the table has a header but no rows",
    "no_qa": "no question-answer pair of the reply could be used",
    "no_question": "the question cell holds no question",
    "no_answer": "the answer is missing",
    "bad_yes_no": "a yes/no question whose answer is neither yes nor no",
    "bad_choices": "a multiple-choice question without usable lettered options",
    "bad_choice_answer": "the answer of a multiple-choice question names no option",
    "unreadable": "the file or cell could not be read",
    "unknown_category": "the image's category names no product of the policy",
    "missing_file": "a file the layout needs is missing",
}


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DescriptionRecord(BaseModel):
    """The explicit or implicit content of an image, as an MLLM described it."""

    kind: Literal["explicit", "implicit"]
    text: str
    model: str | None = None


class ExplanationRecord(BaseModel):
    """Why the image is or is not the term.

    ``verdict`` is what the text says (True: it is the term, None: it never says);
    ``expected`` is what the image's product says (``Product.positive``).
    """

    text: str
    verdict: bool | None = None
    evidence: str | None = Field(default=None, description="The sentence the verdict was read from")
    expected: bool | None = None
    model: str | None = None
    flags: list[str] = Field(default_factory=list, description="Quality findings (reason codes) kept, not filtered")

    @property
    def agrees(self) -> bool | None:
        if self.verdict is None or self.expected is None:
            return None
        return self.verdict == self.expected


class QAPair(BaseModel):
    """One question with its answer.

    * ``yes_no``: ``answer`` is ``"Yes"`` or ``"No"``;
    * ``choice``: ``choices`` are the option texts (without letters), ``answer`` the
      correct option's letter and ``answer_index`` its position;
    * ``what`` / ``how`` / ``open``: ``answer`` is free text.
    """

    kind: QAKind
    question: str
    answer: str
    choices: list[str] = Field(default_factory=list)
    answer_index: int | None = None

    @property
    def letters(self) -> list[str]:
        return option_letters(len(self.choices)) if self.choices else []

    @property
    def answer_text(self) -> str:
        """The answer as a short reply: the letter and option for choices."""
        if self.kind == "choice" and self.answer_index is not None:
            return f"{self.answer}. {self.choices[self.answer_index]}"
        return self.answer

    def prompt(self, instruction: str | None = None) -> str:
        """The question as asked to a model; ``instruction`` overrides the answer-format line."""
        if self.kind == "choice":
            lines = [self.question] + [f"{letter}. {c}" for letter, c in zip(self.letters, self.choices, strict=True)]
            lines.append(CHOICE_INSTRUCTION if instruction is None else instruction)
            return "\n".join(line for line in lines if line)
        if self.kind == "yes_no":
            tail = YES_NO_INSTRUCTION if instruction is None else instruction
            return f"{self.question}\n{tail}".strip()
        return f"{self.question}\n{instruction}".strip() if instruction else self.question


class InstructRecord(BaseModel):
    """One image's ICM-Instruct data: descriptions, explanation and Q-A pairs."""

    id: str = Field(description="Stable id: the image content hash and the product")
    image: str = Field(description="The image path as given in the inputs (or the released file name)")
    image_sha256: str | None = None
    policy: str
    term: str
    product: str
    category: str | None = Field(default=None, description="The category name the input used")
    positive: bool = Field(description="Whether the image is the term (the product's truth)")
    explicit: DescriptionRecord | None = None
    implicit: DescriptionRecord | None = None
    explanation: ExplanationRecord | None = Field(
        default=None, description="Always set by generation; None for an imported image whose explanation file is empty"
    )
    other_explanations: list[ExplanationRecord] = Field(default_factory=list)
    qa: list[QAPair] = Field(default_factory=list)
    source: Source = "generated"
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def split_key(self) -> str:
        """What train/validation splits group by: the image's content, else its name."""
        return self.image_sha256 or self.image


class Rejected(BaseModel):
    """Something that failed a check, with why; written to ``rejected.jsonl``.

    ``key`` is unique per rejected thing (``<id>:<stage>[:<row>]``), so a resumed run
    never writes one twice. ``item`` is True when the whole image was rejected (no
    record will be written for it) and False for one row of an otherwise kept item.
    """

    key: str
    id: str
    image: str
    product: str | None = None
    stage: str
    reason: str
    detail: str = ""
    item: bool = True
    raw: str | None = None
    line: int | None = Field(default=None, description="Line of the raw text, for table rows and imported files")
    model: str | None = None
