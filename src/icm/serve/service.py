"""What the routes share: the policies, the moderators, the store, and the batch worker's work.

``Service.process`` runs in the :class:`~icm.serve.batching.DynamicBatcher`'s worker thread:
it moderates a batch, keeps the images, and commits the decisions before any request of
the batch is answered.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from icm.moderation.engine import Moderator
from icm.moderation.images import LoadedImage
from icm.moderation.record import ModerationRecord
from icm.moderation.redecide import redecidable, redecide
from icm.policy import Policy, load_policy
from icm.serve.auth import Authenticator
from icm.serve.batching import DynamicBatcher
from icm.serve.config import ServeConfig
from icm.serve.errors import APIError
from icm.serve.limits import PixelBudget, RateLimiter
from icm.serve.metrics import ServerMetrics
from icm.serve.openai_models import ServedBundle, load_served_bundles, unjudged_policies
from icm.serve.store import DecisionMeta, DecisionStore, ImageStore

log = logging.getLogger("icm.serve")

_worker = threading.local()


@dataclass(eq=False)
class JobGroup:
    """The jobs of one request: their decisions are committed together, or none is.

    The batch worker fills ``done`` as the group's jobs are moderated (they may land in several
    batches); the batch that completes it commits all its decisions in one transaction, and
    sets ``ids`` (in job order) before any of its requests is answered. A job the backend
    failed on, or a batch that failed, marks the group ``failed``: nothing of it is stored,
    and a job never moderated (refused by a full queue, or its request gone) leaves it incomplete.
    """

    size: int = 1
    done: dict[int, tuple[Job, ModerationRecord]] = field(default_factory=dict)
    failed: bool = False
    ids: list[int] | None = None


@dataclass
class Job:
    """One image waiting for the batch worker, to be judged under one policy and rule set;
    ``group`` and ``index``: the request it belongs to (default: a request of its own)."""

    image: LoadedImage
    data: bytes
    policy: str
    rules: str
    meta: DecisionMeta
    load_ms: float
    group: JobGroup = field(default_factory=JobGroup)
    index: int = 0


@dataclass
class Outcome:
    record: ModerationRecord
    decision_id: int | None


@dataclass
class Service:
    """Everything the routes share; ``process`` runs in the batch worker thread."""

    config: ServeConfig
    policies: dict[str, Policy]
    moderators: dict[tuple[str, str], Moderator]
    store: DecisionStore
    images: ImageStore | None
    auth: Authenticator
    metrics: ServerMetrics
    owned: list[Any] = field(default_factory=list)  # backends / store to close on shutdown
    batcher: DynamicBatcher[Job, Outcome] | None = None
    pixels: PixelBudget | None = None  # made in the server's event loop (lifespan)
    limiter: RateLimiter | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # webhooks, fetchers: set by create_app
    bundles: dict[str, ServedBundle] = field(default_factory=dict)  # /v1/moderations' bundles (icm.serve.openai_models)
    unjudged: dict[str, str] = field(default_factory=dict)  # policy -> why the backend cannot judge it here
    ready: bool = False  # the backend has judged the warm-up image (/readyz)
    pixel_digests: bool = False  # a backend keys its work by a hash of the pixels (Backend.pixel_digests): hash on decode

    def prepare(self, im: LoadedImage) -> None:
        """Work on a decoded image that can run in the decoding thread, not the batch worker's:
        the detector's pixel hash of each view it will judge (memoised on the image object)."""
        if self.pixel_digests:
            from icm.moderation.evidence.runtime import image_digest

            for view in im.judged_views():
                image_digest(view.image)

    @property
    def default_moderator(self) -> Moderator:
        return next(iter(self.moderators.values()))

    def resolve(self, policy: str | None, rules: str | None) -> tuple[str, str]:
        pname = policy or self.config_policy_name
        if pname not in self.policies:
            raise APIError(422, "unknown_policy", f"unknown policy {pname!r}: this server has {', '.join(self.policies)}")
        p = self.policies[pname]
        if rules is None:
            rname = self.default_rules if pname == self.config_policy_name else p.rule_set().name
        else:
            rname = rules
        if (pname, rname) not in self.moderators:
            known = ", ".join(r.name for r in p.rule_sets)
            raise APIError(422, "unknown_rules", f"policy {pname!r} has no rule set {rname!r} (known: {known})")
        return pname, rname

    @property
    def config_policy_name(self) -> str:
        return self.default_moderator.policy.name

    @property
    def default_rules(self) -> str:
        return self.default_moderator.rule_set.name

    def moderate(self, jobs: list[Job]) -> list[ModerationRecord]:
        """One record per job; the model is asked once per policy, the rule sets decide after.

        The jobs of a policy are moderated together under the rule set most of them name;
        the others' records are re-decided from the same evidence (:func:`redecide`). Only
        records whose evidence depends on the rule set (a cascade's, a multi-view image's)
        are moderated again under their own rule set.
        """
        records: list[ModerationRecord | None] = [None] * len(jobs)
        by_policy: dict[str, list[int]] = {}
        for i, j in enumerate(jobs):
            by_policy.setdefault(j.policy, []).append(i)
        for pname, idx in by_policy.items():
            counts: dict[str, int] = {}
            for i in idx:
                counts[jobs[i].rules] = counts.get(jobs[i].rules, 0) + 1
            first = max(counts, key=lambda r: counts[r])
            lead = self.moderators[(pname, first)]
            # the same image named under several rule sets (or policies of one request) is asked about once
            unique: dict[Any, int] = {}
            for i in idx:
                unique.setdefault(jobs[i].image.sha256 or id(jobs[i].image), i)
            firsts = list(unique.values())
            done = dict(zip(firsts, lead.moderate_loaded([jobs[i].image for i in firsts], [jobs[i].load_ms for i in firsts]), strict=True))
            again: dict[str, list[int]] = {}
            for i in idx:
                base = done[unique[jobs[i].image.sha256 or id(jobs[i].image)]]
                if jobs[i].rules == first:
                    records[i] = base if i in done else base.model_copy(deep=True)
                elif redecidable(base):
                    records[i] = redecide(base, lead.policy, jobs[i].rules)
                else:
                    again.setdefault(jobs[i].rules, []).append(i)
            for rname, rest in again.items():
                redone = self.moderators[(pname, rname)].moderate_loaded(
                    [jobs[i].image for i in rest], [jobs[i].load_ms for i in rest]
                )
                for i, r in zip(rest, redone, strict=True):
                    records[i] = r
        assert all(r is not None for r in records)
        return records  # type: ignore[return-value]

    def process(self, jobs: list[Job]) -> list[Outcome]:
        """Moderate a batch; commit the decisions (and their webhook events) of each request
        whose jobs are now all judged, all of a request in one transaction (:class:`JobGroup`)."""
        if self.config.torch_threads and not getattr(_worker, "threads_set", False):
            import torch

            torch.set_num_threads(self.config.torch_threads)  # in the worker thread itself
            _worker.threads_set = True
        try:
            records = self.moderate(jobs)
            ready: list[JobGroup] = []
            for j, r in zip(jobs, records, strict=True):
                g = j.group
                g.done[j.index] = (j, r)
                g.failed = g.failed or not r.ok
                if len(g.done) == g.size and not g.failed and all(g is not x for x in ready):
                    ready.append(g)
            self._commit(ready)
        except BaseException:  # nothing of these requests may be committed by a later batch
            for j in jobs:
                j.group.failed = True
            raise
        out = []
        for j, r in zip(jobs, records, strict=True):
            if r.ok:
                self.metrics.observe_stage(r)
            else:
                self.metrics.backend_errors.inc()
            ids = j.group.ids
            out.append(Outcome(record=r, decision_id=ids[j.index] if ids is not None else None))
        return out

    def _commit(self, groups: list[JobGroup]) -> None:
        """Keep the images and commit the decisions of complete requests, in one transaction."""
        if not groups:
            return
        pairs = [g.done[i] for g in groups for i in range(g.size)]
        for j, r in pairs:
            j.meta.queue = queue_reason(r.verdict, self.config.audit_rate)
            if self.images is not None and r.sha256:
                self.images.put(r.sha256, j.data)  # before the commit: a stored decision's image exists
                j.meta.image_kept = True
        ids = self.store.add_decisions([r for _, r in pairs], [j.meta for j, _ in pairs])
        at = 0
        for g in groups:
            g.ids, at = ids[at : at + g.size], at + g.size
        for j, r in pairs:
            self.metrics.decisions.labels(r.verdict or "none", j.policy, j.rules).inc()
            self.metrics.observe_text(r)
        if any(r.verdict == "block" for _, r in pairs):
            self.extras.get("wake_webhooks", lambda: None)()  # their events are in the outbox now

    def warm_up(self) -> bool:
        """Judge a tiny grey image with each backend (loads the models, runs one-off exports such
        as the detector's ONNX one); True when every backend judged it. Nothing is stored."""
        import io

        from PIL import Image

        from icm.moderation.images import load_image

        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, format="PNG")
        im = load_image(buf.getvalue(), name="warm-up")
        lead = self.default_moderator
        records = lead.moderate_loaded([im], [0.0])
        if lead.escalate_to is not None:  # a cascade asks its MLLM about uncertain images only: ask it once now
            records += Moderator(lead.escalate_to, policy=lead.policy, rules=lead.rule_set.name).moderate_loaded([im], [0.0])
        failed = [r.error or "no decision" for r in records if not r.ok]
        if failed:
            log.warning("warm-up: the backend failed on the warm-up image: %s", "; ".join(failed))
        return not failed

    def close(self) -> None:
        for thing in self.owned:
            try:
                thing.close()
            except Exception:  # best-effort shutdown: one resource failing to close must not keep the others open
                log.debug("closing %r failed", thing, exc_info=True)


