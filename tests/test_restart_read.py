"""The restart read: exact for whatever part of an earlier insert landed, and bounded by the
slot's confirmed position rather than by the size of event_log."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from cdc_consumer import migrations, pgoutput
from cdc_consumer.clickhouse import connect
from cdc_consumer.clickhouse_sink import ClickHouseSink
from cdc_consumer.errors import PipelineError
from cdc_consumer.timeline import WalHistory
from tests.support.fix_clickhouse import clickhouse_command, clickhouse_select, granules_read
from tests.support.fix_consumer import (
    current_wal_lsn,
    kill_while_an_insert_executes,
    publish_probes,
    short_wal_sender_timeout,
    status_received_after,
    wait_for,
)

pytestmark = pytest.mark.e2e

FIRST = WalHistory(1)  # the session's server has never failed over


def _next_transaction(pg_conn: psycopg.Connection[Any], consumer) -> tuple[int, list[str]]:
    """The commit LSN of the first transaction the slot will send and its event ids in WAL
    order, i.e. by source_seq (peeked, not consumed; heap order can differ from WAL order)."""
    rows = pg_conn.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
        " 'proto_version', '1', 'publication_names', %s)",
        (consumer.slot, consumer.env["CDC_PUBLICATION"]),
    ).fetchall()
    begin = pgoutput.decode(bytes(rows[0][0]))
    assert isinstance(begin, pgoutput.Begin)
    event_ids: list[str] = []
    column = 0
    for (data,) in rows[1:]:
        message = pgoutput.decode(bytes(data))
        if isinstance(message, pgoutput.Relation):
            column = [c.name for c in message.columns].index("event_id")
        elif isinstance(message, pgoutput.Insert):
            event_ids.append(bytes(message.new[column]).decode())  # type: ignore[arg-type]
        elif isinstance(message, pgoutput.Commit):
            break
    return begin.final_lsn, event_ids


def test_batch_that_landed_in_part_is_completed_once(make_consumer, merges_stopped, pg_conn):
    """One transaction whose rows straddle a month boundary (two partitions, two parts) of
    which only the later month's part landed: after the restart each event is there once."""
    consumer = make_consumer(merges_stopped.url)
    consumer.migrate()
    environment = f"straddle-{uuid.uuid4().hex[:12]}"
    # GIVEN one transaction: 5 events at the end of November (seq 0-4), 5 in December (5-9)
    pg_conn.execute(
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version)"
        " SELECT gen_random_uuid(), 'probe',"
        "  CASE WHEN g <= 5 THEN timestamptz '2026-11-30 23:59:59.5+00'"
        "  ELSE timestamptz '2026-12-01 00:00:00.5+00' END, %s, jsonb_build_object('n', g), 1"
        " FROM generate_series(1, 10) AS g",
        (environment,),
    )
    commit_lsn, in_wal_order = _next_transaction(pg_conn, consumer)
    # AND only its December part in event_log, as when the insert's second part committed and
    # the first did not (a crash between the two, or a partition the server refused)
    assert len(in_wal_order) == 10
    december = [(event_id, seq) for seq, event_id in enumerate(in_wal_order)][5:]
    values = ", ".join(
        f"('{event_id}', 'probe', '2026-12-01 00:00:00.5', '{environment}', '{{}}', '{{}}', 1,"
        f" '{consumer.slot}', {commit_lsn}, {seq})"
        for event_id, seq in december
    )
    clickhouse_command(
        merges_stopped.url,
        "INSERT INTO event_log (event_id, event_type, event_date_time, environment,"
        " event_context, event_context_raw, metadata_version, source, source_lsn, source_seq)"
        f" VALUES {values}",
    )
    # WHEN the consumer starts and replays the transaction
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN every event is in event_log exactly once (merges are stopped: nothing folded away)
    rows = clickhouse_select(
        merges_stopped.url,
        "SELECT toString(event_id), count() FROM event_log"
        f" WHERE environment = '{environment}' GROUP BY event_id",
    )
    assert sorted(rows) == sorted([event_id, 1] for event_id in in_wal_order)


