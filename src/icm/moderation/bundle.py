"""Moderating with a bundle: every member policy of a bundle on each image.

A :class:`BundleModerator` holds one :class:`~icm.moderation.engine.Moderator` per member
(policy, rule set) of a bundle (:func:`icm.policy.bundle.bundle_members`) and returns, per
image, one ordinary record per member. Where the backend can take several policies'
questions in one call (``Backend.merges_policies``: the hf backend scores them all from
each image's shared prefix cache, the openai backend sends them all concurrently) it asks
once for every member, about every view of every image of the batch, and each member
decides from its share of the answers. A failing merged call falls back to asking member
by member, so each member isolates its own errors as it does alone. The cascade's second
stage asks per member.

:func:`overview` merges one image's member records into what a platform reads first: the
worst verdict and the flagged categories of every standard scheme.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from icm.moderation.backends.base import Answer, Backend, BackendConfigError
from icm.moderation.corroborate import SEVERITY
from icm.moderation.engine import Moderator, Prefetched
from icm.moderation.files import moderate_files, moderate_in_batches
from icm.moderation.images import DEFAULT_MAX_FRAMES, LoadedImage
from icm.moderation.record import ModerationRecord, VerdictName
from icm.moderation.video import DEFAULT_FPS
from icm.policy.bundle import Bundle, bundle_members, load_bundle
from icm.policy.taxonomy import SCHEMES, merge_scores

log = logging.getLogger(__name__)

def parse_bundle_ref(ref: str | Path, rules: str | None = None) -> tuple[Bundle, str | None] | None:
    """``BUNDLE[:RULES]`` (a built-in name or a bundle YAML path) as (bundle, rules); None when not a bundle.

    An explicit ``rules`` wins over the ``:RULES`` suffix.
    """
    bundle = _load(ref)
    if bundle is not None:
        return bundle, rules
    name, sep, suffix = str(ref).rpartition(":")
    if not sep or not name or not suffix or "/" in suffix or "\\" in suffix:
        return None
    bundle = _load(name)
    return (bundle, rules or suffix) if bundle is not None else None


def _load(ref: str | Path) -> Bundle | None:
    try:
        return load_bundle(ref)
    except (OSError, yaml.YAMLError):  # not a readable bundle: the policy loader says what is wrong with the file
        return None


class BundleModerator:
    """Runs every member policy of a bundle over images with one backend (and an optional second stage)."""

    def __init__(
        self,
        backend: Backend,
        *,
        bundle: Bundle | str | Path,
        rules: str | None = None,
        explain: bool = False,
        escalate_to: Backend | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        if not isinstance(bundle, Bundle):
            parsed = parse_bundle_ref(bundle, rules)
            if parsed is None:
                raise KeyError(f"unknown bundle {str(bundle)!r}: neither a built-in bundle nor a bundle YAML file")
            bundle, rules = parsed
        self.bundle = bundle
        self.backend = backend
        self.escalate_to = escalate_to
        self.members = [
            Moderator(backend, policy=policy, rules=rs, explain=explain, escalate_to=escalate_to, max_new_tokens=max_new_tokens)
            for policy, rs in bundle_members(bundle, rules)
        ]
        self.rules = rules or bundle.default_rules

    @property
    def backend_name(self) -> str:
        return self.members[0].backend_name

    @property
    def model_id(self) -> str:
        """What ran over all members: the union of their first stages' ids (the detector judges each policy
        with its own sources, ``rapidocr``, ``open_nsfw+nudenet-3.4.2``...), parts in member order, first seen
        first (``none``, a member nothing judges, only when it is all), and the second stage's model."""
        parts = dict.fromkeys(p for m in self.members for p in self.backend.model_id_for(m.policy).split("+"))
        if len(parts) > 1:
            parts.pop("none", None)
        first = "+".join(parts)
        return f"{first} -> {self.escalate_to.model_id}" if self.escalate_to is not None else first

    @property
    def merges(self) -> bool:
        """Whether the first stage asks once for all members."""
        return self.backend.merges_policies and len(self.members) > 1

    def error_records(self, path: str, error: str, im: LoadedImage | None = None) -> list[ModerationRecord]:
        return [m.error_record(path, error, im) for m in self.members]

    def _prefetch(self, images: Sequence[LoadedImage]) -> list[Prefetched] | None:
        """Every member's first-stage answers from one call; None when it cannot or did not work."""
        if not self.merges:
            return None
        pils = list({id(v.image): v.image for im in images for v in im.judged_views()}.values())
        queries = [replace(q, key=f"{i}|{q.key}") for i, m in enumerate(self.members) for q in m.queries]
        t0 = time.perf_counter()
        try:
            answers = self.backend.ask(pils, queries)
            if len(answers) != len(pils):
                raise RuntimeError(f"backend {self.backend.name!r} returned {len(answers)} answers for {len(pils)} images")
        except BackendConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - each member asks alone and isolates its errors
            log.warning("the bundle's merged ask of %d images failed (%s); asking policy by policy", len(pils), exc)
            return None
        share = (time.perf_counter() - t0) * 1000 / len(pils) / len(self.members)
        out = []
        for i, m in enumerate(self.members):
            mine: dict[int, dict[str, Answer]] = {
                id(p): {q.key: a.get(f"{i}|{q.key}") for q in m.queries} for p, a in zip(pils, answers, strict=True)
            }
            out.append(Prefetched(mine, share))
        return out

    def moderate_loaded(
        self, images: Sequence[LoadedImage], load_ms: Sequence[float] | None = None
    ) -> list[list[ModerationRecord]]:
        """Per image, one record per member (in member order)."""
        if not images:
            return []
        pre = self._prefetch(images)
        per_member = [
            m.moderate_loaded(images, load_ms, prefetched=pre[i] if pre is not None else None)
            for i, m in enumerate(self.members)
        ]
        return [[records[j] for records in per_member] for j in range(len(images))]

    def moderate_paths(
        self,
        paths: Sequence[str],
        *,
        max_pixels: int | None = None,
        max_frames: int | None = None,
        fps: float | None = None,
    ) -> list[list[ModerationRecord]]:
        """Load (once) and moderate one batch of files; an unreadable file is an error record per member."""
        return moderate_files(paths, self.moderate_loaded, self.error_records,
                              max_pixels=max_pixels, max_frames=max_frames, fps=fps)

