"""web.outbox.prune: only rows past the retention that are provably in ClickHouse go."""

from __future__ import annotations

import json
from datetime import UTC, timedelta

import psycopg
import pytest

from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import current_wal_lsn, publish_probes, wait_for
from tests.support.fix_postgres import commit_timestamps_off
from web.outbox.prune import outbox_prune

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _prune(slot: str, chunk_rows: int = 1000):
    return outbox_prune(
        slots=[slot], retention=timedelta(0), commit_margin=timedelta(0), chunk_rows=chunk_rows
    )


def _present(pg_conn, ids: list[str]) -> set[str]:
    rows = pg_conn.execute(
        "SELECT event_id::text FROM event_outbox WHERE event_id::text = ANY(%s)", (ids,)
    ).fetchall()
    return {row[0] for row in rows}


def _commit_time(pg_conn, event_id: str):
    return pg_conn.execute(
        "SELECT pg_xact_commit_timestamp(xmin) FROM event_outbox WHERE event_id = %s", (event_id,)
    ).fetchone()[0]


def _wait_shipped(pg_conn, consumer, event_id: str) -> None:
    """Until the consumer recorded a shipped commit at or after this event's commit."""
    committed = _commit_time(pg_conn, event_id)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    wait_for(
        lambda: pg_conn.execute(
            "SELECT 1 FROM cdc_progress WHERE slot = %s AND last_commit_time >= %s",
            (consumer.slot, committed),
        ).fetchone(),
        what="progress past the event",
    )


def _ship_and_stop(consumer, pg_conn, environment: str):
    """Three events shipped by `consumer`, which is then stopped."""
    consumer.migrate()
    consumer.start()
    ids = publish_probes(pg_conn, 3, environment)
    _wait_shipped(pg_conn, consumer, ids[-1])
    assert consumer.stop() == 0
    return consumer, ids


def test_consumer_stopped_retention_zero_deletes_nothing_unshipped(
    make_consumer, clickhouse_server, pg_conn
):
    """With the consumer stopped and retention 0, unshipped rows stay; shipped ones go, in
    chunks."""
    # GIVEN a slot whose consumer never ran: nothing is known to be shipped
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    waiting = publish_probes(pg_conn, 4, "prune-never-shipped")
    result = _prune(consumer.slot)
    assert result.deleted == 0
    assert result.skipped_reason is not None
    assert _present(pg_conn, waiting) == set(waiting)
    # WHEN the consumer ships those (and 16 more), stops, and more are published
    consumer.start()
    shipped = waiting + publish_probes(pg_conn, 16, "prune-shipped")
    _wait_shipped(pg_conn, consumer, shipped[-1])
    assert consumer.stop() == 0
    unshipped = publish_probes(pg_conn, 5, "prune-unshipped")
    # THEN pruning removes the shipped rows in bounded chunks, and none of the others
    result = _prune(consumer.slot, chunk_rows=7)
    assert result.deleted >= 20
    assert result.chunks >= 3
    assert _present(pg_conn, shipped) == set()
    assert _present(pg_conn, unshipped) == set(unshipped)
    assert _prune(consumer.slot).deleted == 0


