"""The held-out evaluation at the end of ``icm train``: the saved artefact, moderating.

The held-out images of ours (one per image, with the product it shows) are moderated by
the hf backend loaded *from what the run saved* (base model + adapter, or the full
model), exactly as ``icm moderate --backend hf`` would; the records go to
``output_dir/eval/moderation.jsonl`` with a labels file beside them, so
``icm eval icm output_dir/eval/moderation.jsonl --labels output_dir/eval/labels.csv``
gives the same figures again. Reported: the evaluation issue's ICM metrics
(:func:`icm.evaluation.evaluate_icm`: accuracy, precision, recall, F1, AUC under the rule
set) and, since products are known, the attribute-product accuracy (most likely product
= true product) and each attribute's accuracy.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from icm.moderation.record import ModerationRecord
from icm.policy import Policy, load_policy

__all__ = ["HeldOut", "evaluate_held_out", "product_accuracy"]


@dataclass
class HeldOut:
    images: int
    rules: str
    policy: str
    icm_accuracy: float | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    product_accuracy: float | None = None
    attribute_accuracy: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    not_judged: int = 0
    note: str | None = None
    records: str = ""
    labels: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def product_accuracy(
    policy: Policy, records: Sequence[ModerationRecord], truth: dict[str, str]
) -> tuple[float | None, dict[str, float]]:
    """Share of images whose most likely product is the true one, and per attribute the
    share whose most likely value is the true value (over images with a known product)."""
    hits, n = 0, 0
    attr_hits: dict[str, int] = {a.id: 0 for a in policy.attributes}
    attr_n: dict[str, int] = {a.id: 0 for a in policy.attributes}
    for r in records:
        pid = truth.get(Path(r.path).name)
        if pid is None or not r.ok:
            continue
        n += 1
        hits += int(r.product == pid)
        for attr, value in policy.product(pid).assignment.items():
            dist = r.attributes.get(attr)
            if dist:
                attr_n[attr] += 1
                attr_hits[attr] += int(max(dist, key=dist.__getitem__) == value)
    per_attr = {a: attr_hits[a] / attr_n[a] for a in attr_n if attr_n[a]}
    return (hits / n if n else None), per_attr


def evaluate_held_out(config: Any, artefact: str, held: Sequence[Any], *, policy: Policy | None = None) -> HeldOut:
    """Moderate the held-out images with the saved artefact and score them."""
    import time

    from icm.evaluation import LabelResolver, evaluate_icm, read_labels_file, read_results
    from icm.moderation.backends.hf import HFBackend
    from icm.moderation.engine import Moderator

    t0 = time.perf_counter()
    truth: dict[str, str] = {}
    paths: list[str] = []
    pol = policy
    for ex in held:
        if not ex.images or not isinstance(ex.images[0], str) or ex.product is None:
            continue
        if pol is None and ex.policy:
            pol = load_policy(ex.policy)
        name = Path(ex.images[0]).name
        if name in truth:
            continue
        truth[name] = ex.product
        paths.append(ex.images[0])
    paths.sort()  # records come in the order generation finished them
    if config.eval_max_images is not None:
        paths = paths[: config.eval_max_images]
        truth = {Path(p).name: truth[Path(p).name] for p in paths}
    if pol is None or not paths:
        return HeldOut(images=0, rules="-", policy="-", icm_accuracy=None)
    out = Path(config.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    labels_path = out / "labels.csv"
    with open(labels_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "product"])
        w.writerows(sorted(truth.items()))
    if config.method == "lora":
        backend = HFBackend(model=config.model, adapter=artefact, batch_size=config.eval_batch_size,
                            min_label_mass=config.eval_min_label_mass)
    else:
        backend = HFBackend(model=artefact, batch_size=config.eval_batch_size, min_label_mass=config.eval_min_label_mass)
    records: list[ModerationRecord] = []
    try:
        mod = Moderator(backend, policy=pol, rules=config.eval_rules)
        for i in range(0, len(paths), config.eval_batch_size):
            records += mod.moderate_paths(paths[i : i + config.eval_batch_size])
        rules = mod.rule_set.name
    finally:
        backend.close()
    rec_path = out / "moderation.jsonl"
    with open(rec_path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(r.model_dump_json() + "\n")
    prod_acc, attr_acc = product_accuracy(pol, records, truth)
    errors = sum(1 for r in records if not r.ok)
    not_judged = sum(1 for r in records if r.ok and (r.p_violation is None or r.basis in ("none", "refused", "conflict")))
    if errors + not_judged == len(records):
        # A short run can leave a model that does not answer with the labels yet: its
        # answers are not judged (never read as answers), so there is no accuracy to give.
        # The run itself succeeded; say so instead of failing it.
        return HeldOut(
            images=len(records), rules=rules, policy=pol.name, icm_accuracy=None,
            metrics={"coverage": 0.0}, product_accuracy=prod_acc, attribute_accuracy=attr_acc,
            errors=errors, not_judged=not_judged, records=str(rec_path), labels=str(labels_path),
            note=f"no held-out image was judged ({errors} failed, {not_judged} not judged): the model does not "
                 "answer the policy's questions with its labels yet (train longer, or see records for the answers)",
            seconds=round(time.perf_counter() - t0, 3),
        )
    resolver = LabelResolver(pol, rules, labels=read_labels_file(labels_path))
    report = evaluate_icm(read_results(rec_path, term=pol.term.id), resolver, name="held-out")
    return HeldOut(
        images=len(records), rules=rules, policy=pol.name, icm_accuracy=report.metrics.get("accuracy"),
        metrics=dict(report.metrics), product_accuracy=prod_acc, attribute_accuracy=attr_acc,
        errors=errors, not_judged=not_judged, records=str(rec_path), labels=str(labels_path),
        seconds=round(time.perf_counter() - t0, 3),
    )