def test_restart_read_selects_granules_above_the_confirmed_position_only(
    make_consumer, clickhouse_server, pg_conn
):
    """With ten million older rows of the same source in event_log, the restart read selects
    the granules at or above the slot's confirmed position, not the table."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    source = consumer.slot
    # GIVEN ten million rows of this source, all below the slot's confirmed position, in a
    # month of their own (dropped afterwards, so later tests do not scan them)
    confirmed = consumer.confirmed_lsn()
    rows = 10_000_000
    clickhouse_command(
        clickhouse_server.url,
        "INSERT INTO event_log (event_id, event_type, event_date_time, environment,"
        " event_context, event_context_raw, metadata_version, source, source_lsn, source_seq)"
        " SELECT generateUUIDv4(number), 'bulk_restart_read',"
        "  toDateTime64('2001-01-01 00:00:00', 6, 'UTC') + toIntervalMicrosecond(number * 1000),"
        f"  'bulk', '{{}}', '{{}}', 1, '{source}', intDiv(number * {confirmed - 1}, {rows}), 0"
        f" FROM numbers({rows})",
    )
    sink = ClickHouseSink(connect(clickhouse_server.url), source=source)
    try:
        # WHEN the restart read runs from the confirmed position
        explained = clickhouse_select(
            clickhouse_server.url, f"EXPLAIN indexes = 1 {sink.restart_read_sql(confirmed, FIRST)}"
        )
        everything = clickhouse_select(
            clickhouse_server.url, f"EXPLAIN indexes = 1 {sink.restart_read_sql(0, FIRST)}"
        )
        stored = sink.stored_positions(confirmed, FIRST)
    finally:
        sink.close()
        clickhouse_command(clickhouse_server.url, "ALTER TABLE event_log DROP PARTITION 200101")
    # THEN event_log is read in a handful of granules, where reading from the origin reads
    # every granule of the table
    assert granules_read(explained) <= 4, explained
    assert granules_read(everything) >= rows // 8192, everything
    assert stored.rows == 0


def test_walsender_is_answered_while_the_fence_waits(
    make_consumer, clickhouse_faults, merges_stopped, pg_conn
):
    """While the fence waits on an earlier run's insert for longer than wal_sender_timeout, the
    consumer keeps sending status updates: its walsender stays, and it then ships once."""
    faults = clickhouse_faults
    consumer = make_consumer(faults.url, CDC_STATUS_INTERVAL_SECONDS="0.5")
    consumer.migrate()
    environment = f"answered-{uuid.uuid4().hex[:12]}"
    consumer.start()
    # GIVEN a consumer killed while the server executes its insert
    kill_while_an_insert_executes(consumer, faults, pg_conn, environment)
    with short_wal_sender_timeout(pg_conn, "2s"):
        try:
            # WHEN it restarts and its fence waits on that insert past the walsender's timeout
            consumer.start(streaming=False)
            wait_for(lambda: faults.stats()["waiting_kills"] == 1, what="the fence to wait")
            ((since,),) = pg_conn.execute("SELECT now()").fetchall()
            # THEN its walsender keeps hearing from it, and is still its own
            wait_for(
                lambda: status_received_after(pg_conn, consumer.slot, since, seconds=3),
                what="a status update 3 s into the fence",
            )
            assert faults.stats()["waiting_kills"] == 1
        finally:
            faults.release_inserts()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    assert "source failed, reconnecting" not in consumer.log_text()
    rows = clickhouse_select(
        faults.url,
        f"SELECT count(), uniqExact(event_id) FROM event_log WHERE environment = '{environment}'",
    )
    assert rows == [[10, 10]]


def test_batch_is_one_part_whatever_the_profile_says(
    make_consumer, clickhouse_faults, merges_stopped, pg_conn
):
    """Session settings that would cut an insert into many blocks and make it asynchronous
    (as a user profile can) leave each batch one part: the sink pins what it relies on."""
    faults = clickhouse_faults
    consumer = make_consumer(faults.url, CDC_BATCH_MAX_SECONDS="1")
    consumer.migrate()
    environment = f"profile-{uuid.uuid4().hex[:12]}"
    parts = (
        "SELECT count() FROM system.parts WHERE active AND table = 'event_log'"
        " AND database = currentDatabase()"
    )
    # GIVEN a profile that would cut 3,000 rows into 30 blocks and not wait for them
    faults.set_profile(
        min_insert_block_size_rows="100",
        min_insert_block_size_bytes="1",
        max_insert_block_size="100",
        max_block_size="100",
        async_insert="1",
        wait_for_async_insert="0",
    )
    ((before,),) = clickhouse_select(faults.url, parts)
    # WHEN one transaction of 3,000 events is shipped
    publish_probes(pg_conn, 3000, environment)
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN it landed as one part, all of it, by the time the slot was confirmed
    ((after,),) = clickhouse_select(faults.url, parts)
    rows = clickhouse_select(
        faults.url, f"SELECT count() FROM event_log WHERE environment = '{environment}'"
    )
    assert (int(after) - int(before), rows) == (1, [[3000]])


def test_restart_read_fails_rather_than_truncates_under_a_profile_limit(clickhouse_faults):
    """A user profile that would cut reads short (`*_overflow_mode = 'break'`) makes the restart
    read fail, never return fewer stored positions than there are."""
    faults = clickhouse_faults
    transport = connect(faults.url)
    migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
    transport.close()
    source = f"overflow_{uuid.uuid4().hex[:10]}"
    # GIVEN 50 stored positions of a source, one per transaction
    clickhouse_command(
        faults.url,
        "INSERT INTO event_log (event_id, event_type, event_date_time, environment,"
        " event_context, event_context_raw, metadata_version, source, source_lsn, source_seq)"
        " SELECT generateUUIDv4(number), 'probe', now64(6), 'overflow', '{}', '{}', 1,"
        f" '{source}', number + 1, 0 FROM numbers(50)",
    )
    # AND a profile whose limits would break off reads and results early
    faults.set_profile(
        max_rows_to_read="10",
        read_overflow_mode="break",
        max_result_rows="5",
        result_overflow_mode="break",
    )
    sink = ClickHouseSink(connect(faults.url), source=source)
    try:
        # WHEN the restart read runs, THEN it fails loudly instead of under-counting
        with pytest.raises(PipelineError, match="Limit for"):
            sink.stored_positions(1, FIRST)
    finally:
        sink.close()
