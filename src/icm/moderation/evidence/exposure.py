"""NudeNet body-part boxes mapped onto the exposure and region attributes (pure functions).

The detector backend (:mod:`icm.moderation.backends.detector`) uses this mapping for policies
that do not declare ``exposure`` (or ``region``) in their ``evidence`` section.

From NudeNet boxes to the policy's vocabulary
---------------------------------------------
:data:`EXPOSURE_MAP` maps each NudeNet label to an exposure option and a weight:

===========================  =========  ======  ==============================================
NudeNet label                option     weight  why
===========================  =========  ======  ==============================================
ARMPITS_EXPOSED              shoulders  1.0     bare armpits imply bare shoulders
FEMALE_BREAST_EXPOSED        chest      1.0
FEMALE_BREAST_COVERED        chest      0.5     cleavage is usually boxed as *covered* breast,
                                                but so is an ordinary T-shirt: weak evidence
BELLY_EXPOSED                belly      1.0
BUTTOCKS_EXPOSED             hips       1.0     the policy's "hips" is the buttocks
BUTTOCKS_COVERED             hips       0.5     tight or scant clothing; often benign
FEMALE_GENITALIA_EXPOSED     crotch     1.0
FEMALE_GENITALIA_COVERED     crotch     0.5     underwear (the policy's "crotch"), or trousers
MALE_GENITALIA_EXPOSED       crotch     1.0
ANUS_EXPOSED                 crotch     1.0
ANUS_COVERED                 crotch     0.5
===========================  =========  ======  ==============================================

Not mapped to exposure: FACE_FEMALE, FACE_MALE, FEET_EXPOSED, FEET_COVERED,
ARMPITS_COVERED and BELLY_COVERED (covered is the normal case), and MALE_BREAST_EXPOSED
(the icm-sexy policy models a bare male torso as the ``cue`` value ``male_bare_torso``,
not as chest exposure; cues are not judged here). NudeNet has no label for backs or
legs, so ``back`` and ``legs`` get no evidence (:data:`UNOBSERVABLE_EXPOSURE`).

Evidence per option is the highest ``weight * score`` of its boxes. ``large_bare``: when
at least :data:`LARGE_BARE_MIN_PARTS` different options have a full-weight (exposed)
box, its evidence is the noisy-OR ``1 - prod(1 - score)`` of those options' scores, which
is at least as high as any single one of them, so several bare parts read as one large
bare area. ``normal`` is ``1 - max(evidence of every other option)``: no box, no exposure.

The distribution (:func:`exposure_distribution`): add :data:`EVIDENCE_FLOOR` to every
option of the vocabulary (the detector misses things, and cannot see backs or legs at
all), normalise over the whole vocabulary, keep the options the query offers (ids
outside the vocabulary get 0) and renormalise. If the options offered hold less than
:data:`MIN_KEPT_MASS` of the mass, the evidence points at an option the query does not
offer and the answer is ``None`` rather than a distorted distribution. The numbers are
an evidence-to-vocabulary mapping, not calibrated probabilities.

Region (opt-in with ``judge_region=True``; ``None`` by default): NudeNet boxes say which
parts of a body are in the frame. Upper parts are faces, armpits and breasts; middle
parts belly, buttocks, genitalia and anus; lower parts feet. With ``u``, ``m``, ``l`` the
best box score of each group: ``whole = min(u, l)`` (head-end and feet both in frame),
``upper = u * (1 - l)``, ``lower = l * (1 - u)``, ``middle = m * (1 - u) * (1 - l)``,
then the same floor and restriction as exposure; no box at all gives ``None``. It is off
by default because it could not be validated here (the paper's images were never
published) and NudeNet sees neither legs nor clothed torsos, so a whole-body shot with
the feet cropped reads as "upper".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from icm.moderation.backends.base import Box, Choice

EXPOSURE_OPTIONS: tuple[str, ...] = (
    "shoulders", "chest", "back", "belly", "legs", "hips", "crotch", "large_bare", "normal",
)
REGION_OPTIONS: tuple[str, ...] = ("upper", "middle", "lower", "whole")



COVERED_WEIGHT = 0.5
"""Weight of a *covered* part's box as exposure evidence (see the module docstring)."""

EXPOSURE_MAP: dict[str, tuple[str, float]] = {
    "ARMPITS_EXPOSED": ("shoulders", 1.0),
    "FEMALE_BREAST_EXPOSED": ("chest", 1.0),
    "FEMALE_BREAST_COVERED": ("chest", COVERED_WEIGHT),
    "BELLY_EXPOSED": ("belly", 1.0),
    "BUTTOCKS_EXPOSED": ("hips", 1.0),
    "BUTTOCKS_COVERED": ("hips", COVERED_WEIGHT),
    "FEMALE_GENITALIA_EXPOSED": ("crotch", 1.0),
    "FEMALE_GENITALIA_COVERED": ("crotch", COVERED_WEIGHT),
    "MALE_GENITALIA_EXPOSED": ("crotch", 1.0),
    "ANUS_EXPOSED": ("crotch", 1.0),
    "ANUS_COVERED": ("crotch", COVERED_WEIGHT),
}
"""NudeNet label -> (exposure option, weight); labels absent here are no exposure evidence."""

