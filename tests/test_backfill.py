"""`python -m cdc_consumer backfill`: a lost slot's gap re-shipped from the outbox, exactly once."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from cdc_consumer.clickhouse import connect
from cdc_consumer.clickhouse_sink import stored_counts_sql, stored_event_counts
from tests.support.fix_clickhouse import clickhouse_command, clickhouse_select, granules_read
from tests.support.fix_consumer import Consumer, current_wal_lsn, publish_probes
from tests.support.fix_postgres import commit_timestamps_off

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_outbox(consumer_over) -> Iterator[tuple[Consumer, psycopg.Connection[Any]]]:
    """A migrated consumer over a database of its own, and a connection to it: the backfill
    ships every outbox row its source lacks, so other tests' events must not be in reach."""
    consumer, url = consumer_over()
    with psycopg.connect(url, autocommit=True) as conn:
        yield consumer, conn


def _counts(clickhouse_url: str, ids: list[str]) -> tuple[int, int, int]:
    """Raw rows (no FINAL), distinct events, and rows with no source position (backfilled)."""
    quoted = ",".join(f"'{event_id}'" for event_id in ids)
    [[rows, distinct, backfilled]] = clickhouse_select(
        clickhouse_url,
        "SELECT count(), uniqExact(event_id), countIf(source_lsn = 0)"
        f" FROM event_log WHERE event_id IN ({quoted})",
    )
    return int(rows), int(distinct), int(backfilled)


def test_backfill_after_a_dropped_slot_delivers_the_gap_once(
    merges_stopped, own_outbox, clickhouse_server
):
    """Shipped, then the slot is dropped and events land in the gap; backfill ships the gap and
    skips what was there, the consumer streams what follows: every event once, without FINAL."""
    # GIVEN events shipped through the slot
    consumer, db = own_outbox
    since = db.execute("SELECT clock_timestamp()").fetchone()[0]
    consumer.start()
    shipped = publish_probes(db, 20, "before-loss")
    consumer.wait_confirmed(current_wal_lsn(db))
    assert consumer.stop() == 0
    # WHEN the slot is lost and events are published with no slot to retain them
    db.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    gap = publish_probes(db, 30, "in-the-gap")
    # AND the operator backfills from before the loss (generously: shipped rows are skipped)
    result = consumer.cli("backfill", "--since", since.isoformat())
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["shipped"] == 30
    assert summary["skipped"] == 20
    # AND more events follow, streamed by the consumer through the recreated slot
    after = publish_probes(db, 10, "after-backfill")
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(db))
    assert consumer.stop() == 0
    # THEN every event is in event_log exactly once; only the gap came from the backfill
    assert _counts(clickhouse_server.url, shipped + gap + after) == (60, 60, 30)
    assert _counts(clickhouse_server.url, gap) == (30, 30, 30)
    # AND a second backfill finds nothing left to ship (the slot must be gone again to run)
    db.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    again = json.loads(consumer.cli("backfill", "--since", since.isoformat()).stdout)
    assert (again["shipped"], again["skipped"]) == (0, 60)


def test_transaction_begun_before_since_and_committed_in_the_gap_is_shipped_once(
    merges_stopped, own_outbox, clickhouse_server
):
    """`--since` is a commit time: an event whose transaction began before it (so its
    created_at is older) and committed after the slot was lost is re-shipped, once."""
    # GIVEN events shipped through the slot, and a transaction that inserts an event and
    # stays open
    consumer, db = own_outbox
    consumer.start()
    shipped = publish_probes(db, 5, "before-loss")
    consumer.wait_confirmed(current_wal_lsn(db))
    assert consumer.stop() == 0
    with psycopg.connect(db.info.dsn) as long_running:
        late = publish_probes(long_running, 1, "begun-before-since")
        # WHEN the operator's `since` is taken after that transaction began, the slot is
        # lost, and the transaction commits in the gap, beside other gap events
        since = db.execute("SELECT clock_timestamp()").fetchone()[0]
        db.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    gap = publish_probes(db, 3, "in-the-gap")
    [[created_at]] = db.execute(
        "SELECT created_at FROM event_outbox WHERE event_id = %s", (late[0],)
    ).fetchall()
    assert created_at < since
    result = consumer.cli("backfill", "--since", since.isoformat())
    assert result.returncode == 0, result.stderr
    # THEN the backfill ships the gap events and the late one, and skips what shipped before
    # (read because it committed within the margin before `since`)
    summary = json.loads(result.stdout)
    assert (summary["shipped"], summary["skipped"], summary["unknown_commit_time"]) == (4, 5, 0)
    assert _counts(clickhouse_server.url, shipped + late + gap) == (9, 9, 4)


