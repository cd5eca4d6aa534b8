"""Rows ClickHouse refuses are isolated into the dead-letter table; the stream moves on.

The same goes for batches too large for the server or a proxy in front of it: they are halved
until they fit, and a row too large on its own is dead-lettered.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import transaction

from tests.support.fix_clickhouse import ClickHouseServer
from tests.support.fix_clickhouse import clickhouse_select as _select
from tests.support.fix_consumer import WAIT_SECONDS, Consumer, current_wal_lsn
from web.outbox.events import Event
from web.outbox.publish import publish, publish_many

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


class AuditNoted(Event):
    """A test event whose free-form payload can hold what ClickHouse's JSON type refuses."""

    event_type = "audit_noted_test"
    marker: str
    payload: dict[str, Any]


def test_rejected_row_is_dead_lettered_and_the_rest_delivered(
    make_consumer, clickhouse_server, pg_conn
):
    """A context the JSON column rejects lands in event_log_dead_letter; its neighbours arrive."""
    # GIVEN a consumer whose batches will mix good and poison rows
    consumer = make_consumer(clickhouse_server.url, CDC_BATCH_MAX_SECONDS="0.5")
    consumer.migrate()
    marker = uuid.uuid4().hex
    poison = {"a.b": 1, "a": {"b": 2}}  # "Duplicate path found" in ClickHouse's JSON type
    # WHEN good and poison events are published, alone and inside one transaction
    publish(event=AuditNoted(marker=marker, payload={"n": 1}))
    publish(event=AuditNoted(marker=marker, payload=poison))
    with transaction.atomic():
        for n in range(2, 12):
            publish(event=AuditNoted(marker=marker, payload=poison if n == 7 else {"n": n}))
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN the 10 good events are in event_log, the 2 poison ones in the dead-letter table
    good = _select(
        clickhouse_server.url,
        "SELECT toString(event_context.payload.n) FROM event_log"
        f" WHERE event_type = 'audit_noted_test' AND event_context_raw LIKE '%{marker}%'"
        " ORDER BY source_lsn, source_seq",
    )
    assert [row[0] for row in good] == [str(n) for n in range(1, 12) if n != 7]
    dead = _select(
        clickhouse_server.url,
        "SELECT event_id, row, error FROM event_log_dead_letter"
        f" WHERE row LIKE '%{marker}%' ORDER BY source_lsn, source_seq",
    )
    assert len(dead) == 2
    outbox_ids = {
        row[0]
        for row in pg_conn.execute(
            "SELECT event_id::text FROM event_outbox WHERE event_context->>'marker' = %s"
            " AND event_context->'payload' ? 'a.b'",
            (marker,),
        ).fetchall()
    }
    assert {row[0] for row in dead} == outbox_ids
    for _event_id, row, error in dead:
        assert '\\"a.b\\": 1' in row  # the raw context, as PostgreSQL stored it
        assert "Duplicate path" in error
    logged = [e for e in consumer.log_events() if e["event"] == "event dead-lettered"]
    assert len(logged) == 2
    assert all("hint" in e for e in logged)


# chDB's own words when an insert passes max_memory_usage (26.9), for a fault hook to answer.
QUERY_MEMORY_LIMIT = (
    "Query memory limit exceeded: would use 4.00 MiB (attempt to allocate chunk of 4.00 MiB),"
    " maximum: 976.56 KiB: (while reading the value of key event_context)"
)


