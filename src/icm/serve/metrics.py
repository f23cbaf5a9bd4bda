"""The metrics ``icm serve`` publishes at ``/metrics``, with ``prometheus_client``.

One process (``icm serve``): each app has its own :class:`prometheus_client.CollectorRegistry`,
so several apps in one process (the tests, an embedding application) do not collide in the
global registry, and the standard ``process_*`` metrics come from the process collector.

Several processes (``icm serve --workers N``): the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
to a fresh directory before the workers start (:mod:`icm.serve.workers`), each worker's
counters, histograms and gauges go to files there, and a scrape, whichever worker takes it,
merges every worker's files (:class:`~prometheus_client.multiprocess.MultiProcessCollector`):
every scrape answers for the whole server. The ``process_*`` metrics become gauges with a
``pid`` label, one series per live worker (:meth:`ServerMetrics.refresh`); what the database
answers (review queue, webhook outbox) and the build info are read live by the worker
that takes the scrape. ``docs/operations.md#metrics`` lists them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
    from prometheus_client.registry import Collector
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the server's metrics need prometheus_client ({err}): pip install 'icm-assistant[serve]'") from err

if TYPE_CHECKING:  # pragma: no cover - typing only
    from icm.moderation.record import ModerationRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# the process collector's samples, as per-worker gauges in multiprocess mode
PROCESS_GAUGES = {
    "process_cpu_seconds_total": "Total user and system CPU time spent in seconds, per worker.",
    "process_resident_memory_bytes": "Resident memory size in bytes, per worker.",
    "process_virtual_memory_bytes": "Virtual memory size in bytes, per worker.",
    "process_open_fds": "Number of open file descriptors, per worker.",
    "process_start_time_seconds": "Start time of the worker since unix epoch in seconds.",
}


def multiprocess_dir() -> str | None:
    """The directory of the workers' metric files when several processes serve (else None)."""
    return os.environ.get(MULTIPROC_ENV) or None


class LiveGauge(Collector):
    """A gauge read by a function at each scrape, in this process only (no file in multiprocess mode)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.fn: Callable[[], float] | None = None
        registry.register(self)

    def set_function(self, fn: Callable[[], float]) -> None:
        self.fn = fn

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, value=self.fn() if self.fn is not None else 0.0)


class ServerMetrics:
    """The server's metrics: in a registry of their own, or in the workers' shared directory."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0) -> None:
        self.multiprocess = multiprocess_dir()
        # ``registry``: what this process reads live at a scrape; the file-backed metrics join it
        # only in one process (with several, the MultiProcessCollector reads them from the files)
        self.registry = live = CollectorRegistry(auto_describe=True)
        r = None if self.multiprocess else live
        self.requests = Counter("icm_http_requests", "HTTP requests by route and status code.", ("route", "status"), registry=r)
        self.request_seconds = Histogram(
            "icm_http_request_duration_seconds", "Time to answer a request, by route.", ("route",),
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decisions = Counter(
            "icm_decisions", "Decisions stored, by verdict, policy and rule set.", ("verdict", "policy", "rules"), registry=r
        )
        self.rejected = Counter("icm_rejected_images", "Images refused, by reason.", ("reason",), registry=r)
        self.backend_errors = Counter("icm_backend_errors", "Images the backend failed on.", registry=r)
        self.text_answers = Counter(
            "icm_text_answers",
            "Answers read from the model's answer text (no usable logprobs: one sampled answer, counted at the "
            "backend's text confidence), by query kind (term, attr).",
            ("kind",), registry=r,
        )
        self.text_decisions = Counter(
            "icm_text_decisions", "Decisions with at least one answer read from the answer text.", registry=r
        )
        self.batches = Histogram("icm_batch_size", "Images per backend call (dynamic batching).", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "icm_batch_duration_seconds", "Time to moderate and store one batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.reviews = Counter("icm_reviews", "Reviews stored, by action.", ("action",), registry=r)
        self.webhook_deliveries = Counter(
            "icm_webhook_deliveries", "Webhook delivery attempts, by outcome (delivered, failed).", ("outcome",), registry=r
        )
        self.cascade = Counter(
            "icm_cascade_images", "Images the cascade decided, by outcome: cleared by the first stage, or escalated.",
            ("outcome",), registry=r,
        )
        self.escalated = Counter(
            "icm_cascade_escalated", "Images the cascade escalated to its second stage (of icm_cascade_images_total).",
            registry=r,
        )
        # the batcher's queue is per process: summed over the live workers, set by refresh()
        self._queue_depth = queue_depth
        self.queue = Gauge("icm_queue_depth", "Requests waiting for the batch worker.", registry=r, multiprocess_mode="livesum")
        if not self.multiprocess:
            self.queue.set_function(lambda: self._queue_depth())
        # what the database says: the same from any worker, read live by the one scraped
        self.review_queue = LiveGauge("icm_review_queue_depth", "Decisions awaiting a person (the review queue).", live)
        self.webhook_pending = LiveGauge("icm_webhook_pending", "Webhook events not delivered yet (the outbox).", live)
        self.info = Info("icm_build", "Version, backend and model of this server.", registry=live)
        self.process: dict[str, Gauge] = {}
        if self.multiprocess:
            self.process = {
                name: Gauge(name, doc, registry=None, multiprocess_mode="liveall") for name, doc in PROCESS_GAUGES.items()
            }
            self.refresh()
        else:
            ProcessCollector(registry=live)

    def observe_stage(self, record: ModerationRecord) -> None:
        """Count a cascade record (one with a ``stage``) as cleared by the first stage or escalated."""
        from icm.moderation.engine import was_escalated

        escalated = was_escalated(record)
        if escalated is None:
            return
        self.cascade.labels("escalated" if escalated else "cleared").inc()
        if escalated:
            self.escalated.inc()

    def observe_text(self, record: ModerationRecord) -> None:
        """Count the answers of a record that were read from the answer text (none for most backends)."""
        keys = record.text_answers()
        for key in keys:
            self.text_answers.labels(key.split(":", 1)[0]).inc()
        if keys:
            self.text_decisions.inc()

    def set_queue_depth(self, fn: Callable[[], float]) -> None:
        self._queue_depth = fn

    def refresh(self) -> None:
        """Several processes: write this worker's queue depth and process metrics to its files
        (the server calls it every second, and at each scrape it takes)."""
        if not self.multiprocess:
            return
        self.queue.set(self._queue_depth())
        for family in ProcessCollector(registry=None).collect():
            for sample in family.samples:
                gauge = self.process.get(sample.name)
                if gauge is not None:
                    gauge.set(sample.value)

    def worker_exit(self) -> None:
        """Several processes: drop this worker's live gauges (its counters stay in the totals)."""
        if self.multiprocess:
            mark_process_dead(os.getpid(), self.multiprocess)

    def render(self) -> str:
        """The Prometheus text exposition: this app's metrics, or the whole server's with several workers."""
        if not self.multiprocess:
            return generate_latest(self.registry).decode("utf-8")
        self.refresh()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, self.multiprocess)
        return (generate_latest(merged) + generate_latest(self.registry)).decode("utf-8")