# --------------------------------------------------------------------------- overview


@dataclass
class BundleOverview:
    """One image under every member of a bundle.

    ``verdict`` is the worst member verdict, or None when a member has no verdict (an
    error: no overall verdict is made on part of the policies). ``category_scores`` merge
    the members' by the largest score per category; ``flagged_categories`` are the union
    of the members', in each scheme's order.
    """

    path: str
    verdict: VerdictName | None
    category_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    flagged_categories: dict[str, list[str]] = field(default_factory=dict)
    verdicts: dict[str, VerdictName | None] = field(default_factory=dict)
    """Member policy -> its verdict (None for an error)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Member policy -> its error."""

    @property
    def ok(self) -> bool:
        return not self.errors


def overview(records: Sequence[ModerationRecord]) -> BundleOverview:
    """Merge one image's member records (as :meth:`BundleModerator.moderate_loaded` returns them)."""
    if not records:
        raise ValueError("no records to merge")
    verdicts = {r.policy: (r.verdict if r.ok else None) for r in records}
    errors = {r.policy: r.error or "" for r in records if not r.ok}
    judged = [r.verdict for r in records if r.ok and r.verdict is not None]
    worst = max(judged, key=lambda v: SEVERITY.get(v or "", -1)) if judged and not errors else None
    names = [n for n in SCHEMES if any(n in r.category_scores or n in r.flagged_categories for r in records)]
    scores = {n: merge_scores(r.category_scores.get(n, {}) for r in records) for n in names}
    flagged = {
        n: [c for c in SCHEMES[n] if any(c in r.flagged_categories.get(n, []) for r in records)] for n in names
    }
    return BundleOverview(records[0].path, worst, scores, flagged, verdicts, errors)


def overviews(records: Iterable[ModerationRecord]) -> list[BundleOverview]:
    """One overview per image path, in the order the paths first appear."""
    by_path: dict[str, list[ModerationRecord]] = {}
    for r in records:
        by_path.setdefault(r.path, []).append(r)
    return [overview(rs) for rs in by_path.values()]


def moderate_bundle(
    images: Iterable[str] | str,
    *,
    bundle: Bundle | str | Path = "icm-standard",
    rules: str | None = None,
    backend: Backend | str = "detector",
    explain: bool = False,
    batch_size: int = 8,
    max_frames: int = DEFAULT_MAX_FRAMES,
    fps: float = DEFAULT_FPS,
    **backend_options: object,
) -> list[ModerationRecord]:
    """Moderate files with every policy of a bundle: per image, one record per member policy (member order).

    >>> records = moderate_bundle(["photo.jpg"], bundle="icm-standard", rules="teen")  # doctest: +SKIP
    >>> overviews(records)[0].flagged_categories["openai"]  # doctest: +SKIP
    """
    def start(be: Backend) -> Callable[[list[str]], list[ModerationRecord]]:
        mod = BundleModerator(be, bundle=bundle, rules=rules, explain=explain)
        return lambda batch: [r for per_image in mod.moderate_paths(batch, max_frames=max_frames, fps=fps) for r in per_image]

    return moderate_in_batches(images, backend, backend_options, batch_size, start)