def test_gap_larger_than_one_presence_query_is_shipped_once(
    merges_stopped, own_outbox, clickhouse_server
):
    """A gap of 5,000 events (more ids than one ClickHouse query may name) is shipped, once."""
    # GIVEN a lost slot and 5,000 events published in the gap
    consumer, db = own_outbox
    since = db.execute("SELECT clock_timestamp()").fetchone()[0]
    db.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    gap = publish_probes(db, 5000, "large-gap")
    # WHEN the operator backfills
    result = consumer.cli("backfill", "--since", since.isoformat())
    # THEN every event is shipped once
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shipped"] == 5000
    assert _counts(clickhouse_server.url, gap) == (5000, 5000, 5000)


def test_rows_whose_commit_time_is_unknown_are_read_and_the_missing_ones_shipped_once(
    merges_stopped, consumer_over, clickhouse_server, postgres_server
):
    """Rows committed while track_commit_timestamp was off cannot be placed against `--since`:
    the backfill reads them all, skips those ClickHouse holds and ships the rest, once."""
    consumer, url = consumer_over()
    # GIVEN rows committed with no commit timestamp, which the consumer then ships
    with commit_timestamps_off(postgres_server, url), psycopg.connect(url, autocommit=True) as db:
        shipped = publish_probes(db, 3, "unknown-commit-time-shipped")
    consumer.start()
    with psycopg.connect(url, autocommit=True) as db:
        consumer.wait_confirmed(current_wal_lsn(db))
    assert consumer.stop() == 0
    # AND, the slot lost, more such rows committed in the gap
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    with commit_timestamps_off(postgres_server, url), psycopg.connect(url, autocommit=True) as db:
        gap = publish_probes(db, 2, "unknown-commit-time-gap")
    with psycopg.connect(url, autocommit=True) as db:
        # (a `since` after all of them: only an unknown commit time can bring them in)
        [[unknown, since]] = db.execute(
            "SELECT count(*) FILTER (WHERE pg_xact_commit_timestamp(xmin) IS NULL),"
            " clock_timestamp() FROM event_outbox"
        ).fetchall()
    assert unknown == 5
    # WHEN the operator backfills
    result = consumer.cli("backfill", "--since", since.isoformat())
    # THEN it read all five, shipped the two ClickHouse lacked, and each is there once
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["read"], summary["unknown_commit_time"]) == (5, 5)
    assert (summary["shipped"], summary["skipped"]) == (2, 3)
    assert _counts(clickhouse_server.url, shipped + gap) == (5, 5, 2)
    assert _counts(clickhouse_server.url, gap) == (2, 2, 2)


@pytest.fixture
def slot_wal_limit(pg_conn):
    """Set max_slot_wal_keep_size on the shared server for one test, then restore it."""

    def limit(size: str) -> None:
        pg_conn.execute(f"ALTER SYSTEM SET max_slot_wal_keep_size = '{size}'")
        pg_conn.execute("SELECT pg_reload_conf()")

    yield limit
    pg_conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
    pg_conn.execute("SELECT pg_reload_conf()")