def queue_reason(verdict: str | None, audit_rate: float, rng: random.Random | None = None) -> str | None:
    """Why a decision awaits a person: ``review`` (the model's verdict), ``audit`` (allow or
    block, sampled at ``audit_rate`` so people check the model's confident verdicts too), or None."""
    if verdict == "review":
        return "review"
    if audit_rate > 0 and verdict in ("allow", "block") and (rng or _rng).random() < audit_rate:
        return "audit"
    return None


_rng = random.Random()


def build_service(config: ServeConfig, *, moderator: Moderator | None = None, store: DecisionStore | None = None) -> Service:
    """Load policies and the backend, open the store; raises on bad settings."""
    from icm.run.config import ModerateConfig
    from icm.run.local import build_moderator

    owned: list[Any] = []
    spec = config.backend_spec()
    if config.torch_threads and "hf" in (spec.backend, spec.flat().get("escalate_backend")):
        import torch

        torch.set_num_threads(config.torch_threads)
    if moderator is None:
        moderator = build_moderator(
            ModerateConfig(policy=config.policy, rules=config.rules, explain=config.explain, backend=spec, batch_size=spec.batch_size)
        )
        owned.append(moderator.backend)
        if moderator.escalate_to is not None:
            owned.append(moderator.escalate_to)
    policies: dict[str, Policy] = {moderator.policy.name: moderator.policy}
    for ref in config.policies:
        p = load_policy(ref)
        policies.setdefault(p.name, p)
    bundles = load_served_bundles(config)
    for served in bundles.values():
        for p in served.members:
            policies.setdefault(p.name, p)
    moderators: dict[tuple[str, str], Moderator] = {(moderator.policy.name, moderator.rule_set.name): moderator}
    for p in policies.values():
        for rs in p.rule_sets:
            moderators.setdefault(
                (p.name, rs.name),
                Moderator(
                    moderator.backend, policy=p, rules=rs.name, explain=moderator.explain,
                    escalate_to=moderator.escalate_to, max_new_tokens=moderator.max_new_tokens,
                ),
            )
    if store is None:
        store = DecisionStore(config.db_url())
        owned.append(store)
    image_dir = config.resolved_image_dir()
    svc = Service(
        config=config,
        policies=policies,
        moderators=moderators,
        store=store,
        images=ImageStore(image_dir) if image_dir is not None else None,
        auth=Authenticator(config.all_api_keys(), allow_unauthenticated=config.allow_unauthenticated),
        metrics=ServerMetrics(),
        owned=owned,
        bundles=bundles,
    )
    svc.unjudged = unjudged_policies(svc)
    svc.pixel_digests = any(b is not None and b.pixel_digests for b in (moderator.backend, moderator.escalate_to))
    return svc
