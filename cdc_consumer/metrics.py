"""Prometheus metrics of the consumer, served over HTTP on CDC_METRICS_PORT (off when unset).

`Metrics` is the interface the pipeline, the sink worker and the progress recorder call; it
does nothing, so with metrics off they pay one empty call per batch. `PrometheusMetrics`
records into its own registry. Every call is made per batch, per write, per transaction (the
commit-to-insert histogram) or per status update, never per event: the hot path stays lean.
Each metric is documented in docs/metrics.md.

Commit-to-insert latency is "now, once the batch is in ClickHouse, minus the pgoutput commit
time" of each event. A transaction's rows share one commit time, so the histogram takes one
observation with a count per transaction (`CountedHistogram`) rather than one per row;
prometheus-client's `Histogram.observe` has no count.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from cdc_consumer.batch import Batch
from cdc_consumer.errors import ErrorKind
from cdc_consumer.observability import never_raises

# pgoutput times are microseconds since 2000-01-01 UTC; this is that instant in Unix seconds.
_PG_EPOCH_UNIX = 946_684_800.0

# What analysts wait for: sub-second at the default 1 s batch age, minutes in a backlog.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60, 300, 900, 3600)
ROW_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000)
BYTE_BUCKETS = tuple(1024 * 4**n for n in range(10))  # 1 KiB .. 256 MiB (CDC_BATCH_MAX_BYTES)
INSERT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

# The kinds whose policy halves the batch (errors: SPLIT, DEAD_LETTER): their rejection series
# exist from the start.
REJECTION_KINDS = (ErrorKind.BATCH_TOO_LARGE, ErrorKind.POISON_EVENT)

# SinkWorker's names for what it writes, and the table each lands in.
_TABLES = {
    "batch": "event_log",
    "dead letter": "event_log_dead_letter",
    "minimal dead letter": "event_log_dead_letter",
}


class Metrics:
    """Metrics off: every hook does nothing."""

    def batch_written(self, batch: Batch) -> None:
        """A batch the pipeline cut is in ClickHouse (event_log or the dead-letter table)."""

    def written(self, what: str, *, rows: int, nbytes: int, seconds: float) -> None:
        """One insert succeeded: `what` is SinkWorker's name for it (batch, dead letter)."""

    def retried(self, kind: ErrorKind) -> None:
        """A write is retried, or the source reconnected, after a failure of `kind`."""

    def rejected(self, kind: ErrorKind) -> None:
        """A write was refused for what it holds (`kind`: a bad row, its size); the batch is
        halved, or its lone row dead-lettered."""

    def confirmed(self, lsn: int) -> None:
        """A standby status update confirmed the slot at `lsn`."""

    def lag(self, nbytes: int) -> None:
        """WAL bytes between the server's current position and the confirmed one."""

    def streaming(self, active: bool) -> None:
        """A replication connection streams the slot (True) or not (False)."""


OFF = Metrics()


