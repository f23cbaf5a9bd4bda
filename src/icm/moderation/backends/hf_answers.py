"""Answer tokens of the hf backend: which token ids spell "Yes", "No" and each option
label, and how a next-token distribution is read as an answer (or as not judged).

The probability of an answer is the softmax over the answers' next-token logits, each
answer's logit being the logsumexp over the single tokens that spell it ("Yes", " Yes",
"yes", ...). It is an answer only when the labels hold at least ``min_label_mass`` of the
next-token probability; otherwise the question is not judged: ``refused`` when the most
likely token starts a refusal, ``off-format`` otherwise. A multiple-choice answer is also
``off-format`` when letters the question did not offer ("A", "I", letters past its last
option) hold too much of the letters' probability (:data:`~icm.moderation.backends.base.MAX_UNOFFERED_SHARE`):
the model letters its options otherwise, and one option would be read off; a bare "I"
there is the letter I, not the start of a refusal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from icm.moderation.backends.base import (
    REFUSAL_FIRST_WORDS,
    UNOFFERED,
    Choice,
    NotJudged,
    NotJudgedReason,
    YesNoScore,
    unoffered_detail,
)
from icm.prompting import LETTERS, NO, YES, option_labels

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "NO_VARIANTS",
    "YES_VARIANTS",
    "AnswerTokens",
    "answer_variants",
    "check_disjoint",
    "grouped_probs",
    "read_choice",
    "read_yes_no",
    "resolve_answer_token_ids",
]

YES_VARIANTS = (YES, " " + YES, YES.lower(), " " + YES.lower())
NO_VARIANTS = (NO, " " + NO, NO.lower(), " " + NO.lower())
# Vocabulary spellings of a word-initial token in SentencePiece / byte-level BPE vocabularies.
_PIECE_PREFIXES = ("", "\u2581", "\u0120")


def answer_variants(word: str) -> tuple[str, ...]:
    """Spellings of ``word`` a model may emit as its first answer token."""
    if word in (YES, YES.lower()):
        return YES_VARIANTS
    if word in (NO, NO.lower()):
        return NO_VARIANTS
    if len(word) == 1:  # an option letter: "A" and " A"; never lower-case ("a" is a word)
        return (word, " " + word)
    return (word, " " + word, word.lower(), " " + word.lower())


def resolve_answer_token_ids(tokenizer: Any, word: str, variants: Sequence[str] | None = None) -> list[int]:
    """Token ids that spell ``word`` on their own, for next-token scoring.

    A variant counts when it encodes to exactly one token that decodes back to the word
    (ignoring case and surrounding space; an unknown token never counts). Vocabulary
    pieces spelled like the variants ("Yes", "\u2581Yes", "\u0120Yes") are added the same way,
    since e.g. a SentencePiece tokenizer can emit "Yes" after a newline although
    ``encode("Yes")`` gives "\u2581Yes". Raises ``ValueError`` when nothing qualifies.
    """
    variants = tuple(variants) if variants is not None else answer_variants(word)
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    wanted = {v.strip().lower() for v in variants}
    ids: list[int] = []

    def accept(token_id: int | None) -> None:
        if token_id is None or token_id == unk or token_id in special or token_id in ids:
            return
        if tokenizer.decode([token_id]).strip().lower() in wanted:
            ids.append(int(token_id))

    for variant in variants:
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1:
            accept(encoded[0])
    vocab = tokenizer.get_vocab()
    for variant in variants:
        if variant.startswith(" "):
            continue
        for prefix in _PIECE_PREFIXES:
            accept(vocab.get(prefix + variant))
    if not ids:
        raise ValueError(
            f"no single-token spelling of {word!r} in this tokenizer (tried {list(variants)}): "
            "next-token scoring needs one; use a checkpoint whose tokenizer has it"
        )
    return ids


def check_disjoint(groups: Sequence[Sequence[int]], names: Sequence[str]) -> None:
    """Raise ``ValueError`` when two answers share a token id (their mass would be counted twice)."""
    seen: dict[int, str] = {}
    for ids, name in zip(groups, names, strict=True):
        for token_id in ids:
            if token_id in seen and seen[token_id] != name:
                raise ValueError(f"answers {seen[token_id]!r} and {name!r} share token {token_id}")
            seen[token_id] = name


def grouped_probs(logprobs: torch.Tensor, groups: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over answers, each answer's logit being the logsumexp over its token ids.

    ``logprobs`` is ``(n, vocab)`` (log-softmax or raw logits: the result is the same);
    returns ``(probs, scores)``, both ``(n, len(groups))``.
    """
    import torch

    scores = torch.stack([torch.logsumexp(logprobs[:, list(g)], dim=-1) for g in groups], dim=-1)
    return torch.softmax(scores, dim=-1), scores


