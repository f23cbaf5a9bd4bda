"""How questions are worded for a model (defined in :mod:`icm.prompting`, re-exported here).

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

# The wording lives in icm.prompting, with the rest of what a model is shown (conversation
# building, template rendering, image placement, the BOS rule); these names stay importable
# from here.
from icm.prompting import (
    ANSWER_LABELS,
    CHOICE_INSTRUCTION,
    LETTERS,
    NO,
    OPTION_LABELS,
    YES,
    YES_NO_INSTRUCTION,
    choice_prompt,
    moderation_choice_prompt,
    option_answer,
    option_labels,
    option_letters,
    yes_no_answer,
    yes_no_prompt,
)

__all__ = [
    "ANSWER_LABELS",
    "CHOICE_INSTRUCTION",
    "LETTERS",
    "NO",
    "OPTION_LABELS",
    "YES",
    "YES_NO_INSTRUCTION",
    "choice_prompt",
    "moderation_choice_prompt",
    "option_answer",
    "option_labels",
    "option_letters",
    "yes_no_answer",
    "yes_no_prompt",
]
