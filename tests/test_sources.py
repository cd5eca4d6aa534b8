"""Several sources in one event_log: each restart reads only its own positions, and a source
read from another PostgreSQL than the one it recorded is refused."""

from __future__ import annotations

import signal
import uuid
from typing import Any

import psycopg
import pytest

from tests.support.fix_clickhouse import clickhouse_command, clickhouse_select
from tests.support.fix_consumer import current_wal_lsn

pytestmark = pytest.mark.e2e

_TRANSACTION_EVENTS = 20


def _publish_mixed(pg_conn: psycopg.Connection[Any], environment: str, transactions: int) -> None:
    """Commit transactions that each interleave events of both sources' types."""
    for _ in range(transactions):
        pg_conn.execute(
            "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
            " event_context, metadata_version)"
            " SELECT gen_random_uuid(),"
            "  CASE WHEN g %% 2 = 0 THEN 'source_a_probe' ELSE 'source_b_probe' END,"
            "  clock_timestamp(), %s, jsonb_build_object('n', g), 1"
            " FROM generate_series(1, %s::int) AS g",
            (environment, _TRANSACTION_EVENTS),
        )


def test_two_slots_into_one_event_log_each_deliver_everything_once(
    make_consumer, merges_stopped, pg_conn
):
    """Two consumers over row-filtered publications of one outbox write one event_log; with
    restarts and kills of each, every event of each arrives exactly once."""
    environment = f"sources-{uuid.uuid4().hex[:12]}"
    consumers = {}
    # GIVEN two slots whose publications split the outbox by event type
    for event_type in ("source_a_probe", "source_b_probe"):
        consumer = make_consumer(merges_stopped.url)
        consumer.migrate()
        pg_conn.execute(
            f"ALTER PUBLICATION {consumer.env['CDC_PUBLICATION']} SET TABLE event_outbox"
            f" WHERE (event_type = '{event_type}')"
        )
        consumers[event_type] = consumer
    a, b = consumers.values()
    # WHEN A ships transactions that hold B's events too, before B ever runs
    _publish_mixed(pg_conn, environment, 5)
    a.start()
    a.wait_confirmed(current_wal_lsn(pg_conn))
    assert a.stop() == 0
    # AND B starts later, while more is published, and A comes back
    b.start()
    _publish_mixed(pg_conn, environment, 5)
    b.wait_confirmed(current_wal_lsn(pg_conn))
    a.start()
    a.wait_confirmed(current_wal_lsn(pg_conn))
    # AND both are killed, more is published, and both restart
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    assert b.stop(signal.SIGKILL) == -signal.SIGKILL
    _publish_mixed(pg_conn, environment, 5)
    a.start()
    b.start()
    final = current_wal_lsn(pg_conn)
    a.wait_confirmed(final)
    b.wait_confirmed(final)
    assert a.stop() == 0
    assert b.stop() == 0
    # THEN each source delivered each of its events once (merges stopped: nothing folded away)
    rows = clickhouse_select(
        merges_stopped.url,
        "SELECT event_type, source, count(), uniqExact(event_id) FROM event_log"
        f" WHERE environment = '{environment}' GROUP BY event_type, source ORDER BY event_type",
    )
    per_source = 15 * _TRANSACTION_EVENTS // 2
    assert rows == [
        ["source_a_probe", a.slot, per_source, per_source],
        ["source_b_probe", b.slot, per_source, per_source],
    ]


def test_source_read_from_another_postgres_is_refused(make_consumer, clickhouse_server, pg_conn):
    """A consumer records its PostgreSQL's system identifier; a source recorded from another
    server stops the consumer with a configuration error instead of skipping its events."""
    # GIVEN a source that streamed once: its PostgreSQL is recorded
    first = make_consumer(clickhouse_server.url)
    first.migrate()
    first.start()
    assert first.stop() == 0
    ((system_identifier,),) = pg_conn.execute(
        "SELECT system_identifier::text FROM pg_control_system()"
    ).fetchall()
    ((database,),) = pg_conn.execute("SELECT current_database()").fetchall()
    recorded = clickhouse_select(
        clickhouse_server.url,
        "SELECT system_identifier, database, slot FROM cdc_sources FINAL"
        f" WHERE source = '{first.slot}'",
    )
    assert recorded == [[system_identifier, database, first.slot]]
    # WHEN another consumer claims a source name that was recorded from another server
    second = make_consumer(clickhouse_server.url)
    second.migrate()
    clickhouse_command(
        clickhouse_server.url,
        "INSERT INTO cdc_sources (source, system_identifier, database, slot)"
        f" VALUES ('{second.slot}', '7000000000000000001', 'elsewhere', '{second.slot}')",
    )
    result = second.cli("run")
    # THEN it stops with exit code 2, naming the source and both servers
    assert result.returncode == 2, result.stderr
    assert f"source {second.slot} was recorded from PostgreSQL system 7000000000000000001" in (
        result.stderr
    )
    assert system_identifier in result.stderr