def _landed(url: str, event_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Rows and distinct event ids of these events in event_log and in the dead-letter table
    (no FINAL: a doubled row would show)."""
    quoted = ",".join(f"'{event_id}'" for event_id in event_ids)
    landed = {}
    for table in ("event_log", "event_log_dead_letter"):
        [[rows, distinct]] = _select(
            url,
            f"SELECT count(), uniqExact(event_id) FROM {table}"
            f" WHERE toString(event_id) IN ({quoted})",
        )
        landed[table] = (int(rows), int(distinct))
    return landed


def _log_lines(consumer: Consumer, event: str) -> list[dict[str, Any]]:
    return [e for e in consumer.log_events() if e["event"] == event]


def _publish_padded(marker: str, count: int, pad: int) -> list[str]:
    """`count` events in one transaction, each context padded to about `pad` bytes."""
    events = [AuditNoted(marker=marker, payload={"n": n, "pad": "x" * pad}) for n in range(count)]
    return [str(event_id) for event_id in publish_many(events)]


def test_batch_over_a_proxy_body_limit_is_halved_until_it_fits(
    make_consumer, clickhouse_faults, pg_conn
):
    """A proxy answering 413 to a big insert: the batch is halved until the parts pass."""
    # GIVEN a proxy that refuses request bodies over 8 KiB, as nginx's client_max_body_size does
    consumer = make_consumer(clickhouse_faults.url, CDC_BATCH_MAX_SECONDS="0.5")
    consumer.migrate()
    clickhouse_faults.fail_inserts_over(8 * 1024, code=0, status=413)
    consumer.start()
    # WHEN one transaction publishes 40 events of about 600 encoded bytes (24 KiB together)
    event_ids = _publish_padded(uuid.uuid4().hex, 40, 200)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    # THEN every event is in event_log once, none dead-lettered, and the consumer ran on
    assert _landed(clickhouse_faults.url, event_ids) == {
        "event_log": (40, 40),
        "event_log_dead_letter": (0, 0),
    }
    assert consumer.stop() == 0
    halvings = _log_lines(consumer, "batch too large, halving")
    assert halvings
    assert all("413" in e["error"] for e in halvings)
    assert clickhouse_faults.stats()["failed_inserts"] == len(halvings)


def test_insert_over_max_partitions_per_insert_block_is_halved_until_it_fits(
    make_consumer, clickhouse_server, pg_conn
):
    """150 months in one batch (TOO_MANY_PARTS, over 100 partitions): halves of 75 land."""
    # GIVEN a consumer and ClickHouse's default max_partitions_per_insert_block of 100
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    # WHEN one transaction publishes 150 events, one per month (event_log is partitioned by it)
    rows = pg_conn.execute(
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version)"
        " SELECT gen_random_uuid(), 'months_test', timestamptz '2010-01-15 00:00+00'"
        " + make_interval(months => g), 'test', jsonb_build_object('n', g), 1"
        " FROM generate_series(1, 150) AS g RETURNING event_id::text"
    ).fetchall()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    # THEN all 150 are in event_log once, none dead-lettered
    event_ids = [row[0] for row in rows]
    assert _landed(clickhouse_server.url, event_ids) == {
        "event_log": (150, 150),
        "event_log_dead_letter": (0, 0),
    }
    assert consumer.stop() == 0
    halvings = _log_lines(consumer, "batch too large, halving")
    assert [e["rows"] for e in halvings] == [150]
    assert "Too many partitions" in halvings[0]["error"]


def test_row_too_large_on_its_own_is_dead_lettered_and_the_rest_delivered(
    make_consumer, clickhouse_faults, pg_conn
):
    """An event over the query memory limit even alone goes to the dead-letter table, whole."""
    # GIVEN a server whose memory limit refuses event_log inserts over 8 KiB, not dead letters
    consumer = make_consumer(clickhouse_faults.url, CDC_BATCH_MAX_SECONDS="0.5")
    consumer.migrate()
    clickhouse_faults.fail_inserts_over(
        8 * 1024, code=241, message=QUERY_MEMORY_LIMIT, table="event_log"
    )
    consumer.start()
    # WHEN a transaction holds ten small events around one of about 10 KiB
    marker = uuid.uuid4().hex
    events = [AuditNoted(marker=marker, payload={"n": n}) for n in range(10)]
    events.insert(5, AuditNoted(marker=marker, payload={"pad": "x" * 10_000}))
    event_ids = [str(event_id) for event_id in publish_many(events)]
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    # THEN the small ones are in event_log, the large one in the dead-letter table with its row
    assert _landed(clickhouse_faults.url, event_ids) == {
        "event_log": (10, 10),
        "event_log_dead_letter": (1, 1),
    }
    [[row, error]] = _select(
        clickhouse_faults.url,
        f"SELECT row, error FROM event_log_dead_letter WHERE event_id = '{event_ids[5]}'",
    )
    assert marker in row
    assert len(row) > 20_000  # the context twice: queryable JSON and the raw text
    assert "Query memory limit exceeded" in error
    assert consumer.stop() == 0
    assert len(_log_lines(consumer, "event dead-lettered")) == 1


POISON_CONTEXT = {"a.b": 1, "a": {"b": 2}}  # "Duplicate path found" in ClickHouse's JSON type
DEAD_LETTER_DATA_ERROR = "Cannot parse input: expected '\"' before: 'x' (dead-letter test)"


@dataclass(frozen=True)
class _Refusal:
    """How the dead-letter record of an event gets refused, and the event that leads there."""

    inject: Callable[[ClickHouseServer], None]
    payload: dict[str, Any]
    error: str  # what the stored error names


_REFUSALS = {
    # a proxy's body limit refuses the row in event_log and its (larger) dead-letter record
    "too-large": _Refusal(
        lambda faults: faults.fail_inserts_over(8 * 1024, code=0, status=413),
        {"pad": "x" * 10_000},
        "HTTP status 413",
    ),
    # ClickHouse rejects the row, then the dead-letter insert fails on its data once
    "data-error": _Refusal(
        lambda faults: faults.fail_inserts(
            1, code=27, message=DEAD_LETTER_DATA_ERROR, table="event_log_dead_letter"
        ),
        POISON_CONTEXT,
        "dead-letter test",
    ),
}


@pytest.mark.parametrize("refusal", _REFUSALS.values(), ids=_REFUSALS)
def test_refused_dead_letter_record_is_stored_minimal_and_the_stream_moves_on(
    make_consumer, clickhouse_faults, pg_conn, refusal: _Refusal
):
    """A dead-letter record ClickHouse refuses is stored without the row text; nothing stops."""
    # GIVEN a consumer, and ClickHouse refusing one event's row and then its dead-letter record
    consumer = make_consumer(clickhouse_faults.url, CDC_BATCH_MAX_SECONDS="0.5")
    consumer.migrate()
    refusal.inject(clickhouse_faults)
    consumer.start()
    # WHEN a transaction holds that event between good ones
    marker = uuid.uuid4().hex
    events = [AuditNoted(marker=marker, payload={"n": n}) for n in range(6)]
    events.insert(3, AuditNoted(marker=marker, payload=refusal.payload))
    event_ids = [str(event_id) for event_id in publish_many(events)]
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    # THEN the good ones are in event_log, and the event has a dead-letter record of its
    # position, id and errors, with the row text left out
    assert _landed(clickhouse_faults.url, event_ids) == {
        "event_log": (6, 6),
        "event_log_dead_letter": (1, 1),
    }
    [[source_lsn, row, error]] = _select(
        clickhouse_faults.url,
        "SELECT source_lsn, row, error FROM event_log_dead_letter"
        f" WHERE event_id = '{event_ids[3]}'",
    )
    assert row == ""
    assert source_lsn > 0
    assert refusal.error in error
    assert consumer.stop() == 0
    assert len(_log_lines(consumer, "dead letter refused, storing a minimal record")) == 1
    assert [e["row_kept"] for e in _log_lines(consumer, "event dead-lettered")] == [False]


def _replayable_inserts(pg_conn, consumer: Consumer) -> int:
    """Insert messages the (inactive) slot would replay to its next consumer."""
    [[count]] = pg_conn.execute(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
        " 'proto_version', '1', 'publication_names', %s) WHERE get_byte(data, 0) = ascii('I')",
        (consumer.slot, consumer.env["CDC_PUBLICATION"]),
    ).fetchall()
    return int(count)


def test_dead_letter_table_refusing_even_a_minimal_record_stops_with_a_hint(
    make_consumer, clickhouse_faults, pg_conn
):
    """Dead-letter inserts failing on any data: exit 2 naming the table, the slot kept there."""
    # GIVEN a consumer, and ClickHouse failing every dead-letter insert on its data
    consumer = make_consumer(clickhouse_faults.url)
    consumer.migrate()
    clickhouse_faults.fail_inserts(
        100, code=27, message=DEAD_LETTER_DATA_ERROR, table="event_log_dead_letter"
    )
    consumer.start()
    # WHEN an event ClickHouse rejects is published
    [event_id] = publish_many([AuditNoted(marker=uuid.uuid4().hex, payload=POISON_CONTEXT)])
    # THEN the consumer stops by itself with exit code 2, after trying the minimal record too
    assert consumer.process is not None
    consumer.process.wait(timeout=WAIT_SECONDS)
    assert consumer.stop() == 2
    assert 100 - clickhouse_faults.stats()["pending_failures"] == 2
    [stopped] = _log_lines(consumer, "pipeline stopped")
    assert stopped["kind"] == "configuration"
    assert "event_log_dead_letter" in stopped["hint"]
    assert "Traceback" not in consumer.log_text()
    # AND the event is in neither table, and the slot still holds it for the next run
    assert _landed(clickhouse_faults.url, [str(event_id)]) == {
        "event_log": (0, 0),
        "event_log_dead_letter": (0, 0),
    }
    assert _replayable_inserts(pg_conn, consumer) == 1


def test_halving_interrupted_by_a_kill_resumes_without_loss_or_duplicates(
    make_consumer, clickhouse_faults, merges_stopped, pg_conn
):
    """A consumer killed half way through isolating a poison row: after the restart each good
    event is in event_log once and the poison one in the dead-letter table once."""
    faults = clickhouse_faults
    consumer = make_consumer(faults.url, CDC_BATCH_MAX_SECONDS="0.5")
    consumer.migrate()
    marker = uuid.uuid4().hex
    consumer.start()
    # GIVEN a transaction of 20 events whose 16th ClickHouse refuses, and a server that lets
    # two inserts through (the whole batch, refused, and its first half, landing) and then
    # holds the next
    faults.hold_inserts(after=2)
    with transaction.atomic():
        for n in range(20):
            payload = {"a.b": 1, "a": {"b": 2}} if n == 15 else {"n": n}
            publish(event=AuditNoted(marker=marker, payload=payload))
    faults.wait_for_held_inserts()
    # WHEN the consumer is killed there, and restarted
    assert consumer.stop(signal.SIGKILL) == -signal.SIGKILL
    faults.release_inserts()
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN the restart skipped the landed half, and nothing is lost or doubled (merges stopped)
    streaming = [e for e in consumer.log_events() if e.get("event") == "streaming"]
    assert streaming[-1]["stored_rows"] == 10
    good = _select(
        faults.url,
        "SELECT count(), uniqExact(event_id) FROM event_log"
        f" WHERE event_context_raw LIKE '%{marker}%'",
    )
    dead = _select(
        faults.url, f"SELECT count() FROM event_log_dead_letter WHERE row LIKE '%{marker}%'"
    )
    assert (good, dead) == ([[19, 19]], [[1]])


def test_transaction_larger_than_the_byte_limit_is_cut_within_it(
    make_consumer, clickhouse_server, merges_stopped, pg_conn
):
    """Rows large enough to reach CDC_BATCH_MAX_BYTES: every insert stays within it, the
    transaction is confirmed only at its commit, and every event arrives once."""
    limit = 8192
    consumer = make_consumer(clickhouse_server.url, CDC_BATCH_MAX_BYTES=str(limit))
    consumer.migrate()
    marker = uuid.uuid4().hex
    # GIVEN one transaction of 30 events of about 1.5 KiB each (about 45 KiB)
    with transaction.atomic():
        for n in range(30):
            publish(event=AuditNoted(marker=marker, payload={"n": n, "pad": "x" * 700}))
    # WHEN it is shipped
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN no insert went over the limit, it took several, and each event is there once
    written = [e for e in consumer.log_events() if e.get("event") == "batch written"]
    assert len(written) >= 5
    assert max(e["bytes"] for e in written) <= limit
    rows = _select(
        clickhouse_server.url,
        "SELECT count(), uniqExact(event_id) FROM event_log"
        f" WHERE event_context_raw LIKE '%{marker}%'",
    )
    assert rows == [[30, 30]]
