"""One ``/v1/moderations`` result per input, in OpenAI's shape: its 13 categories.

``categories``, ``category_scores`` and ``category_applied_input_types`` always carry all
13 categories of OpenAI's moderation API (:data:`icm.policy.taxonomy.SCHEMES`'s ``openai``),
as bool, float and a list of input types, so every client reads every field it knows.

* A category's score is the largest, over the input's images and the judged (policy,
  rule set) pairs that map it, of the record's ``category_scores['openai'][cat]``: the
  probability of the mapped products the rule set labels violate.
* It is flagged when a record flags it (``flagged_categories``: the score reached the rule
  set's review threshold, or the model refused), or, with ``--unjudged flag``, when no
  policy of the model could judge it here.
* ``category_applied_input_types[cat]`` is ``["image"]`` when a policy that maps ``cat``
  was judged by the backend on every image of the input; ``[]`` for a category no policy
  of the model maps, and for one the backend cannot judge here (the offline detector
  without evidence that can clear an image, a record with no basis, a refusal): the
  ``icm`` field's ``not_judged`` says why. Text is never judged, so ``"text"`` never appears.
* ``flagged`` is true when any category is flagged **or any judged record's verdict is review
  or block**: an uncertain image is never passed as clean, even when its categories are not
  flagged (a policy that maps none, a review verdict below the thresholds). The review
  verdicts of policies the backend cannot judge here (the offline detector's "flag only"
  terms on a clean photo) count only with ``--unjudged flag``: by default what cannot be
  judged is reported as such (``not_judged``), not as a flag on every image.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from icm.moderation.record import ModerationRecord
from icm.policy.taxonomy import SCHEMES
from icm.serve.service import Outcome, Service

OPENAI_CATEGORIES: tuple[str, ...] = tuple(SCHEMES["openai"])
VERDICT_RANK = {"allow": 0, "review": 1, "block": 2}


class ModerationResult(BaseModel):
    flagged: bool = Field(description="Any category flagged, or any judged record's verdict review or block")
    categories: dict[str, bool] = Field(description="All 13 categories of OpenAI's moderation API")
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]] = Field(
        description="['image'] where a policy mapping the category was judged on the input's images; [] otherwise"
    )
    icm: dict[str, Any] = Field(description="This server's decisions for the input (OpenAI's clients ignore it)")


def record_unjudged(r: ModerationRecord) -> str | None:
    """Why a record judged nothing of its policy's categories, or None."""
    if r.basis == "refused":
        return "the model refused to answer (every category the policy maps is flagged)"
    if r.basis in (None, "none"):
        return "the backend judged nothing of this policy on the image (basis none)"
    return None


def input_result(
    svc: Service, targets: list[tuple[str, str]], images: list[list[Outcome]], *, text_parts: int = 0,
) -> ModerationResult:
    """The result of one input: ``images[i][k]`` is image ``i``'s outcome under ``targets[k]``."""
    scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
    flagged = dict.fromkeys(OPENAI_CATEGORIES, False)
    judged: set[str] = set()
    gaps: dict[str, list[str]] = {}
    verdicts: dict[str, str] = {}
    counted: list[str] = []  # the verdicts that decide `flagged` (see the module docstring)
    decisions: list[dict[str, Any]] = []
    for k, (pname, rname) in enumerate(targets):
        mapped = list(svc.policies[pname].standard_categories.get("openai", {}))
        why = svc.unjudged.get(pname)
        worst = "allow"
        for i, outs in enumerate(images):
            r = outs[k].record
            for cat, p in r.category_scores.get("openai", {}).items():
                if cat in scores:
                    scores[cat] = max(scores[cat], float(p))
            for cat in r.flagged_categories.get("openai", []):
                if cat in flagged:
                    flagged[cat] = True
            if why is None and (bad := record_unjudged(r)) is not None:
                why = f"image {i}: {bad}" if len(images) > 1 else bad
            if r.verdict is not None and VERDICT_RANK[r.verdict] > VERDICT_RANK[worst]:
                worst = r.verdict
            decisions.append({
                "image": i, "decision_id": outs[k].decision_id, "review_url": f"/review#decision={outs[k].decision_id}",
                "record": r.model_dump(mode="json"),
            })
        verdicts[f"{pname}:{rname}"] = worst
        if why is None or svc.config.unjudged == "flag":
            counted.append(worst)
        for cat in mapped:
            if why is None:
                judged.add(cat)
            else:
                gaps.setdefault(cat, []).append(f"{pname}:{rname}: {why}")
    not_judged = {cat: "; ".join(gaps[cat]) for cat in OPENAI_CATEGORIES if cat in gaps and cat not in judged}
    if svc.config.unjudged == "flag":
        for cat in not_judged:
            flagged[cat] = True
    uncertain = any(v in ("review", "block") for v in counted)
    icm: dict[str, Any] = {
        "images": len(images),
        "verdicts": verdicts,
        "not_judged": not_judged,
        "unjudged_mode": svc.config.unjudged,
        "decisions": decisions,
    }
    if text_parts:
        icm["text_parts_ignored"] = text_parts
    return ModerationResult(
        flagged=any(flagged.values()) or uncertain,
        categories=flagged,
        category_scores={cat: min(1.0, max(0.0, p)) for cat, p in scores.items()},
        category_applied_input_types={cat: ["image"] if cat in judged else [] for cat in OPENAI_CATEGORIES},
        icm=icm,
    )
