"""Compile a policy into the prompts later stages need.

* moderation: the term's yes/no question and one lettered multiple-choice question per
  attribute (the wording of both lives in :mod:`icm.policy.prompts_format`);
* data generation (ICM-Instruct): explicit content, implicit content and the moderation
  explanation, each seeded with the product's short explicit description, in one
  multi-question call (as the paper did) or one call per stage; then the text-only
  prompt that turns an explanation into question-answer pairs.

The wording is ours. Templates use ``str.format`` fields documented on each constant.
"""

from __future__ import annotations

from pydantic import BaseModel

from icm.policy.model import Policy, Product
from icm.policy.prompts_format import moderation_choice_prompt, option_labels, yes_no_prompt

# Fields: {term}, {hint} (the product's short description), {question} (the term question),
# {yes} / {no} (the term's verdict statements, e.g. "The image is sexy" / "The image is not sexy").
EXPLICIT_STAGE = (
    "{hint}\n"
    "Describe only what is visibly in the image: the people, their clothes, which parts of "
    "the body are covered or bare, their posture and movements, and any text or objects. "
    "Be concrete and factual; do not judge the image yet."
)
IMPLICIT_STAGE = (
    "{hint}\n"
    "Describe what the image conveys beyond what is literally shown: its atmosphere, the "
    "mood and intent it suggests, and how the framing, lighting and setting contribute."
)
EXPLANATION_STAGE = (
    "{hint}\n"
    "Based on the explicit and the implicit content of the image, answer the question "
    "\"{question}\" and explain why. Name the visible elements that decide it. Start your answer with "
    "\"{yes}\" or \"{no}\", then give the reasons in the third person."
)
COMBINED_STAGES = (
    "{hint}\n"
    "Answer the three questions below about the image, each under its number.\n"
    "1. Explicit content: what is visibly in the image (people, clothes, which parts of the "
    "body are covered or bare, posture, movements, text, objects)?\n"
    "2. Implicit content: what atmosphere, mood or intent does the image convey?\n"
    "3. {question} Start with \"{yes}\" or \"{no}\" and explain why from 1 and 2, in the "
    "third person."
)
# Fields: {term}, {question}. Asked at moderation time with --explain.
MODERATION_EXPLANATION = (
    "{question} Explain your answer: describe what the image shows that matters for the "
    "question (people, clothing, poses, actions, objects, text), then say whether the image "
    "is {term} and why."
)
# Fields: {term}, {explanation}, {n_yes_no}, {n_choice}, {n_what}, {n_how}.
QA_GENERATION = (
    "Below is an explanation of whether an image is {term}.\n\n"
    "Explanation:\n{explanation}\n\n"
    "Write question-answer pairs that can be answered from the explanation alone and that "
    "test whether a reader understood why the image is or is not {term}: {n_yes_no} yes/no "
    "questions, {n_choice} multiple-choice questions with four options A-D and exactly one "
    "correct, {n_what} 'what' questions and {n_how} 'how' questions.\n"
    "Return one markdown table with the columns | type | question | choices | answer |, one "
    "row per question; type is one of yes/no, choice, what, how; choices holds the four "
    "options as 'A. ... B. ... C. ... D. ...' for choice questions and is empty otherwise; "
    "the answer of a yes/no question is Yes or No, of a choice question the letter."
)


class TermPrompt(BaseModel):
    term: str
    question: str
    prompt: str


class AttributePrompt(BaseModel):
    attribute: str
    question: str
    option_ids: list[str]
    options: list[str]
    letters: list[str]
    prompt: str


class StagePrompts(BaseModel):
    """The data-generation prompts for one product."""

    product: str
    hint: str
    explicit: str
    implicit: str
    explanation: str
    combined: str


class CompiledPrompts(BaseModel):
    policy: str
    term: TermPrompt
    attributes: list[AttributePrompt]
    stages: list[StagePrompts]
    qa_generation: str


def term_prompt(policy: Policy) -> TermPrompt:
    q = policy.term.question
    return TermPrompt(term=policy.term.id, question=q, prompt=yes_no_prompt(q))


def attribute_prompts(policy: Policy) -> list[AttributePrompt]:
    out = []
    for a in policy.attributes:
        options = [v.option_text for v in a.values]
        out.append(
            AttributePrompt(
                attribute=a.id,
                question=a.question,
                option_ids=a.value_ids,
                options=options,
                letters=option_labels(len(options)),
                prompt=moderation_choice_prompt(a.question, options),
            )
        )
    return out


def stage_prompts(policy: Policy, product: Product | str) -> StagePrompts:
    p = policy.product(product) if isinstance(product, str) else product
    t = policy.term
    fields = {"term": t.id, "hint": p.description, "question": t.question, "yes": t.positive_statement, "no": t.negative_statement}
    return StagePrompts(
        product=p.id,
        hint=p.description,
        explicit=EXPLICIT_STAGE.format(**fields),
        implicit=IMPLICIT_STAGE.format(**fields),
        explanation=EXPLANATION_STAGE.format(**fields),
        combined=COMBINED_STAGES.format(**fields),
    )


def explanation_prompt(policy: Policy) -> str:
    """The prompt asking a model to explain its moderation of an image."""
    return MODERATION_EXPLANATION.format(term=policy.term.id, question=policy.term.question)


def qa_generation_prompt(
    policy: Policy, explanation: str, *, n_yes_no: int = 4, n_choice: int = 5, n_what: int = 3, n_how: int = 3
) -> str:
    return QA_GENERATION.format(
        term=policy.term.id, explanation=explanation.strip(), n_yes_no=n_yes_no, n_choice=n_choice, n_what=n_what, n_how=n_how
    )


def compile_prompts(policy: Policy) -> CompiledPrompts:
    return CompiledPrompts(
        policy=policy.name,
        term=term_prompt(policy),
        attributes=attribute_prompts(policy),
        stages=[stage_prompts(policy, p) for p in policy.products],
        qa_generation=QA_GENERATION,
    )