class CountedHistogram(Collector):
    """A histogram whose observation carries a count: `observe_many` adds each (value, count)
    pair to its bucket, the sum and the count in one step, under one lock."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, observations: Iterable[tuple[float, int]]) -> None:
        with self._lock:
            for value, count in observations:
                # bisect_left: the first bound >= value, i.e. the bucket `le` that holds it.
                self._counts[bisect.bisect_left(self._bounds, value)] += count
                self._sum += value * count

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total_sum = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip((*self._bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=total_sum
        )


class PrometheusMetrics(Metrics):
    """The consumer's metrics in a registry of their own (nothing from other libraries)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._shipped = Counter("cdc_events_shipped", "Events inserted into event_log.", registry=r)
        self._dead_lettered = Counter(
            "cdc_events_dead_lettered",
            "Events ClickHouse refused, stored in event_log_dead_letter.",
            registry=r,
        )
        self._batches = Counter(
            "cdc_batches", "Batches delivered (in event_log or the dead-letter table).", registry=r
        )
        self._batch_rows = Histogram(
            "cdc_batch_rows", "Rows per delivered batch.", buckets=ROW_BUCKETS, registry=r
        )
        self._batch_bytes = Histogram(
            "cdc_batch_bytes",
            "JSONEachRow bytes per delivered batch.",
            buckets=BYTE_BUCKETS,
            registry=r,
        )
        self._insert_seconds = Histogram(
            "cdc_insert_seconds",
            "Seconds per successful ClickHouse insert (a batch, a half of one, a dead letter).",
            ["table"],
            buckets=INSERT_BUCKETS,
            registry=r,
        )
        self._retries = Counter(
            "cdc_retries",
            "Retried writes and source reconnects, by error kind.",
            ["kind"],
            registry=r,
        )
        self._rejections = Counter(
            "cdc_insert_rejections",
            "Inserts refused for a bad row or their size (then halved), by error kind.",
            ["kind"],
            registry=r,
        )
        self._confirmed_lsn = Gauge(
            "cdc_confirmed_lsn",
            "Position last confirmed to the slot (LSN as a number).",
            registry=r,
        )
        self._lag_bytes = Gauge(
            "cdc_lag_bytes",
            "WAL bytes from the confirmed position to the server's, at the last progress record.",
            registry=r,
        )
        since = Gauge(
            "cdc_seconds_since_confirm",
            "Seconds since the confirmed position last moved forward.",
            registry=r,
        )
        since.set_function(lambda: time.monotonic() - self._moved_at)
        self._streaming = Gauge(
            "cdc_streaming", "1 while a replication connection streams the slot.", registry=r
        )
        self._latency = CountedHistogram(
            "cdc_commit_to_insert_seconds",
            "Per event: seconds from its PostgreSQL commit to its batch being in ClickHouse.",
            LATENCY_BUCKETS,
        )
        r.register(self._latency)
        for kind in ErrorKind:  # every series exists from the start, so rate() sees the first
            self._retries.labels(kind=kind.value)
        for kind in REJECTION_KINDS:
            self._rejections.labels(kind=kind.value)
        for table in set(_TABLES.values()):
            self._insert_seconds.labels(table=table)
        self._lsn = 0
        self._moved_at = time.monotonic()

    def serve(self, port: int, address: str = "0.0.0.0") -> None:  # noqa: S104  (scraped from outside)
        """Serve /metrics on a daemon thread (a stop never waits for a scrape)."""
        # `_created` series would double the output for nothing (untyped in prometheus-client)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        start_http_server(port, addr=address, registry=self.registry)

    @never_raises
    def batch_written(self, batch: Batch) -> None:
        if not batch.rows:
            return
        self._batches.inc()
        self._batch_rows.observe(len(batch.rows))
        self._batch_bytes.observe(batch.nbytes)
        now = time.time() - _PG_EPOCH_UNIX
        # A clock behind PostgreSQL's would give negative seconds: those count as 0.
        self._latency.observe_many(
            (max(0.0, now - commit_time / 1e6), rows) for commit_time, rows in batch.commits
        )

    @never_raises
    def written(self, what: str, *, rows: int, nbytes: int, seconds: float) -> None:
        table = _TABLES.get(what, "event_log")
        (self._shipped if table == "event_log" else self._dead_lettered).inc(rows)
        self._insert_seconds.labels(table=table).observe(seconds)

    @never_raises
    def retried(self, kind: ErrorKind) -> None:
        self._retries.labels(kind=kind.value).inc()

    @never_raises
    def rejected(self, kind: ErrorKind) -> None:
        self._rejections.labels(kind=kind.value).inc()

    @never_raises
    def confirmed(self, lsn: int) -> None:
        if lsn > self._lsn:
            self._lsn = lsn
            self._moved_at = time.monotonic()
            self._confirmed_lsn.set(lsn)

    @never_raises
    def lag(self, nbytes: int) -> None:
        self._lag_bytes.set(nbytes)

    @never_raises
    def streaming(self, active: bool) -> None:
        self._streaming.set(1 if active else 0)


def exported_names(metrics: PrometheusMetrics) -> frozenset[str]:
    """Every series name the registry serves (`cdc_batches_total`, `cdc_batch_rows_bucket`, ...),
    for checking what alert rules and dashboards query."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
    }
    return frozenset(
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    )
