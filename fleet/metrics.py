"""Prometheus metrics of the fleet service itself (not of the devices: those are the API's).

One :class:`ServiceMetrics` per process, on a registry of its own (tests build many). The
ingest counters are read from the worker's :class:`Counters` when scraped, so the worker
keeps one source of truth; the open/lost gap counts and the rollup backlog are two small
queries per scrape. The DB write
latency and API request latency are histograms fed as things happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_COUNTERS = (
    ("messages", "ingest_messages", "Broker messages handled (stored, refused or failed)."),
    ("records", "ingest_records", "Telemetry records stored (new)."),
    ("duplicates", "ingest_duplicates", "Telemetry records already stored (redeliveries)."),
    ("failed", "ingest_failed", "Messages an unexpected error stopped."),
    ("retries", "ingest_retries", "Store attempts repeated because the database did not answer."),
)


class _StateCollector(Collector):
    """Reads the worker's counters and the store's gap counts at scrape time."""

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]] | None,
        gap_counts: Callable[[], dict[str, int]] | None,
        rollup_backlog: Callable[[], int] | None,
    ) -> None:
        self._snapshot, self._gap_counts, self._backlog = snapshot, gap_counts, rollup_backlog

    def collect(self) -> Iterator[Metric]:
        if self._snapshot is not None:
            yield from _ingest_metrics(self._snapshot())
        if self._gap_counts is not None:
            counts = self._gap_counts()
            gauge = GaugeMetricFamily(
                "edge_fleet_gaps", "Missing telemetry seq ranges, by state.", labels=["state"]
            )
            for state in ("open", "lost"):
                gauge.add_metric([state], counts.get(state, 0))
            yield gauge
        if self._backlog is not None:
            yield GaugeMetricFamily(
                "edge_fleet_rollup_backlog_records",
                "Metrics records stored but not yet folded into the hourly rollups.",
                value=self._backlog(),
            )


def _ingest_metrics(snap: dict[str, Any]) -> Iterator[Metric]:
    for key, name, doc in _COUNTERS:
        yield CounterMetricFamily(f"edge_fleet_{name}", doc, value=snap[key])
    invalid = CounterMetricFamily(
        "edge_fleet_ingest_invalid",
        "Messages refused as breaking the contract, by reason.",
        labels=["reason"],
    )
    for reason, count in sorted(snap["invalid_by_reason"].items()):
        invalid.add_metric([reason], count)
    yield invalid
    lag = snap["lag_p95_s"]
    yield GaugeMetricFamily(
        "edge_fleet_ingest_lag_p95_seconds",
        "95th percentile of receive time minus record time over recent records (device clocks included).",
        value=lag if lag is not None else float("nan"),
    )


class ServiceMetrics:
    def __init__(
        self,
        ingest_snapshot: Callable[[], dict[str, Any]] | None = None,
        gap_counts: Callable[[], dict[str, int]] | None = None,
        rollup_backlog: Callable[[], int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(ingest_snapshot, gap_counts, rollup_backlog))
        self.db_write = Histogram(
            "edge_fleet_db_write_seconds",
            "Time to store one broker message (one transaction).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.api_latency = Histogram(
            "edge_fleet_api_request_seconds",
            "API request latency, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def observe_write(self, seconds: float) -> None:
        self.db_write.observe(seconds)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.api_latency.labels(method, route, str(status)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
