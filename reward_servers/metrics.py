"""Prometheus metrics of one reward server, in their own registry (several servers may share a process).

Exported when the server is given a metrics port: `spie serve ... --metrics-port 9100`, then
`curl 127.0.0.1:9100/metrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The counters, gauges and histograms a reward server updates.

    Attributes:
        batch_size: items per scored batch.
        queue_depth: items waiting in the batcher queue.
        latency: seconds per Score request, from arrival to response.
        batch_seconds: seconds per scorer call.
        errors: failures by kind (invalid_input, scorer_error, queue_full, deadline, invalid_request,
            unauthenticated, unavailable).
        items_scored: items scored successfully.
        cache_hits / cache_misses: items answered from / not found in the score cache.
        cache_hit_ratio: hits / (hits + misses) since the server started.
    """

    def __init__(self, scorer: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = {"scorer": scorer}
        kw = {"registry": self.registry, "labelnames": ["scorer"]}
        self.batch_size = Histogram(
            "spie_reward_batch_size", "Items per scored batch", buckets=_BATCH_BUCKETS, **kw
        ).labels(**labels)
        self.queue_depth = Gauge("spie_reward_queue_depth", "Items waiting in the queue", **kw).labels(
            **labels
        )
        self.latency = Histogram(
            "spie_reward_request_seconds", "Score request latency", buckets=_LATENCY_BUCKETS, **kw
        ).labels(**labels)
        self.batch_seconds = Histogram(
            "spie_reward_batch_seconds", "Scorer call duration", buckets=_LATENCY_BUCKETS, **kw
        ).labels(**labels)
        self._errors = Counter(
            "spie_reward_errors", "Failures by kind", labelnames=["scorer", "kind"], registry=self.registry
        )
        self._scorer = scorer
        self.items_scored = Counter("spie_reward_items_scored", "Items scored successfully", **kw).labels(
            **labels
        )
        self.cache_hits = Counter(
            "spie_reward_cache_hits", "Items answered from the score cache", **kw
        ).labels(**labels)
        self.cache_misses = Counter(
            "spie_reward_cache_misses", "Items not found in the score cache", **kw
        ).labels(**labels)
        self.cache_hit_ratio = Gauge(
            "spie_reward_cache_hit_ratio", "Score-cache hits / lookups since start", **kw
        ).labels(**labels)

    def error(self, kind: str, count: int = 1) -> None:
        """Count `count` failures of `kind`."""
        if count:
            self._errors.labels(scorer=self._scorer, kind=kind).inc(count)
