"""How questions are worded for a model: shared by prompt compilation and every backend.

Kept apart from policy compilation so that backends can format a question without
importing the policy engine.

Two lettering schemes live here, on purpose:

* **Moderation questions** (what ``icm moderate`` scores and ``icm train`` teaches: the
  term's yes/no question and one multiple-choice question per attribute) label their
  options with :data:`OPTION_LABELS` through :func:`option_labels` and
  :func:`moderation_choice_prompt`. The labels skip ``A``, ``I`` and ``O``: "A" and "I"
  are English words that start sentences ("I'm sorry, but I can't help with that.",
  "A woman stands ..."), so a refusal's or a description's first token would read as an
  option; "O" is read as zero. Numbers are no better ("10" starts with the token "1" in
  many tokenizers). Every label is one upper-case letter, so each is a single token in
  every tokenizer we met, and the first-token probability protocol works unchanged.
* **The paper's Q-A format** (:data:`LETTERS`, :func:`option_letters`,
  :func:`choice_prompt`): options ``A``, ``B``, ``C``, ... as in the published MQA
  benchmark and the generated ICM-Instruct Q-A pairs, whose true answers are those
  letters. Used where answers are compared with that data, never for scoring.
"""

from __future__ import annotations

from typing import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""The paper's option letters (MQA benchmark, generated Q-A pairs)."""

OPTION_LABELS = "BCDEFGHJKLMNPQRSTUVWXYZ"
"""Option labels of moderation questions: upper-case letters without A, I and O."""

YES_NO_INSTRUCTION = "Answer with Yes or No."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def yes_no_prompt(question: str) -> str:
    """The text sent for a yes/no question (the paper's "Is the image sexy?" protocol)."""
    question = question.strip()
    if YES_NO_INSTRUCTION.lower() in question.lower():
        return question
    return f"{question}\n{YES_NO_INSTRUCTION}"


def option_labels(n: int) -> list[str]:
    """The labels of a moderation question's ``n`` options: B, C, D, E, F, G, H, J, ..."""
    if n < 2 or n > len(OPTION_LABELS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(OPTION_LABELS)} options, got {n}")
    return list(OPTION_LABELS[:n])


def moderation_choice_prompt(question: str, options: Sequence[str]) -> str:
    """A moderation multiple-choice question: options labelled by :func:`option_labels`.

    Scoring (every backend) and training (``icm train``'s moderation examples, the
    reviewed-decision export) word attribute questions with this function only.
    """
    labels = option_labels(len(options))
    lines = [question.strip()]
    lines += [f"{label}. {option}" for label, option in zip(labels, options)]
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
    lines += [f"{letter}. {option}" for letter, option in zip(letters, options)]
    lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)
