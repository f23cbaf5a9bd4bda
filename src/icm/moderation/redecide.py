"""Re-decide a record's evidence under another rule set of its policy.

The evidence an image gives (P(term), the attribute distributions) does not depend on the
rule set; only the decision does (the paper's thesis, and :func:`icm.policy.decide`'s
contract). So a caller that needs one image judged under several rule sets (the server,
when a batch names several) asks the model once and re-decides here, instead of running a
:class:`~icm.moderation.engine.Moderator` per rule set.

Exact for single-view records from one backend. Two kinds of record are not re-decidable,
because the rule set shaped which evidence they hold: a cascade's (whether the second stage
ran depends on the first stage's verdict) and a multi-view image's (which frame is the worst
depends on the rule set); :func:`redecidable` says so and :func:`redecide` refuses them.
"""

from __future__ import annotations

from icm.moderation.backends.base import NotJudged
from icm.moderation.engine import _apply_unanswered, _reason
from icm.moderation.record import ModerationRecord
from icm.policy import Policy, decide
from icm.policy.taxonomy import category_scores, flagged_categories

_OFF_FORMAT_NOTE = "not judged (off-format answer)"


class NotRedecidable(ValueError):
    """The record's evidence depends on the rule set it was made under."""


def redecidable(record: ModerationRecord) -> bool:
    """Whether :func:`redecide` gives exactly what a Moderator for the other rule set gives."""
    return record.stage is None and len(record.frame_scores or []) <= 1


def _not_judged(text: str) -> NotJudged:
    reason, _, detail = text.partition(": ")
    return NotJudged(reason, detail)  # type: ignore[arg-type]


def redecide(record: ModerationRecord, policy: Policy, rules: str | None) -> ModerationRecord:
    """A copy of ``record`` decided under rule set ``rules`` of ``policy`` (the record's own policy).

    Error records and refusals keep their outcome (neither depends on the rule set); every
    other field that :func:`icm.policy.decide` sets is recomputed from the record's evidence,
    and off-format answers are applied again as the engine applies them.
    """
    if record.policy != policy.name:
        raise ValueError(f"the record was made under policy {record.policy!r}, not {policy.name!r}")
    if not redecidable(record):
        raise NotRedecidable(
            "a cascade's or a multi-view image's record holds evidence chosen under its own rule set; "
            "moderate it again under the other rule set"
        )
    rs = policy.rule_set(rules)
    out = record.model_copy(deep=True)
    out.rules = rs.name
    if not record.ok or record.basis == "refused":
        return out
    p_term = record.term.p_yes if record.term is not None else None
    d = decide(policy, rs, attributes=record.attributes or None, p_term=p_term)
    out.product = d.product
    out.product_probability = d.product_probability
    out.product_description = d.product_description
    out.rule = d.label.rule if d.label else None
    out.label = d.label.verdict if d.label else None
    out.severity = d.label.severity if d.label else None
    out.p_violation = d.p_violation
    out.p_violation_range = d.p_violation_range
    out.basis = d.basis
    for name in ("p_uncovered", "cell", "conflict"):  # decision details, where the record carries them
        if name in ModerationRecord.model_fields:
            setattr(out, name, getattr(d, name, None))
    out.verdict = d.verdict
    out.category_scores = category_scores(policy, rs, d)
    out.flagged_categories = flagged_categories(out.category_scores, rs.thresholds.review)
    out.reason = _reason(policy, d)
    out.notes = [n for n in out.notes if not n.startswith(_OFF_FORMAT_NOTE)]
    return _apply_unanswered(out, {k: _not_judged(v) for k, v in record.unanswered.items()}, policy.standard_categories)
