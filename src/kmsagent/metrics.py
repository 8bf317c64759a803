"""Prometheus metrics for `GET /metrics`, with prometheus-client and a registry per agent.

Labels are routes, statuses, outcomes and configured KMS endpoints only: never a secret name, a
value or a credential.
Counts that other parts keep anyway (cache entries, evictions, refreshes, open connections,
credential expiry) are read when scraped, so the hot path pays for nothing it does not already do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Route labels; anything else a client asks for is counted as "other".
ROUTES = ("ping", "metrics", "secret", "other")
KMS_OUTCOMES = ("success", "client_error", "throttled", "server_error", "timeout", "unreachable")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Most tries find a slot free (0 s): the first bucket tells them from those that queued.
QUEUE_WAIT_BUCKETS = (0.001, *LATENCY_BUCKETS, 30.0)
#: `[[Files]]` outcomes (files.py): a write attempt, and an OnChange run.
FILE_WRITE_OUTCOMES = ("written", "unchanged", "failed")
ON_CHANGE_OUTCOMES = ("success", "failure", "timeout", "error")


class Metrics:
    """The agent's metrics; `render()` is the body of `GET /metrics`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kmsagent_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.cache_results = Counter(
            "kmsagent_cache_results",
            "Secret reads by how the cache answered them.",
            ["outcome"],
            registry=self.registry,
        )
        self.kms_requests = Counter(
            "kmsagent_kms_requests", "Calls to KMS (each try), by outcome.", ["outcome"], registry=self.registry
        )
        self.kms_calls = Counter(
            "kmsagent_kms_calls",
            "Calls to KMS (each try), by endpoint, action and outcome.",
            ["endpoint", "action", "outcome"],
            registry=self.registry,
        )
        self.kms_latency = Histogram(
            "kmsagent_kms_request_duration_seconds",
            "Duration of calls to KMS (each try), from the moment it had a slot.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.kms_queue_wait = Histogram(
            "kmsagent_kms_queue_wait_seconds",
            "Time each KMS try waited for one of the MaxConcurrentRequests slots.",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.file_writes = Counter(
            "kmsagent_file_writes", "[[Files]] write attempts, by outcome.", ["outcome"], registry=self.registry
        )
        self.on_change_runs = Counter(
            "kmsagent_file_onchange_runs", "[[Files]] OnChange runs, by outcome.", ["outcome"], registry=self.registry
        )
        for outcome in FILE_WRITE_OUTCOMES:
            self.file_writes.labels(outcome)
        for outcome in ON_CHANGE_OUTCOMES:
            self.on_change_runs.labels(outcome)
        for outcome in ("hit", "miss", "stale"):
            self.cache_results.labels(outcome)
        for outcome in KMS_OUTCOMES:
            self.kms_requests.labels(outcome)

    def observe_kms(self, endpoint: str, action: str, outcome: str, seconds: float) -> None:
        """One KMS try; `endpoint` is a configured host[:port] (a bounded set, never a secret)."""
        self.kms_requests.labels(outcome).inc()
        self.kms_calls.labels(endpoint, action, outcome).inc()
        self.kms_latency.observe(seconds)

    def observe_kms_wait(self, seconds: float) -> None:
        """How long one KMS try waited for a MaxConcurrentRequests slot (kept out of its duration)."""
        self.kms_queue_wait.observe(seconds)

    def observe_file_write(self, outcome: str) -> None:
        self.file_writes.labels(outcome).inc()

    def observe_on_change(self, outcome: str) -> None:
        self.on_change_runs.labels(outcome).inc()

    def watch(self, name: str, documentation: str, read: Callable[[], float | None], *, counter: bool = False) -> None:
        """Exports `read()` at every scrape (skipped while it returns None)."""
        self.registry.register(_Reading(name, documentation, read, counter))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Reading(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], float | None], counter: bool) -> None:
        self._name = name
        self._documentation = documentation
        self._read = read
        self._counter = counter

    def collect(self) -> Iterator[Metric]:
        value = self._read()
        if value is None:
            return
        family = CounterMetricFamily if self._counter else GaugeMetricFamily
        yield family(self._name, self._documentation, value=value)

    def describe(self) -> Iterator[Metric]:
        family = CounterMetricFamily if self._counter else GaugeMetricFamily
        yield family(self._name, self._documentation)