UNOBSERVABLE_EXPOSURE: tuple[str, ...] = ("back", "legs")
"""Exposure options no NudeNet label can show."""

LARGE_BARE_MIN_PARTS = 3
"""How many different exposed options make a "large bare area"."""

REGION_PARTS: dict[str, Literal["upper", "middle", "lower"]] = {
    "FACE_FEMALE": "upper", "FACE_MALE": "upper",
    "ARMPITS_EXPOSED": "upper", "ARMPITS_COVERED": "upper",
    "FEMALE_BREAST_EXPOSED": "upper", "FEMALE_BREAST_COVERED": "upper", "MALE_BREAST_EXPOSED": "upper",
    "BELLY_EXPOSED": "middle", "BELLY_COVERED": "middle",
    "BUTTOCKS_EXPOSED": "middle", "BUTTOCKS_COVERED": "middle",
    "FEMALE_GENITALIA_EXPOSED": "middle", "FEMALE_GENITALIA_COVERED": "middle",
    "MALE_GENITALIA_EXPOSED": "middle", "ANUS_EXPOSED": "middle", "ANUS_COVERED": "middle",
    "FEET_EXPOSED": "lower", "FEET_COVERED": "lower",
}
"""NudeNet label -> the part of the body it shows, for the region attribute."""

EVIDENCE_FLOOR = 0.01
"""Added to every option's evidence before normalising: nothing is certain or impossible."""

MIN_KEPT_MASS = 0.5
"""Least share of the mass the query's options must hold for an answer (else ``None``)."""


# --------------------------------------------------------------------------- mapping (pure)


def exposure_evidence(boxes: Iterable[Box]) -> dict[str, float]:
    """Evidence in [0, 1] for every exposure option, from NudeNet boxes."""
    evidence = dict.fromkeys(EXPOSURE_OPTIONS, 0.0)
    exposed: dict[str, float] = {}
    for box in boxes:
        mapped = EXPOSURE_MAP.get(box.label)
        if mapped is None:
            continue
        option, weight = mapped
        evidence[option] = max(evidence[option], weight * box.score)
        if weight == 1.0:
            exposed[option] = max(exposed.get(option, 0.0), box.score)
    if len(exposed) >= LARGE_BARE_MIN_PARTS:
        evidence["large_bare"] = 1.0 - math.prod(1.0 - s for s in exposed.values())
    evidence["normal"] = 1.0 - max(v for k, v in evidence.items() if k != "normal")
    return evidence


def region_evidence(boxes: Iterable[Box]) -> dict[str, float] | None:
    """Evidence for every region option, or ``None`` when no body part is in view."""
    best = {"upper": 0.0, "middle": 0.0, "lower": 0.0}
    seen = False
    for box in boxes:
        part = REGION_PARTS.get(box.label)
        if part is not None:
            seen = True
            best[part] = max(best[part], box.score)
    if not seen:
        return None
    u, m, low = best["upper"], best["middle"], best["lower"]
    return {
        "upper": u * (1.0 - low),
        "middle": m * (1.0 - u) * (1.0 - low),
        "lower": low * (1.0 - u),
        "whole": min(u, low),
    }


def restrict_evidence(evidence: dict[str, float], option_ids: Sequence[str]) -> tuple[list[float], float] | None:
    """The floor-smoothed distribution over ``option_ids``, and the mass it dropped."""
    if not option_ids or len(set(option_ids)) != len(option_ids):
        return None
    smoothed = {k: v + EVIDENCE_FLOOR for k, v in evidence.items()}
    total = sum(smoothed.values())
    kept = [smoothed.get(option, 0.0) / total for option in option_ids]
    mass = sum(kept)
    if mass < MIN_KEPT_MASS:
        return None
    return [p / mass for p in kept], max(0.0, 1.0 - mass)


def exposure_distribution(boxes: Iterable[Box], option_ids: Sequence[str]) -> list[float] | None:
    """P(option) for each of ``option_ids`` (aligned), or ``None`` if not judged."""
    restricted = restrict_evidence(exposure_evidence(boxes), option_ids)
    return None if restricted is None else restricted[0]


def region_distribution(boxes: Iterable[Box], option_ids: Sequence[str]) -> list[float] | None:
    """P(region) for each of ``option_ids`` (aligned), or ``None`` if not judged."""
    evidence = region_evidence(boxes)
    restricted = None if evidence is None else restrict_evidence(evidence, option_ids)
    return None if restricted is None else restricted[0]




def exposure_choice(judge: Literal["exposure", "region"], boxes: list[Box], option_ids: Sequence[str]) -> Choice | None:
    """The exposure (or region) answer from NudeNet boxes, with what it saw in ``raw``; ``None``: not judged."""
    evidence = exposure_evidence(boxes) if judge == "exposure" else region_evidence(boxes)
    restricted = None if evidence is None else restrict_evidence(evidence, option_ids)
    if evidence is None or restricted is None:
        return None
    probs, dropped = restricted
    raw: dict[str, Any] = {"boxes": boxes, "evidence": evidence, "dropped_mass": dropped}
    if judge == "exposure":
        raw["unobservable"] = [o for o in UNOBSERVABLE_EXPOSURE if o in option_ids]
    return Choice(probs=probs, source="nudenet", raw=raw)
