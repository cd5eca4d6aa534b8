"""`python -m cdc_consumer backfill`: a lost slot's gap re-shipped from the outbox, exactly once."""

from __future__ import annotations

import json

import pytest

from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import current_wal_lsn, publish_probes

pytestmark = pytest.mark.e2e


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
    merges_stopped, make_consumer, clickhouse_server, pg_conn
):
    """Shipped, then the slot is dropped and events land in the gap; backfill ships the gap and
    skips what was there, the consumer streams what follows: every event once, without FINAL."""
    # GIVEN events shipped through the slot
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    since = pg_conn.execute("SELECT clock_timestamp()").fetchone()[0]
    consumer.start()
    shipped = publish_probes(pg_conn, 20, "before-loss")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # WHEN the slot is lost and events are published with no slot to retain them
    pg_conn.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    gap = publish_probes(pg_conn, 30, "in-the-gap")
    # AND the operator backfills from before the loss (generously: shipped rows are skipped)
    result = consumer.cli("backfill", "--since", since.isoformat())
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["shipped"] == 30
    assert summary["skipped"] == 20
    # AND more events follow, streamed by the consumer through the recreated slot
    after = publish_probes(pg_conn, 10, "after-backfill")
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN every event is in event_log exactly once; only the gap came from the backfill
    assert _counts(clickhouse_server.url, shipped + gap + after) == (60, 60, 30)
    assert _counts(clickhouse_server.url, gap) == (30, 30, 30)
    # AND a second backfill finds nothing left to ship (the slot must be gone again to run)
    pg_conn.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    again = json.loads(consumer.cli("backfill", "--since", since.isoformat()).stdout)
    assert (again["shipped"], again["skipped"]) == (0, 60)


def test_backfill_of_a_gap_larger_than_one_lookup_ships_it_whole(
    make_consumer, clickhouse_server, pg_conn
):
    """A gap of thousands of events: the presence check asks ClickHouse in lookups whose text
    stays under max_query_size, and every event of the gap lands once."""
    # GIVEN a slot dropped before 5,000 events were published (a chunk of the outbox read
    # holds more ids than one query under ClickHouse's default max_query_size can name)
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    since = pg_conn.execute("SELECT clock_timestamp()").fetchone()[0]
    pg_conn.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    gap = publish_probes(pg_conn, 5_000, "large-gap")
    # WHEN the operator backfills
    result = consumer.cli("backfill", "--since", since.isoformat())
    # THEN it ships the whole gap, each event once
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shipped"] == 5_000
    assert _counts(clickhouse_server.url, gap[:2_000]) == (2_000, 2_000, 2_000)
    assert _counts(clickhouse_server.url, gap[2_000:4_000]) == (2_000, 2_000, 2_000)
    assert _counts(clickhouse_server.url, gap[4_000:]) == (1_000, 1_000, 1_000)


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
    merges_stopped, make_consumer, clickhouse_server, pg_conn, slot_wal_limit
):
    """PostgreSQL gives up a slot past max_slot_wal_keep_size: `status` is critical naming
    wal_status lost; backfill drops and recreates it and ships the gap, each event once."""
    # GIVEN events shipped, then the consumer stopped while events keep coming
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    since = pg_conn.execute("SELECT clock_timestamp()").fetchone()[0]
    consumer.start()
    shipped = publish_probes(pg_conn, 10, "before-invalidation")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    gap = publish_probes(pg_conn, 15, "while-lost")
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
    after = publish_probes(pg_conn, 5, "after-recovery")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
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
