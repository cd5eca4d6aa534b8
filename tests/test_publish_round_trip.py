"""Awkward contexts survive publish → outbox → WAL → consumer → ClickHouse byte for byte."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
import sentry_sdk
from django.db import transaction

from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import current_wal_lsn
from web.outbox.events import Event
from web.outbox.publish import publish, publish_many

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


class OddContext(Event):
    """A test event whose free-form payload carries the awkward cases."""

    event_type = "odd_context_test"
    case: str
    payload: dict[str, Any]
    note: str | None = None


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": True}
    for level in range(depth):
        value = {f"l{level}": value}
    return value


AWKWARD: dict[str, dict[str, Any]] = {
    "astral-unicode": {
        "emoji": "🦤👩‍👩‍👧",
        "math": "\U0001d518\U0001d52b\U0001d526",
        "rtl": "שלום",
        "escapes": '"\\\n\t\u2028',
    },
    "deep-nesting": _nested(60),
    "large-numbers": {
        "max_i64": 2**63 - 1,
        "min_i64": -(2**63),
        "max_u64": 2**64 - 1,
        "big_float": 1.7976931348623157e308,
        "tiny_float": 5e-324,
        "negative_zero": -0.0,
    },
    "empty-objects": {"empty": {}, "list_of_empty": [{}, []], "inner": {"also": {}}},
    "null-fields": {"gone": None, "list": [None, 1, None], "inner": {"n": None}},
    "sixty-kib": {"blob": "x" * (60 * 1024)},
    "keys-clickhouse-would-sort": {"b": 1, "a": 2, "A": 3, "": 4},
}


def test_awkward_contexts_arrive_exactly_as_postgresql_holds_them(
    make_consumer, clickhouse_server, pg_conn
):
    """Every awkward context is in event_log once, its raw text equal to PostgreSQL's jsonb."""
    # GIVEN a migrated pipeline (the slot exists) and events with awkward contexts, published
    # one at a time and many in one transaction
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    marker = uuid.uuid4().hex
    ids = [publish(OddContext(case=case, payload=payload)) for case, payload in AWKWARD.items()]
    with transaction.atomic():
        ids += publish_many(
            OddContext(case=f"many-{case}", payload=payload, note=marker)
            for case, payload in AWKWARD.items()
        )
    with sentry_sdk.start_transaction(name="traced publish") as trace:
        traced_id = publish(OddContext(case="traced", payload={}, note=marker))
    # WHEN the consumer ships them
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN ClickHouse holds each exactly once, with the text PostgreSQL holds
    wanted = [str(i) for i in [*ids, traced_id]]
    postgres = dict(
        pg_conn.execute(
            "SELECT event_id::text, event_context::text FROM event_outbox"
            " WHERE event_id = ANY(%s::uuid[])",
            (wanted,),
        ).fetchall()
    )
    quoted = ",".join(f"'{i}'" for i in wanted)
    rows = clickhouse_select(
        clickhouse_server.url,
        "SELECT toString(event_id), event_context_raw, trace_id FROM event_log"
        f" WHERE event_id IN ({quoted})",
    )
    assert sorted(row[0] for row in rows) == sorted(wanted)  # each once: no FINAL, no dups
    clickhouse = {row[0]: row[1] for row in rows}
    assert clickhouse == postgres
    for event_id in map(str, ids):
        context = orjson.loads(clickhouse[event_id])
        case = context["case"].removeprefix("many-")
        assert context["payload"] == AWKWARD[case], case
    traces = {row[0]: row[2] for row in rows}
    assert traces[str(traced_id)] == trace.trace_id
    assert {traces[i] for i in map(str, ids)} == {""}