def test_long_transaction_committed_after_a_shipped_batch_is_kept(
    make_consumer, clickhouse_server, pg_conn, postgres_url
):
    """A row inserted before a shipped batch but committed after it (older created_at than the
    last shipped commit) is not pruned until it has shipped itself."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    with psycopg.connect(postgres_url) as late:
        # GIVEN a transaction that inserts a row and stays open
        [late_id] = publish_probes(late, 1, "prune-long-tx")
        # AND a later transaction whose row ships while the first is still open
        [early_id] = publish_probes(pg_conn, 1, "prune-short-tx")
        _wait_shipped(pg_conn, consumer, early_id)
        assert _prune(consumer.slot).deleted >= 1
        assert _present(pg_conn, [early_id]) == set()
        # WHEN the consumer stops and only then the long transaction commits
        assert consumer.stop() == 0
        late.commit()
    created_at, committed_at, shipped_until = pg_conn.execute(
        "SELECT o.created_at, pg_xact_commit_timestamp(o.xmin), p.last_commit_time"
        " FROM event_outbox o, cdc_progress p WHERE o.event_id = %s AND p.slot = %s",
        (late_id, consumer.slot),
    ).fetchone()
    # (a created_at rule would delete it: it was created before the last shipped commit)
    assert created_at < shipped_until < committed_at
    # THEN pruning keeps it
    _prune(consumer.slot)
    assert _present(pg_conn, [late_id]) == {late_id}
    # AND once it has shipped, it goes, and it is in ClickHouse
    consumer.start()
    _wait_shipped(pg_conn, consumer, late_id)
    assert consumer.stop() == 0
    _prune(consumer.slot)
    assert _present(pg_conn, [late_id]) == set()
    assert clickhouse_select(
        clickhouse_server.url, f"SELECT count() FROM event_log WHERE event_id = '{late_id}'"
    ) == [[1]]


def test_retention_keeps_young_rows(make_consumer, clickhouse_server, pg_conn):
    """Shipped rows younger than the retention stay."""
    consumer, ids = _ship_and_stop(make_consumer(clickhouse_server.url), pg_conn, "prune-young")
    result = outbox_prune(
        slots=[consumer.slot],
        retention=timedelta(hours=1),
        commit_margin=timedelta(0),
        chunk_rows=10,
    )
    assert _present(pg_conn, ids) == set(ids)
    assert result.skipped_reason is None


def test_missing_slot_stops_pruning(make_consumer, clickhouse_server, pg_conn):
    """Once the slot is gone, shipped rows are kept too: the backfill needs the outbox."""
    consumer, ids = _ship_and_stop(make_consumer(clickhouse_server.url), pg_conn, "prune-gone")
    pg_conn.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    result = _prune(consumer.slot)
    assert result.deleted == 0
    assert "missing or lost" in (result.skipped_reason or "")
    assert _present(pg_conn, ids) == set(ids)


def test_a_dropped_slot_that_shipped_is_not_recreated_so_its_gap_survives_the_prune(
    make_consumer, clickhouse_server, pg_conn
):
    """A slot dropped after its consumer shipped is not recreated by `migrate` (exit 2, naming
    the backfill from the last shipped commit): the fresh slot's catalog_xmin would pass the
    rows committed in the gap, and the prune would delete them unshipped."""
    # GIVEN a consumer that has shipped and stopped, and its slot dropped
    consumer, _ = _ship_and_stop(make_consumer(clickhouse_server.url), pg_conn, "prune-before")
    [[last_shipped]] = pg_conn.execute(
        "SELECT last_commit_time FROM cdc_progress WHERE slot = %s", (consumer.slot,)
    ).fetchall()
    pg_conn.execute("SELECT pg_drop_replication_slot(%s)", (consumer.slot,))
    # AND events committed with no slot to retain them
    gap = publish_probes(pg_conn, 3, "prune-in-the-gap")
    # WHEN `migrate` runs, and then the prune
    result = consumer.cli("migrate")
    _prune(consumer.slot)
    # THEN the gap is still in the outbox, for the backfill
    assert _present(pg_conn, gap) == set(gap)
    # AND migrate refused, created no slot, and named the backfill from the last shipped commit
    assert result.returncode == 2, result.stderr
    failure = json.loads(result.stderr.strip().splitlines()[-1])
    assert failure["error"].startswith(f"replication slot {consumer.slot} does not exist")
    assert f"backfill --since {last_shipped.astimezone(UTC).isoformat()}" in failure["hint"]
    assert consumer.slot_row() is None


def _slot_passed(postgres_url: str, slot: str, event_ids: list[str]) -> bool:
    """The slot's catalog_xmin (the oldest transaction still running at a position it has
    passed) is newer than the transactions that wrote `event_ids`."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        [[passed]] = conn.execute(
            "SELECT bool_and(age(o.xmin) > age(s.catalog_xmin)) FROM event_outbox o,"
            " pg_replication_slots s WHERE s.slot_name = %s AND o.event_id::text = ANY(%s)",
            (slot, event_ids),
        ).fetchall()
    return bool(passed)


