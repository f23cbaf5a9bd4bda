"""The metrics ``icm serve`` publishes at ``/metrics``, with ``prometheus_client``.

Each app has its own :class:`prometheus_client.CollectorRegistry`, so several apps in one
process (the tests, an embedding application) do not collide in the global registry. The
metric names are those earlier releases published (scrape configs and dashboards keep working).
"""

from __future__ import annotations

from collections.abc import Callable

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the server's metrics need prometheus_client ({err}): pip install 'icm-assistant[serve]'") from err

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's metrics in a registry of their own."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("icm_http_requests", "HTTP requests by route and status code.", ("route", "status"), registry=r)
        self.request_seconds = Histogram(
            "icm_http_request_duration_seconds", "Time to answer a request, by route.", ("route",),
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decisions = Counter("icm_decisions", "Decisions stored, by verdict.", ("verdict",), registry=r)
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
        self.queue = Gauge("icm_queue_depth", "Requests waiting for the batch worker.", registry=r)
        self.queue.set_function(queue_depth)
        self.review_queue = Gauge("icm_review_queue_depth", "Decisions awaiting a person (the review queue).", registry=r)
        self.webhook_deliveries = Counter(
            "icm_webhook_deliveries", "Webhook delivery attempts, by outcome (delivered, failed).", ("outcome",), registry=r
        )
        self.webhook_pending = Gauge("icm_webhook_pending", "Webhook events not delivered yet (the outbox).", registry=r)
        self.info = Info("icm_build", "Version, backend and model of this server.", registry=r)
        self.cascade = Counter(
            "icm_cascade_images", "Images the cascade decided, by outcome: cleared by the first stage, or escalated.",
            ("outcome",), registry=r,
        )
        self.escalation_rate = Gauge(
            "icm_cascade_escalation_rate", "Share of the cascade's images escalated to the second stage (0 before any).", registry=r
        )
        self.escalation_rate.set_function(self._escalation_rate)
        self._cascade_counts = {"cleared": 0, "escalated": 0}

    def observe_stage(self, record: object) -> None:
        """Count a cascade record (one with a ``stage``) as cleared by the first stage or escalated."""
        from icm.moderation.engine import was_escalated

        escalated = was_escalated(record)  # type: ignore[arg-type]
        if escalated is None:
            return
        outcome = "escalated" if escalated else "cleared"
        self._cascade_counts[outcome] += 1
        self.cascade.labels(outcome).inc()

    def observe_text(self, record: object) -> None:
        """Count the answers of a record that were read from the answer text (none for most backends)."""
        keys = record.text_answers()  # type: ignore[attr-defined]
        for key in keys:
            self.text_answers.labels(key.split(":", 1)[0]).inc()
        if keys:
            self.text_decisions.inc()

    def _escalation_rate(self) -> float:
        total = sum(self._cascade_counts.values())
        return self._cascade_counts["escalated"] / total if total else 0.0

    def set_queue_depth(self, fn: Callable[[], float]) -> None:
        self.queue.set_function(fn)

    def render(self) -> str:
        """The Prometheus text exposition of this app's metrics."""
        return generate_latest(self.registry).decode("utf-8")
