"""cdc_consumer.metrics: what the consumer serves on CDC_METRICS_PORT, scraped over HTTP."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cdc_consumer.metrics import LATENCY_BUCKETS, CountedHistogram, PrometheusMetrics
from cdc_consumer.pgoutput import str_to_lsn
from cdc_consumer.progress import ProgressRecorder
from tests.support.fix_consumer import Consumer, current_wal_lsn, publish_probes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics by name and labels, e.g. `cdc_retries_total{kind=...}`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def _consumer_serving_metrics(make_consumer: Any, clickhouse_url: str) -> tuple[Consumer, int]:
    """A migrated, streaming consumer serving /metrics, and the port it serves on."""
    port = _free_port()
    consumer = make_consumer(clickhouse_url, CDC_METRICS_PORT=str(port))
    consumer.migrate()
    consumer.start()
    return consumer, port


def _publish(pg_conn: psycopg.Connection[Any], count: int, context_sql: str) -> None:
    """Commit `count` events whose context is the SQL expression `context_sql` (of g: 1..count)."""
    pg_conn.execute(
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version) SELECT gen_random_uuid(), 'probe', clock_timestamp(),"
        f" 'metrics', {context_sql}, 1 FROM generate_series(1, %s::int) AS g",
        (count,),
    )


@pytest.mark.e2e
def test_scrape_counts_the_events_just_shipped(make_consumer, clickhouse_server, pg_conn):
    """/metrics counts each event shipped once, and observes each one's commit-to-insert
    latency, batch sizes, the confirmed position and the streaming state."""
    # GIVEN a streaming consumer serving metrics
    consumer, port = _consumer_serving_metrics(make_consumer, clickhouse_server.url)
    # WHEN 25 events commit in three transactions and the slot is confirmed past them
    for count in (10, 10, 5):
        publish_probes(pg_conn, count, "metrics")
    target = current_wal_lsn(pg_conn)
    consumer.wait_confirmed(target)
    # THEN the scrape holds exactly them
    metrics = _scrape(port)
    assert metrics["cdc_events_shipped_total"] == 25
    assert metrics["cdc_events_dead_lettered_total"] == 0
    assert metrics["cdc_commit_to_insert_seconds_count"] == 25
    assert metrics["cdc_commit_to_insert_seconds_bucket{le=+Inf}"] == 25
    assert 0 < metrics["cdc_commit_to_insert_seconds_sum"] < 25 * 60
    assert metrics["cdc_batch_rows_sum"] == 25
    assert metrics["cdc_batch_rows_count"] == metrics["cdc_batches_total"] >= 1
    assert metrics["cdc_batch_bytes_sum"] > 25 * 50
    assert metrics["cdc_insert_seconds_count{table=event_log}"] == metrics["cdc_batches_total"]
    assert metrics["cdc_retries_total{kind=transient_sink}"] == 0
    assert metrics["cdc_insert_rejections_total{kind=poison_event}"] == 0
    assert metrics["cdc_insert_rejections_total{kind=batch_too_large}"] == 0
    assert metrics["cdc_confirmed_lsn"] >= target
    assert metrics["cdc_seconds_since_confirm"] < 60
    assert metrics["cdc_streaming"] == 1
    assert consumer.stop() == 0


@pytest.mark.e2e
def test_scrape_counts_retries_rejections_and_dead_letters(
    make_consumer, clickhouse_faults, pg_conn
):
    """Inserts that fail count as retries of their kind; each insert refused over a bad row
    counts as a rejection; the row counts as dead-lettered, not shipped, and its latency is
    observed with the rest of its batch."""
    # GIVEN a consumer serving metrics, whose next two inserts fail with a server error
    consumer, port = _consumer_serving_metrics(make_consumer, clickhouse_faults.url)
    clickhouse_faults.fail_inserts(2)
    # WHEN 10 good events and one the JSON column refuses commit together
    with pg_conn.transaction():
        publish_probes(pg_conn, 10, "metrics-faults")
        _publish(pg_conn, 1, """'{"a.b": 1, "a": {"b": 2}}'::jsonb""")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    # THEN the scrape tells the two retries, the ten shipped and the one dead-lettered apart
    metrics = _scrape(port)
    assert metrics["cdc_retries_total{kind=transient_sink}"] == 2
    # The bad row is last: the parts holding it (11, 6, 3, 2 rows, then itself) were refused.
    assert metrics["cdc_insert_rejections_total{kind=poison_event}"] == 5
    assert metrics["cdc_insert_rejections_total{kind=batch_too_large}"] == 0
    assert metrics["cdc_events_shipped_total"] == 10
    assert metrics["cdc_events_dead_lettered_total"] == 1
    assert metrics["cdc_insert_seconds_count{table=event_log_dead_letter}"] == 1
    assert metrics["cdc_commit_to_insert_seconds_count"] == 11
    assert metrics["cdc_batches_total"] == 1
    assert consumer.stop() == 0


@pytest.mark.e2e
def test_scrape_counts_an_insert_refused_as_too_large(make_consumer, clickhouse_faults, pg_conn):
    """An insert refused for its size counts as a rejection of kind batch_too_large, not as a
    retry; its halves land and every event counts as shipped."""
    # GIVEN a consumer serving metrics behind a proxy that refuses bodies over 8 KiB
    consumer, port = _consumer_serving_metrics(make_consumer, clickhouse_faults.url)
    clickhouse_faults.fail_inserts_over(8 * 1024, code=0, status=413)
    # WHEN one transaction commits 4 events of about 3 KiB encoded (2 of them fit)
    _publish(pg_conn, 4, "jsonb_build_object('n', g, 'pad', repeat('x', 1400))")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    # THEN one rejection, no retry, and the four events shipped in two inserts
    metrics = _scrape(port)
    assert metrics["cdc_insert_rejections_total{kind=batch_too_large}"] == 1
    assert metrics["cdc_insert_rejections_total{kind=poison_event}"] == 0
    assert metrics["cdc_retries_total{kind=transient_sink}"] == 0
    assert metrics["cdc_events_shipped_total"] == 4
    assert metrics["cdc_insert_seconds_count{table=event_log}"] == 2
    assert metrics["cdc_events_dead_lettered_total"] == 0
    assert consumer.stop() == 0


def test_lag_is_read_with_each_progress_record(django_db_setup, postgres_url):
    """Each cdc_progress write (the table from django_db_setup) sets cdc_lag_bytes to the WAL
    between the server's position and the one recorded."""
    # GIVEN a progress recorder with metrics
    metrics = PrometheusMetrics()
    recorder = ProgressRecorder(postgres_url, "metrics_lag_probe", metrics=metrics)
    try:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            current = current_wal_lsn(conn)
            # WHEN it records a position 1 MiB behind the server's
            recorder.record(confirmed_lsn=current - 2**20, commit_time=None, force=True)
            lag = metrics.registry.get_sample_value("cdc_lag_bytes")
            # THEN the lag is that MiB plus whatever WAL the upsert itself wrote
            assert lag is not None
            assert 2**20 <= lag < 2**20 + 2**16
            # WHEN it records the server's position
            recorder.record(confirmed_lsn=current_wal_lsn(conn), commit_time=None, force=True)
            assert (metrics.registry.get_sample_value("cdc_lag_bytes") or 0) < 2**16
            conn.execute("DELETE FROM cdc_progress WHERE slot = 'metrics_lag_probe'")
    finally:
        recorder.close()


