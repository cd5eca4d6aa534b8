"""Several sources in one event_log: each restart reads only its own positions, and a source
read from another PostgreSQL than the one it recorded is refused, until `adopt` moves it there
(when no stored position could be mistaken for the new server's)."""

from __future__ import annotations

import json
import signal
import uuid
from typing import Any

import psycopg
import pytest

from tests.support.fix_clickhouse import clickhouse_command, clickhouse_select
from tests.support.fix_consumer import current_wal_lsn, publish_probes, shards_holding

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
    """Two consumers over the two shards of one outbox (CDC_SHARD) write one event_log; with
    restarts and kills of each, every event arrives exactly once, each through its shard."""
    environment = f"sources-{uuid.uuid4().hex[:12]}"
    # GIVEN two slots whose publications split the outbox in two
    a, b = (make_consumer(merges_stopped.url, CDC_SHARD=f"{k}/2") for k in range(2))
    a.migrate()
    b.migrate()
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
    # THEN every event arrived once (merges stopped: nothing folded away), each from the
    # source whose shard holds it
    rows = clickhouse_select(
        merges_stopped.url,
        "SELECT source, count(), uniqExact(event_id), groupArray(toString(event_id))"
        f" FROM event_log WHERE environment = '{environment}' GROUP BY source ORDER BY source",
    )
    assert sorted(row[0] for row in rows) == sorted([a.slot, b.slot])
    assert sum(row[1] for row in rows) == sum(row[2] for row in rows) == 15 * _TRANSACTION_EVENTS
    for source, _, _, event_ids in rows:
        shard = (a if source == a.slot else b).env["CDC_SHARD"]
        assert shards_holding(pg_conn, event_ids, count=2) == {shard}


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


def _last_line(stderr: str) -> dict[str, Any]:
    return dict(json.loads(stderr.strip().splitlines()[-1]))


def test_source_moved_to_an_upgraded_server_is_adopted_only_past_its_positions(
    make_consumer, clickhouse_server, pg_conn
):
    """After a major-version upgrade (a new system identifier, the slot migrated past the old
    WAL) the refused source is moved by `adopt`, which itself refuses while a stored position
    is at or above the slot's; then the consumer delivers once again."""
    environment = f"adopt-{uuid.uuid4().hex[:12]}"
    # GIVEN a source that shipped events, recorded as read from another (the old) system
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    shipped = publish_probes(pg_conn, 3, environment)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    clickhouse_command(
        clickhouse_server.url,
        "INSERT INTO cdc_sources (source, system_identifier, database, slot, timeline)"
        f" VALUES ('{consumer.slot}', '7000000000000000002', 'outbox', '{consumer.slot}', 1)",
    )
    refused = consumer.cli("run")
    assert refused.returncode == 2, refused.stderr
    assert "python -m cdc_consumer adopt" in refused.stderr
    # AND a stored position past the slot's, as a server whose WAL does not continue the old
    # one's would leave
    planted = consumer.confirmed_lsn() + 1_000_000
    clickhouse_command(
        clickhouse_server.url,
        "INSERT INTO event_log (event_id, event_type, event_date_time, environment,"
        " event_context, event_context_raw, metadata_version, source, source_lsn, source_seq)"
        f" VALUES (generateUUIDv4(), 'probe', now64(6), 'planted', '{{}}', '{{}}', 1,"
        f" '{consumer.slot}', {planted}, 0)",
    )
    # WHEN adopt runs, THEN it refuses while that position is stored
    blocked = consumer.cli("adopt")
    assert blocked.returncode == 2, blocked.stderr
    assert "at or above slot" in _last_line(blocked.stderr)["error"]
    clickhouse_command(
        clickhouse_server.url,
        f"ALTER TABLE event_log DELETE WHERE source = '{consumer.slot}'"
        f" AND source_lsn = {planted} SETTINGS mutations_sync = 2",
    )
    # AND once every stored position is below the slot's, adopt records this server
    adopted = consumer.cli("adopt")
    assert adopted.returncode == 0, adopted.stderr
    ((system_identifier,),) = pg_conn.execute(
        "SELECT system_identifier::text FROM pg_control_system()"
    ).fetchall()
    assert json.loads(adopted.stdout)["previous_system_identifier"] == "7000000000000000002"
    assert json.loads(adopted.stdout)["system_identifier"] == system_identifier
    # AND the consumer runs again and delivers each event once
    consumer.start()
    later = publish_probes(pg_conn, 3, environment)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    rows = clickhouse_select(
        clickhouse_server.url,
        "SELECT toString(event_id), count() FROM event_log"
        f" WHERE environment = '{environment}' GROUP BY event_id",
    )
    assert sorted(rows) == sorted([event_id, 1] for event_id in shipped + later)
