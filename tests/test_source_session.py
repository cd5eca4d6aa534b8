"""What the text of an outbox row depends on, pinned: a database or role may set DateStyle,
TimeZone, IntervalStyle or extra_float_digits, and pgoutput and the backfill's `::text` both
follow the session's settings. The consumer's connections pin them, as PostgreSQL's own
logical-replication worker does."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg
import pytest

from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import current_wal_lsn

pytestmark = [pytest.mark.e2e]

# Day 5 of month 11 in UTC, the evening of the 4th in New York: read as DMY text by a parser
# that assumes MDY it becomes the 11th of May, and the UTC offset shifts the day too.
_INSTANTS = {
    "streamed": datetime(2026, 11, 5, 3, 4, 5, 123456, tzinfo=UTC),
    "backfilled": datetime(2026, 11, 6, 2, 0, 0, 654321, tzinfo=UTC),
}


def _publish(conn: psycopg.Connection, at: datetime) -> str:
    [[event_id]] = conn.execute(
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version) VALUES (gen_random_uuid(), 'probe', %s, 'test',"
        " '{}', 1) RETURNING event_id::text",
        (at,),
    ).fetchall()
    return str(event_id)


def test_instants_survive_a_database_with_sql_dmy_dates_and_a_new_york_time_zone(
    consumer_over, clickhouse_server
) -> None:
    """Streamed and backfilled events keep their instant, to the microsecond."""
    # GIVEN an outbox in a database whose sessions default to DMY dates, New York time and
    # non-default interval and float output
    consumer, url = consumer_over(
        datestyle="SQL, DMY",
        timezone="America/New_York",
        intervalstyle="sql_standard",
        extra_float_digits="-3",
    )
    with psycopg.connect(url, autocommit=True) as conn:
        # (the setting is in force: this session prints the instant as DMY New York text)
        [[text]] = conn.execute("SELECT %s::timestamptz::text", (_INSTANTS["streamed"],))
        assert text.startswith("04/11/2026 22:04:05.123456")
        # WHEN one event streams through the slot
        consumer.start()
        streamed = _publish(conn, _INSTANTS["streamed"])
        consumer.wait_confirmed(current_wal_lsn(conn))
        assert consumer.stop() == 0
        # AND another is re-shipped by the backfill after the slot is lost
        # (to_json prints ISO 8601 whatever the DateStyle; psycopg cannot read SQL-style text)
        [[since]] = conn.execute("SELECT to_json(clock_timestamp()) #>> '{}'").fetchall()
        conn.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
        backfilled = _publish(conn, _INSTANTS["backfilled"])
    result = consumer.cli("backfill", "--since", since)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shipped"] == 1
    # THEN event_log holds both instants exactly as published, and nothing was dead-lettered
    ids = {streamed: "streamed", backfilled: "backfilled"}
    quoted = ",".join(f"'{event_id}'" for event_id in ids)
    rows = clickhouse_select(
        clickhouse_server.url,
        "SELECT toString(event_id), toUnixTimestamp64Micro(event_date_time) FROM event_log"
        f" WHERE event_id IN ({quoted})",
    )
    landed = {ids[event_id]: micros for event_id, micros in rows}
    published = {name: int(at.timestamp() * 1_000_000) for name, at in _INSTANTS.items()}
    assert landed == published
    dead = clickhouse_select(
        clickhouse_server.url,
        f"SELECT count() FROM event_log_dead_letter WHERE event_id IN ({quoted})",
    )
    assert dead == [[0]]
