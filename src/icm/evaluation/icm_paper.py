"""The published scripts' figure (``protocol="paper"``), and how it differs from counting each image once.

* **ICM-Val script** (category names): every category *keyword* is matched as a
  substring of every image name, and each match counts once; a name that contains two
  keywords (``wearing_stockings_...`` contains ``stockings``) is counted twice, with each
  keyword's truth. It flags ``score > t`` (strictly).
* **ICM-Test script** (``sexy_*`` / ``not-sexy_*`` names): an image is negative when its
  name contains ``not-<term>``, positive otherwise, and flagged when ``score >= t``. Each
  image is counted once, so this one agrees with the per-image protocol.
"""

from __future__ import annotations

from collections import Counter

from icm.evaluation.confusion import Confusion
from icm.evaluation.icm_models import PaperProtocol, Scored
from icm.evaluation.labels import LabelResolver, Truth, image_key
from icm.evaluation.results import ResultItem
from icm.evaluation.stats import DEFAULT_CONFIDENCE

Scored3 = list[tuple[ResultItem, Truth | None, float]]
"""Each judged image with its truth (None: no label) and its score."""


def paper_protocol(
    scored: Scored3, resolver: LabelResolver, threshold: float, per_image: Scored, confidence: float = DEFAULT_CONFIDENCE,
) -> PaperProtocol | None:
    """The published script's figure for these results (see the module docstring); None where no name carries a truth."""
    labelled = [tr for _, tr, _ in scored if tr is not None and tr.from_name]
    if not labelled:
        return None  # the scripts read the truth from file names only
    if all(tr.source == "term-name" for tr in labelled):
        return icm_test_script(scored, resolver.policy.term.id, threshold, per_image, confidence)
    keywords = sorted({tr.category for tr in labelled if tr.source in ("category", "product") and tr.category})
    truths: dict[str, bool] = {}
    for k in keywords:
        t = resolver._category_truth(k)
        if t is not None:
            truths[k] = t.positive
    return icm_val_script(scored, truths, threshold, per_image, confidence)


def icm_test_script(scored: Scored3, term: str, threshold: float, per_image: Scored, confidence: float = DEFAULT_CONFIDENCE) -> PaperProtocol:
    """The ICM-Test script: negative when the name contains ``not-<term>``, flagged when ``score >= threshold``."""
    c = Confusion()
    neg = f"not-{term}"
    for it, _, s in scored:
        c.add(neg not in image_key(it.id).lower(), s >= threshold)
    return PaperProtocol(
        script="icm-test",
        description=f"ICM-Test script: negative when the name contains '{neg}', positive otherwise; flagged when score >= {threshold:g}",
        matches=c.total, images=len(scored), confusion=c, metrics=c.metrics(), intervals=c.intervals(confidence),
        difference="none: each image is counted once, as in the per-image protocol" if c == per_image.confusion else
        "the script takes every name without 'not-' as positive, including names the per-image protocol leaves unlabelled",
    )


def icm_val_script(
    scored: Scored3, truths: dict[str, bool], threshold: float, per_image: Scored, confidence: float = DEFAULT_CONFIDENCE,
) -> PaperProtocol:
    """The ICM-Val script: each category keyword of ``truths`` matched in each name counts once; flagged when ``score > threshold``."""
    c = Confusion()
    hits: dict[str, list[str]] = {}
    for it, _, s in scored:
        name = image_key(it.id)
        matched = [k for k in truths if k in name]
        hits[it.id] = matched
        for k in matched:
            c.add(truths[k], s > threshold)
    own = {it.id: (tr.category if tr else None) for it, tr, _ in scored}
    double = [i for i, m in hits.items() if len(m) > 1]
    overlap: Counter[tuple[str, str | None]] = Counter()
    for i in double:
        for k in hits[i]:
            if k != own[i]:
                overlap[(k, own[i])] += 1
    overlaps = [f"'{k}' also matches {n} image(s) of '{cat}'" for (k, cat), n in sorted(overlap.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))]
    unmatched = sum(1 for m in hits.values() if not m)
    pa, ia = c.value("accuracy"), per_image.metrics["accuracy"]
    diff_parts = []
    if double:
        diff_parts.append(f"{len(double)} image(s) matched by two or more keywords are counted once per keyword ({'; '.join(overlaps)})")
    if unmatched:
        diff_parts.append(f"{unmatched} image(s) match no keyword and are not counted")
    diff_parts.append(f"the script flags score > {threshold:g}, the per-image protocol score >= {threshold:g}")
    summary = (
        f"published script {pa:.5f} over {c.total} matches for {len(scored)} images; "
        f"each image once by its own category {ia:.5f} ({per_image.confusion.tp + per_image.confusion.tn}/{per_image.n})"
        if pa is not None and ia is not None else "no figure"
    )
    return PaperProtocol(
        script="icm-val",
        description=f"ICM-Val script: {len(truths)} category keywords matched as substrings of the image names, "
        f"one count per match; flagged when score > {threshold:g}",
        keywords=list(truths), matches=c.total, images=len(scored), double_counted=len(double), unmatched=unmatched,
        overlaps=overlaps, confusion=c, metrics=c.metrics(), intervals=c.intervals(confidence),
        difference=summary + ". " + "; ".join(diff_parts) + ".",
    )