def test_rows_whose_commit_time_is_unknown_go_once_the_slot_has_passed_them(
    make_consumer, clickhouse_server, postgres_server, postgres_url
):
    """Rows the server keeps no commit time for (committed while track_commit_timestamp was off,
    as rows older than its commit-timestamp horizon also read) are kept while the slot has not
    passed them, and pruned once it has: the outbox does not grow without end."""
    # GIVEN a consumer that has shipped and stopped
    consumer = make_consumer(clickhouse_server.url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        _ship_and_stop(consumer, conn, "prune-known")
    # AND rows committed while the server kept no commit timestamps
    with (
        commit_timestamps_off(postgres_server, postgres_url),
        psycopg.connect(postgres_url, autocommit=True) as conn,
    ):
        unknown = publish_probes(conn, 3, "prune-unknown-commit-time")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert {_commit_time(conn, event_id) for event_id in unknown} == {None}
        # WHEN pruning runs before the consumer has shipped them
        _prune(consumer.slot)
        # THEN they stay
        assert _present(conn, unknown) == set(unknown)
        # WHEN the consumer ships them and passes a running-transactions record after them
        consumer.start()
        conn.execute("SELECT pg_log_standby_snapshot()")
        later = publish_probes(conn, 1, "prune-after-unknown")
        _wait_shipped(conn, consumer, later[0])
        wait_for(
            lambda: _slot_passed(postgres_url, consumer.slot, unknown),
            what="the slot's catalog_xmin past the rows",
        )
        assert consumer.stop() == 0
        # THEN pruning removes them, and each is in ClickHouse
        _prune(consumer.slot)
        assert _present(conn, unknown) == set()
    quoted = ",".join(f"'{event_id}'" for event_id in unknown)
    assert clickhouse_select(
        clickhouse_server.url,
        f"SELECT count(), uniqExact(event_id) FROM event_log WHERE event_id IN ({quoted})",
    ) == [[3, 3]]


def test_a_row_another_slot_has_not_shipped_stays_until_it_has(
    make_consumer, clickhouse_server, pg_conn
):
    """Two slots stream one outbox (OUTBOX_SLOTS names both): a row the first has
    shipped and the second has not is kept, by both rules, until the second ships it too.
    Before, the prune read one slot's progress and had no way to hear of the second."""
    behind = make_consumer(clickhouse_server.url)
    behind.migrate()  # its slot holds the WAL from here; it has shipped nothing yet
    ahead, ids = _ship_and_stop(make_consumer(clickhouse_server.url), pg_conn, "prune-two")
    slots = [ahead.slot, behind.slot]
    result = outbox_prune(
        slots=slots, retention=timedelta(0), commit_margin=timedelta(0), chunk_rows=1000
    )
    assert result.deleted == 0
    assert _present(pg_conn, ids) == set(ids)
    # WHEN the second slot's consumer has shipped them as well
    behind.start()
    _wait_shipped(pg_conn, behind, ids[-1])
    assert behind.stop() == 0
    # THEN they go
    result = outbox_prune(
        slots=slots, retention=timedelta(0), commit_margin=timedelta(0), chunk_rows=1000
    )
    assert _present(pg_conn, ids) == set()


def _assert_prune_stopped_by(slot: str, *, listed: str, kept: list[str], pg_conn) -> None:
    """A prune of `listed` alone deletes nothing, names `slot` as why, and `kept` stay."""
    result = outbox_prune(
        slots=[listed], retention=timedelta(0), commit_margin=timedelta(0), chunk_rows=1000
    )
    assert result.deleted == 0
    assert result.skipped_reason is not None
    assert slot in result.skipped_reason
    assert _present(pg_conn, kept) == set(kept)


def test_a_streaming_slot_left_out_of_outbox_slots_stops_the_prune(
    make_consumer, clickhouse_server, pg_conn
):
    """A slot of this database that has recorded progress but is not in the prune's slots (a
    shard left out of OUTBOX_SLOTS) stops the prune, naming it: the prune cannot wait for a
    slot it does not know, and its unshipped rows would go."""
    # GIVEN a slot that shipped something and stopped, so it holds everything after
    unlisted, _ = _ship_and_stop(make_consumer(clickhouse_server.url), pg_conn, "prune-unlisted")
    # AND rows another slot has shipped since, which the first has not
    listed, ids = _ship_and_stop(make_consumer(clickhouse_server.url), pg_conn, "prune-unlisted")
    _assert_prune_stopped_by(unlisted.slot, listed=listed.slot, kept=ids, pg_conn=pg_conn)


def test_a_migrated_slot_that_has_not_shipped_yet_also_stops_the_prune(
    make_consumer, clickhouse_server, pg_conn
):
    """A slot whose publication migrate made (its record names the slot) counts as streaming
    the outbox before its consumer ever recorded progress: left out of the prune's slots, it
    stops the prune too (a shard that crash-loops at start loses nothing to it)."""
    listed, ids = _ship_and_stop(make_consumer(clickhouse_server.url), pg_conn, "prune-fresh")
    fresh = make_consumer(clickhouse_server.url, CDC_SHARD="0/2")
    fresh.migrate()
    _assert_prune_stopped_by(fresh.slot, listed=listed.slot, kept=ids, pg_conn=pg_conn)