class AnswerTokens:
    """The token ids of one tokenizer's answers: Yes, No and the option labels (cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.yes_ids = resolve_answer_token_ids(tokenizer, YES)
        self.no_ids = resolve_answer_token_ids(tokenizer, NO)
        check_disjoint([self.yes_ids, self.no_ids], [YES, NO])
        self._label_ids: dict[str, list[int]] = {}

    def labels(self, n: int) -> list[list[int]]:
        """Token ids of each option label of an ``n``-option moderation question."""
        groups = [self._label(label) for label in option_labels(n)]
        check_disjoint(groups, option_labels(n))
        return groups

    def unoffered(self, n: int) -> dict[str, list[int]]:
        """Token ids of the letters A-Z an ``n``-option question does not offer (those with a
        single-token spelling; they share no token with the offered labels)."""
        offered = set(option_labels(n))
        taken = {i for label in offered for i in self._label(label)}
        out: dict[str, list[int]] = {}
        for letter in LETTERS:
            if letter in offered:
                continue
            try:
                ids = [i for i in self._label(letter) if i not in taken]
            except ValueError:  # no single-token spelling: the model cannot say it in one token
                continue
            if ids:
                out[letter] = ids
        return out

    def _label(self, label: str) -> list[int]:
        if label not in self._label_ids:
            self._label_ids[label] = resolve_answer_token_ids(self.tokenizer, label)
        return self._label_ids[label]


def read_yes_no(logprobs: torch.Tensor, tokens: AnswerTokens, min_label_mass: float) -> YesNoScore | NotJudged:
    """P(Yes) from one next-token distribution, or not judged when Yes/No hold too little mass."""
    probs, scores = grouped_probs(logprobs[None], [tokens.yes_ids, tokens.no_ids])
    raw = {
        "logprob_yes": float(scores[0, 0]),
        "logprob_no": float(scores[0, 1]),
        "yes_no_mass": float(scores[0].exp().sum()),
    }
    if raw["yes_no_mass"] < min_label_mass:
        return not_judged(logprobs, tokens.tokenizer, raw["yes_no_mass"], "Yes/No", raw, min_label_mass)
    return YesNoScore(p_yes=float(probs[0, 0]), source="logits", raw=raw)


def read_choice(
    logprobs: torch.Tensor,
    groups: Sequence[Sequence[int]],
    tokenizer: Any,
    min_label_mass: float,
    unoffered: dict[str, list[int]] | None = None,
) -> Choice | NotJudged:
    """A distribution over the options (token id ``groups``), or not judged: too little label
    mass, or letters the question did not offer (``unoffered``: letter -> token ids) weigh too much."""
    import torch

    probs, scores = grouped_probs(logprobs[None], groups)
    raw: dict[str, Any] = {"logprobs": [float(s) for s in scores[0]], "letter_mass": float(scores[0].exp().sum())}
    if raw["letter_mass"] < min_label_mass:
        return not_judged(logprobs, tokenizer, raw["letter_mass"], "the option labels", raw, min_label_mass, offered=option_labels(len(groups)))
    if unoffered:
        normed = torch.log_softmax(logprobs.float(), dim=-1)
        stray = {k: float(torch.logsumexp(normed[list(ids)], dim=-1).exp()) for k, ids in unoffered.items()}
        offered = {
            label: float(torch.logsumexp(normed[list(g)], dim=-1).exp())
            for label, g in zip(option_labels(len(groups)), groups, strict=True)
        }
        detail = unoffered_detail(offered, stray, min_label_mass)
        if detail is not None:
            raw["unoffered"] = {k: v for k, v in sorted(stray.items(), key=lambda kv: -kv[1]) if v >= 1e-4}
            return NotJudged("off-format", detail, {**raw, "top_token": tokenizer.decode([int(logprobs.argmax())])})
    return Choice(probs=[float(p) for p in probs[0]], source="logits", raw=raw)


def not_judged(
    logprobs: torch.Tensor,
    tokenizer: Any,
    mass: float,
    what: str,
    raw: dict[str, Any],
    min_label_mass: float,
    *,
    offered: Sequence[str] | None = None,
) -> NotJudged:
    """Not judged: the model's next token is not a label; ``refused`` when it starts a refusal.

    For a choice question (``offered``: its labels) a bare letter it did not offer, "I"
    included, is a label not offered, not the start of a refusal."""
    top = int(logprobs.argmax())
    token = tokenizer.decode([top])
    word = token.strip().strip(".,!:;\"'").lower()
    detail = f"most likely next token {token!r} (p={float(logprobs[top].exp()):.3g}); P({what})={mass:.3g} < {min_label_mass:g}"
    letter = token.strip().strip(".):(")
    if offered is not None and len(letter) == 1 and letter in LETTERS and letter not in offered:
        shown = f"{UNOFFERED}: {letter} (p={float(logprobs[top].exp()):.3g}), offered {', '.join(offered)}; {detail}"
        return NotJudged("off-format", shown, {**raw, "top_token": token})
    reason: NotJudgedReason = "refused" if word in REFUSAL_FIRST_WORDS else "off-format"
    return NotJudged(reason, detail, {**raw, "top_token": token})