def _invalidate(pg_conn, slot: str) -> None:
    """Write WAL past the slot's allowance until a checkpoint invalidates it."""
    for _ in range(4):
        pg_conn.execute("CREATE TEMP TABLE IF NOT EXISTS wal_filler (n int)")
        pg_conn.execute("INSERT INTO wal_filler SELECT generate_series(1, 1000)")
        pg_conn.execute("SELECT pg_switch_wal()")
        pg_conn.execute("CHECKPOINT")
        [[status]] = pg_conn.execute(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchall()
        if status == "lost":
            return
    pytest.fail(f"slot {slot} still {status} after four WAL segments and checkpoints")


def test_slot_invalidated_by_postgres_is_critical_and_backfill_recovers(
    merges_stopped, own_outbox, clickhouse_server, pg_conn, slot_wal_limit
):
    """PostgreSQL gives up a slot past max_slot_wal_keep_size: `status` is critical naming
    wal_status lost; backfill drops and recreates it and ships the gap, each event once."""
    # GIVEN events shipped, then the consumer stopped while events keep coming
    consumer, db = own_outbox
    since = db.execute("SELECT clock_timestamp()").fetchone()[0]
    consumer.start()
    shipped = publish_probes(db, 10, "before-invalidation")
    consumer.wait_confirmed(current_wal_lsn(db))
    assert consumer.stop() == 0
    gap = publish_probes(db, 15, "while-lost")
    # WHEN the slot's WAL allowance runs out and a checkpoint invalidates it
    slot_wal_limit("1MB")
    _invalidate(pg_conn, consumer.slot)
    # THEN the slot check is critical and says why
    status = consumer.cli("status", "--json")
    report = json.loads(status.stdout)
    assert (status.returncode, report["severity"], report["wal_status"]) == (1, "critical", "lost")
    assert any("lost" in problem for problem in report["problems"])
    # AND backfill recreates the slot and ships what the lost slot never delivered
    result = consumer.cli("backfill", "--since", since.isoformat())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shipped"] == 15
    slot_wal_limit("10GB")
    consumer.start()
    after = publish_probes(db, 5, "after-recovery")
    consumer.wait_confirmed(current_wal_lsn(db))
    assert consumer.stop() == 0
    assert _counts(clickhouse_server.url, shipped + gap + after) == (30, 30, 15)


def test_backfill_refuses_a_healthy_slot(make_consumer, clickhouse_server):
    """A usable slot delivers everything itself: backfill refuses rather than double events."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    result = consumer.cli("backfill", "--since", "2026-11-25T00:00:00+00:00")
    assert result.returncode == 2
    assert "exists" in result.stderr


def test_backfill_needs_an_aware_time(make_consumer, clickhouse_server):
    """`--since` without a UTC offset is refused before anything runs."""
    consumer = make_consumer(clickhouse_server.url)
    result = consumer.cli("backfill", "--since", "2026-11-25T00:00:00")
    assert result.returncode != 0
    assert "offset" in result.stderr


def test_presence_check_reads_the_chunks_stretch_of_time_not_the_table(clickhouse_migrated):
    """With two million rows of the source in event_log, checking a chunk of 500 events
    published within a minute selects a few granules, where the check by event_id alone reads
    every one of them."""
    # GIVEN two million rows of one source, published over about a month (a month of their own,
    # dropped afterwards) under three event types
    source = f"presence_{uuid.uuid4().hex[:8]}"
    rows = 2_000_000
    clickhouse_command(
        clickhouse_migrated.url,
        "INSERT INTO event_log (event_id, event_type, event_date_time, environment,"
        " event_context, event_context_raw, metadata_version, source, source_lsn, source_seq)"
        " SELECT generateUUIDv4(number), ['a', 'b', 'c'][number % 3 + 1],"
        "  toDateTime64('2001-02-01 00:00:00', 6, 'UTC') + toIntervalMicrosecond(number * 1000000),"
        f"  'bulk', '{{}}', '{{}}', 1, '{source}', number + 1, 0 FROM numbers({rows})",
    )
    try:
        # WHEN a chunk of 500 consecutive events is checked, in publish-time order
        chunk = clickhouse_select(
            clickhouse_migrated.url,
            "SELECT toString(event_id), toString(event_date_time) FROM event_log"
            f" WHERE source = '{source}' ORDER BY event_date_time LIMIT 500 OFFSET 1000000",
        )
        event_ids = [event_id for event_id, _ in chunk]
        # (the backfill bounds each chunk by its first and last event_date_time)
        earliest, latest = (
            datetime.fromisoformat(published).replace(tzinfo=UTC)
            for published in (chunk[0][1], chunk[-1][1])
        )
        between = (earliest, latest)
        query = stored_counts_sql(event_ids, between=between)
        found = stored_event_counts(connect(clickhouse_migrated.url), event_ids, between=between)
        plan = clickhouse_select(clickhouse_migrated.url, f"EXPLAIN indexes = 1 {query}")
        by_id_alone = clickhouse_select(
            clickhouse_migrated.url,
            "EXPLAIN indexes = 1 SELECT event_id FROM event_log"
            f" WHERE source = '{source}' AND event_id IN ({','.join(repr(i) for i in event_ids)})",
        )
    finally:
        clickhouse_command(clickhouse_migrated.url, "ALTER TABLE event_log DROP PARTITION 200102")
    # THEN every event of the chunk is found, reading a handful of granules of the 245
    assert sorted(found) == sorted(event_ids)
    assert granules_read(plan) <= 6, plan
    assert granules_read(by_id_alone) >= rows // 8192, by_id_alone
