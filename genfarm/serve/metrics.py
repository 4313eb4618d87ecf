"""Prometheus metrics of the service. Each replica counts what it serves; a single MetricsHub deployment holds the
latest snapshot of every replica, so GET /metrics on any replica shows the whole service."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STALE_GAUGE_S = 15  # a replica silent this long is gone: its gauges leave the sums, its counters stay


class ReplicaMetrics:
    def __init__(self, running, waiting, engine_requests):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("genfarm_requests", "HTTP requests answered, by route and status code.",
                                ["route", "status"], registry=r)
        self.errors = Counter("genfarm_errors", "Requests that ended in an error, by route and error type.",
                              ["route", "type"], registry=r)
        self.prompt_tokens = Counter("genfarm_prompt_tokens", "Prompt tokens of generation requests.",
                                     ["route"], registry=r)
        self.completion_tokens = Counter("genfarm_completion_tokens", "Tokens generated.", ["route"], registry=r)
        self.disconnects = Counter("genfarm_client_disconnects", "Requests whose client went away before the end "
                                   "(their generation was aborted).", ["route"], registry=r)
        self.ttft = Histogram("genfarm_time_to_first_token_seconds", "From request arrival to the first token.",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("genfarm_request_duration_seconds", "From request arrival to its last byte.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        Gauge("genfarm_running_requests", "Requests generating now.", registry=r).set_function(running)
        Gauge("genfarm_queue_depth", "Requests waiting for a generation slot.", registry=r).set_function(waiting)
        Gauge("genfarm_engine_requests", "Requests the vLLM engine holds (running or waiting inside it).",
              registry=r).set_function(engine_requests)

    def snapshot(self) -> list[Metric]:
        return list(self.registry.collect())


def batch_families(by_status: dict[str, int], tokens: dict[str, int]) -> list[Metric]:
    """The batch API's lines (genfarm/serve/batches.py): batches by status, tokens of finished batches' requests.
    Every replica pushes them to the hub under one name, so they are counted once, not once per replica."""
    batches = GaugeMetricFamily("genfarm_batches", "Batches of the batch API, by status.", labels=["status"])
    for status, count in by_status.items():
        batches.add_metric([status], count)
    used = CounterMetricFamily("genfarm_batch_tokens", "Tokens of the requests of finished batches (prompt, "
                               "completion).", labels=["kind"])
    for kind, count in tokens.items():
        used.add_metric([kind], count)
    return [batches, used]


class MetricsHub:
    """Latest snapshot per replica; render() sums them into one Prometheus text page."""

    def __init__(self):
        self._snapshots: dict[str, tuple[float, list[Metric]]] = {}

    def push(self, replica: str, families: list[Metric]) -> None:
        self._snapshots[replica] = (time.monotonic(), families)

    def render(self) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(list(self._snapshots.values())))
        return generate_latest(registry).decode()


class _Merged:
    """A prometheus_client collector summing samples with the same name and labels across replicas."""

    def __init__(self, snapshots: list[tuple[float, list[Metric]]]):
        self.snapshots = snapshots

    def collect(self):
        now = time.monotonic()
        merged: dict[str, Metric] = {}
        sums: dict[str, dict[tuple, float]] = {}
        for seen, families in self.snapshots:
            for family in families:
                if family.type == "gauge" and now - seen > STALE_GAUGE_S:
                    continue
                merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                totals = sums.setdefault(family.name, {})
                for sample in family.samples:
                    if sample.name.endswith("_created"):  # creation times do not add up
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    totals[key] = totals.get(key, 0.0) + sample.value
        for name, family in merged.items():
            for (sample_name, labels), value in sums[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family
