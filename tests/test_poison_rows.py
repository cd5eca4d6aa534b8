"""Rows ClickHouse refuses are isolated into the dead-letter table; the stream moves on."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db import transaction

from tests.support.fix_clickhouse import clickhouse_select as _select
from tests.support.fix_consumer import current_wal_lsn
from web.outbox.events import Event
from web.outbox.publish import publish

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
