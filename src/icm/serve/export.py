"""Reviewers' decisions as training records for continued tuning (CSFT).

Each reviewed decision (its latest review) becomes one JSON line: the image, and a
conversation in the chat format SFT trainers take (``messages`` with the image placeholder
in the first user turn, ``images`` with its path). The questions are worded exactly as the
moderation engine asks them (:mod:`icm.policy.prompts_format`), so the tuned model is
trained on the prompts it will be scored with:

1. when the attribute product is known (the reviewer named it, or confirmed the model's
   decision and so its product): the term's yes/no question, answered from the product's
   ``positive``, and one lettered question per attribute the product sets;
2. when there is an explanation (the reviewer's note, or the model's own explanation of a
   confirmed decision): the moderation explanation prompt and that text;
3. always: the rule set's verdict question and the reviewer's final verdict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icm.fileio import atomic_write
from icm.policy import Policy, load_policy
from icm.policy.prompts import explanation_prompt
from icm.policy.prompts_format import moderation_choice_prompt, option_labels, yes_no_prompt

VERDICT_PROMPT = (
    "Under the rule set '{rules}' ({audience}), should this image be allowed or blocked?\n"
    "Answer with allow or block."
)


@dataclass
class ExportSummary:
    out: str
    written: int = 0
    overrides: int = 0
    confirmations: int = 0
    skipped_no_image: int = 0
    unknown_policies: tuple[str, ...] = ()


def _user(text: str, *, image: bool) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image"}] if image else []
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def conversation(
    policy: Policy | None, rules: str, *, product: str | None, explanation: str | None, verdict: str
) -> list[tuple[str, str]]:
    """(question, answer) turns for one reviewed image."""
    turns: list[tuple[str, str]] = []
    audience = rules
    if policy is not None:
        if product is not None and product in policy.product_map:
            prod = policy.product(product)
            turns.append((yes_no_prompt(policy.term.question), "Yes" if prod.positive else "No"))
            for a in policy.attributes:
                if a.id not in prod.assignment:
                    continue
                options = [v.option_text for v in a.values]
                letter = option_labels(len(options))[a.value_ids.index(prod.assignment[a.id])]
                turns.append((moderation_choice_prompt(a.question, options), letter))
        if explanation:
            turns.append((explanation_prompt(policy), explanation.strip()))
        if rules in policy.rule_set_map:
            audience = policy.rule_set(rules).audience
    turns.append((VERDICT_PROMPT.format(rules=rules, audience=audience), verdict))
    return turns


def training_record(
    decision: dict[str, Any], review: dict[str, Any], policy: Policy | None, image: str
) -> dict[str, Any]:
    """One JSONL training record from a decision and its (latest) review."""
    record = decision.get("record") or {}
    confirmed = review["action"] == "confirm"
    product = review.get("product") or (decision.get("product") if confirmed else None)
    explanation = review.get("note") or (record.get("explanation") if confirmed else None)
    turns = conversation(
        policy, decision["rules"], product=product, explanation=explanation, verdict=review["verdict"]
    )
    messages: list[dict[str, Any]] = []
    for i, (q, a) in enumerate(turns):
        messages += [_user(q, image=i == 0), _assistant(a)]
    positive = None
    if policy is not None and product in policy.product_map:
        positive = policy.product(product).positive
    return {
        "id": f"review-{review['id']}",
        "source": "review",
        "images": [image],
        "messages": messages,
        "image_sha256": decision.get("image_sha256"),
        "policy": decision["policy"],
        "rules": decision["rules"],
        "term": policy.term.id if policy is not None else None,
        "verdict": review["verdict"],
        "product": product,
        "positive": positive,
        "explanation": explanation,
        "action": review["action"],
        "reviewer": review["reviewer"],
        "reviewed_at": review["created_at"],
        "decision_id": decision["id"],
        "decided_at": decision["created_at"],
        "model": decision.get("model"),
        "model_verdict": decision.get("verdict"),
        "model_product": decision.get("product"),
        "model_p_violation": decision.get("p_violation"),
    }


def _image_path(decision: dict[str, Any], image_dir: Path | None, image_root: Path | None) -> str | None:
    sha = decision.get("image_sha256")
    if image_dir is not None and decision.get("image_kept") and sha:
        p = image_dir / sha[:2] / sha
        if p.is_file():
            return str(p.resolve())
    if image_root is not None and decision.get("source") == "path" and decision.get("image_name"):
        root = image_root.resolve()
        p = (root / decision["image_name"]).resolve()
        if os.path.commonpath([root, p]) == str(root) and p.is_file():
            return str(p)
    return None


def export_reviews(
    db: str,
    out: str | os.PathLike[str],
    *,
    image_dir: str | os.PathLike[str] | None = None,
    image_root: str | os.PathLike[str] | None = None,
    policies: Iterable[str] = (),
    overrides_only: bool = False,
) -> ExportSummary:
    """Write one training record per reviewed decision (its latest review) to ``out``.

    ``db`` is the server's ``--db`` (file or URL); ``image_dir`` its kept images (default
    beside a SQLite file, as the server does); ``image_root`` its ``--image-root`` for
    decisions made on server-side paths; ``policies`` the YAML files of custom policies
    (built-in ones load by name). Decisions whose image cannot be found are skipped and
    counted.
    """
    from icm.serve.config import ServeConfig
    from icm.serve.store import DecisionStore

    cfg = ServeConfig(db=db, image_dir=str(image_dir) if image_dir else None)
    store = DecisionStore(cfg.db_url())
    try:
        img_dir = cfg.resolved_image_dir()
    except ValueError:
        img_dir = None
    known: dict[str, Policy] = {}
    for ref in policies:
        p = load_policy(ref)
        known[p.name] = p
    unknown: set[str] = set()

    def policy_for(name: str) -> Policy | None:
        if name not in known and name not in unknown:
            try:
                known[name] = load_policy(name)
            except Exception:  # noqa: BLE001 - a custom policy that was not given
                unknown.add(name)
        return known.get(name)

    out_path = Path(out)
    summary = ExportSummary(out=str(out_path))
    try:
        with atomic_write(out_path) as fh:
            for decision, review in store.iter_reviewed(latest_only=True):
                if overrides_only and review["action"] != "override":
                    continue
                image = _image_path(decision, img_dir, Path(image_root) if image_root else None)
                if image is None:
                    summary.skipped_no_image += 1
                    continue
                rec = training_record(decision, review, policy_for(decision["policy"]), image)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                summary.written += 1
                if review["action"] == "override":
                    summary.overrides += 1
                else:
                    summary.confirmations += 1
    finally:
        store.close()
    summary.unknown_policies = tuple(sorted(unknown))
    return summary