def test_counted_observation_equals_that_many_observations():
    """observe_many((v, n)) renders exactly as n calls of Histogram.observe(v) would."""
    values = [(0.0, 3), (0.05, 2), (0.7, 100), (1.0, 1), (42.0, 7), (1e9, 4)]
    counted_registry, plain_registry = CollectorRegistry(), CollectorRegistry()
    counted = CountedHistogram("latency_seconds", "doc", LATENCY_BUCKETS)
    counted_registry.register(counted)
    plain = Histogram("latency_seconds", "doc", buckets=LATENCY_BUCKETS, registry=plain_registry)
    counted.observe_many(values)
    for value, count in values:
        for _ in range(count):
            plain.observe(value)

    def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
        families = text_string_to_metric_families(generate_latest(registry).decode())
        return [
            (s.name, s.labels, s.value)
            for f in families
            for s in f.samples
            if not s.name.endswith("_created")
        ]

    assert samples(counted_registry) == samples(plain_registry)


def test_lsn_gauge_matches_the_text_form():
    """cdc_confirmed_lsn is the LSN as one number, as pg_wal_lsn_diff(lsn, '0/0') reads it."""
    metrics = PrometheusMetrics()
    metrics.confirmed(str_to_lsn("16/B374D848"))
    assert metrics.registry.get_sample_value("cdc_confirmed_lsn") == 0x16B374D848
