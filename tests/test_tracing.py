"""Sentry tracing of batches: one `cdc.batch` transaction per batch, with its spans and the
trace ids of the requests whose events it carries; nothing traced without a DSN."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sentry_sdk
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from cdc_consumer import migrations
from cdc_consumer.batch import Batch, BatchBuilder
from cdc_consumer.clickhouse import connect
from cdc_consumer.clickhouse_sink import ClickHouseSink
from cdc_consumer.delivery import SinkWorker
from cdc_consumer.event_log import EventLogEncoder
from cdc_consumer.observability import configure_sentry
from cdc_consumer.outbox import OUTBOX_COLUMNS
from cdc_consumer.pgoutput import Column, Relation
from cdc_consumer.settings import ConsumerSettings
from cdc_consumer.sink import SourcePosition
from cdc_consumer.tracing import BATCH_TRANSACTION, BatchTracer, TraceIds
from tests.support.fix_consumer import Consumer, current_wal_lsn, wait_for
from tests.support.sentry_ingest import SentryIngest

POISON = '{"a.b": 1, "a": {"b": 2}}'  # ClickHouse's JSON type: "Duplicate path found"


@pytest.fixture
def sentry_ingest() -> Iterator[SentryIngest]:
    """A Sentry ingest endpoint on 127.0.0.1 for a consumer subprocess to send to."""
    ingest = SentryIngest()
    yield ingest
    ingest.close()


def _publish(
    conn: psycopg.Connection[Any], marker: str, trace_id: str | None, contexts: list[str]
) -> None:
    """One transaction of outbox rows published under `trace_id` (as `publish` records it)."""
    with conn.transaction():
        for n, context in enumerate(contexts):
            conn.execute(
                "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
                " event_context, metadata_version, trace_id)"
                " VALUES (gen_random_uuid(), 'traced_test', clock_timestamp(), 'test',"
                " %s::jsonb || jsonb_build_object('marker', %s::text, 'n', %s::int), 1, %s)",
                (context, marker, n, trace_id),
            )


def _traced_consumer(make_consumer, clickhouse_server, ingest: SentryIngest, **env: str):
    consumer: Consumer = make_consumer(
        clickhouse_server.url,
        SENTRY_DSN=ingest.dsn,
        SENTRY_TRACES_SAMPLE_RATE="1.0",
        CDC_BATCH_MAX_SECONDS="0.5",
        **env,
    )
    consumer.migrate()
    return consumer


def _ops(transaction: dict[str, Any]) -> list[str]:
    """The transaction's spans in start order."""
    spans = sorted(transaction["spans"], key=lambda span: span["start_timestamp"])
    return [span["op"] for span in spans]


def _span(transaction: dict[str, Any], op: str) -> dict[str, Any]:
    spans: list[dict[str, Any]] = [span for span in transaction["spans"] if span["op"] == op]
    [span] = spans
    return span


def _assert_no_event_context(ingest: SentryIngest, marker: str) -> None:
    """No envelope holds a value of an event's context (every context carries `marker`), and
    no transaction even names the column. (An error event may: ClickHouse's refusal of a row
    says "while reading the value of key event_context".)"""
    assert ingest.bodies
    for body in ingest.bodies:
        assert marker.encode() not in body
        assert b'"event_context' not in body
    for transaction in ingest.items("transaction"):
        assert "event_context" not in json.dumps(transaction)


@pytest.mark.e2e
def test_each_batch_is_one_transaction_with_spans_and_its_trace_ids(
    make_consumer, clickhouse_server, pg_conn, sentry_ingest
):
    """Every batch written is one confirmed `cdc.batch` transaction with decode, queue, insert
    and confirm spans, tagged with the distinct trace ids of its events and nothing of them."""
    # GIVEN a consumer tracing every batch, and events of two requests and of an untraced one
    consumer = _traced_consumer(make_consumer, clickhouse_server, sentry_ingest)
    marker = uuid.uuid4().hex
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    consumer.migrate()
    _publish(pg_conn, marker, first, ['{"k": 1}'] * 3)
    _publish(pg_conn, marker, second, ['{"k": 2}'] * 2)
    _publish(pg_conn, marker, None, ['{"k": 3}'])
    # WHEN the consumer ships them and is stopped
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    written = [e for e in consumer.log_events() if e["event"] == "batch written"]
    # THEN each batch written is one transaction, confirmed, and together they hold the rows
    transactions = _sent_batches(sentry_ingest)
    assert len(transactions) == len(written)
    assert sum(t["contexts"]["trace"]["data"]["rows"] for t in transactions) == 6
    for transaction in transactions:
        assert transaction["tags"]["cdc.outcome"] == "confirmed"
        assert transaction["contexts"]["trace"]["status"] == "ok"
        assert _ops(transaction) == ["cdc.decode", "cdc.queue", "cdc.insert", "cdc.confirm"]
        assert _span(transaction, "cdc.insert")["status"] == "ok"
    # AND the trace ids of the requests lead to the batch that shipped their events
    carried = [set(_span(t, "cdc.decode")["data"]["cdc.trace_ids"]) for t in transactions]
    assert set().union(*carried) == {first, second}
    [batch] = [t for t in transactions if first in _span(t, "cdc.decode")["data"]["cdc.trace_ids"]]
    assert first in batch["tags"]["cdc.trace_ids"].split(",")
    decode = _span(batch, "cdc.decode")["data"]
    assert decode["cdc.trace_ids.count"] == len(decode["cdc.trace_ids"])
    # AND no envelope carries an event's context
    _assert_no_event_context(sentry_ingest, marker)


@pytest.mark.e2e
def test_dead_lettered_row_shows_in_its_batch_as_a_dead_letter_span(
    make_consumer, clickhouse_server, pg_conn, sentry_ingest
):
    """A batch with a row ClickHouse refuses shows the refused insert, the halves, the row's
    dead-letter write and the confirm; no envelope carries the row's context."""
    # GIVEN a consumer tracing every batch, and one transaction holding a poison row
    consumer = _traced_consumer(make_consumer, clickhouse_server, sentry_ingest)
    marker = uuid.uuid4().hex
    trace_id = uuid.uuid4().hex
    _publish(pg_conn, marker, trace_id, ['{"k": 1}', POISON, '{"k": 3}', '{"k": 4}'])
    # WHEN the consumer ships it
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN its batch's transaction holds a failed insert, a dead-letter span and the confirm
    [batch] = [
        t for t in _sent_batches(sentry_ingest) if trace_id in t["tags"].get("cdc.trace_ids", "")
    ]
    ops = _ops(batch)
    assert ops[:3] == ["cdc.decode", "cdc.queue", "cdc.insert"]
    assert ops[-1] == "cdc.confirm"
    assert ops.count("cdc.dead_letter") == 1
    inserts = [span for span in batch["spans"] if span["op"] == "cdc.insert"]
    refused = [span for span in inserts if span["status"] != "ok"]
    assert refused
    assert {span["data"]["cdc.error_kind"] for span in refused} == {"poison_event"}
    assert sum(span["data"]["rows"] for span in inserts if span["status"] == "ok") == 3
    assert _span(batch, "cdc.dead_letter")["data"]["rows"] == 1
    assert batch["tags"]["cdc.outcome"] == "confirmed"
    # AND the dead-letter error event belongs to the batch's trace
    [dead] = [e for e in sentry_ingest.items("event") if "event dead-lettered" in json.dumps(e)]
    assert dead["contexts"]["trace"]["trace_id"] == batch["contexts"]["trace"]["trace_id"]
    # AND nothing sent to Sentry, transaction or error event, holds the row's context
    _assert_no_event_context(sentry_ingest, marker)


@pytest.mark.e2e
def test_batches_are_sampled_by_sentry_traces_sample_rate(
    make_consumer, clickhouse_server, pg_conn, sentry_ingest
):
    """With SENTRY_DSN set and SENTRY_TRACES_SAMPLE_RATE at its default (0) batches ship and no
    transaction is sent; the same consumer at 1.0 sends one for the next batch."""
    # GIVEN a consumer with Sentry on and tracing at the default rate
    consumer = make_consumer(clickhouse_server.url, SENTRY_DSN=sentry_ingest.dsn)
    consumer.migrate()
    marker = uuid.uuid4().hex
    untraced, traced = uuid.uuid4().hex, uuid.uuid4().hex
    # WHEN it ships a batch and stops (the SDK flushes what it holds at exit)
    _publish(pg_conn, marker, untraced, ['{"k": 1}'] * 3)
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN the batch was written and no transaction reached Sentry
    assert [e for e in consumer.log_events() if e["event"] == "batch written"]
    assert sentry_ingest.items("transaction") == []
    # WHEN it runs again at 1.0 and ships another batch
    consumer.env["SENTRY_TRACES_SAMPLE_RATE"] = "1.0"
    _publish(pg_conn, marker, traced, ['{"k": 2}'] * 2)
    consumer.start()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN that batch, and only it, is a transaction
    [batch] = _sent_batches(sentry_ingest)
    assert batch["tags"]["cdc.trace_ids"] == traced
    _assert_no_event_context(sentry_ingest, marker)


@pytest.mark.e2e
def test_batch_left_to_the_slot_at_a_stop_ends_abandoned(
    make_consumer, clickhouse_faults, pg_conn, sentry_ingest
):
    """A batch whose insert ClickHouse holds past the stop's grace is not confirmed: its
    transaction ends aborted, tagged abandoned, without a confirm span (nor the insert, which
    never ended)."""
    # GIVEN a traced consumer with a short grace, and an insert ClickHouse does not answer
    consumer = _traced_consumer(
        make_consumer, clickhouse_faults, sentry_ingest, CDC_SHUTDOWN_GRACE_SECONDS="1"
    )
    consumer.start()
    marker, trace_id = uuid.uuid4().hex, uuid.uuid4().hex
    clickhouse_faults.hold_inserts()
    _publish(pg_conn, marker, trace_id, ['{"k": 1}'] * 2)
    clickhouse_faults.wait_for_held_inserts()
    # WHEN it is stopped: the grace runs out with the batch unconfirmed
    assert consumer.stop() == 1
    # THEN its transaction says so
    [batch] = _sent_batches(sentry_ingest)
    assert batch["tags"]["cdc.trace_ids"] == trace_id
    assert batch["tags"]["cdc.outcome"] == "abandoned"
    assert batch["contexts"]["trace"]["status"] == "aborted"
    assert "cdc.confirm" not in _ops(batch)
    assert _ops(batch)[:2] == ["cdc.decode", "cdc.queue"]
    _assert_no_event_context(sentry_ingest, marker)


def _sent_batches(ingest: SentryIngest) -> list[dict[str, Any]]:
    """The cdc.batch transactions received; the SDK sent them before the consumer exited."""
    wait_for(lambda: ingest.transactions(BATCH_TRANSACTION), timeout=10, what="cdc.batch")
    return ingest.transactions(BATCH_TRANSACTION)


def _relation() -> Relation:
    """The outbox's Relation message, with a column the encoder does not read first."""
    return Relation(
        relation_id=1,
        namespace="public",
        name="event_outbox",
        replica_identity="d",
        columns=tuple(
            Column(flags=0, name=name, type_oid=25, type_modifier=-1)
            for name in ("created_at", *OUTBOX_COLUMNS)
        ),
    )


def _settings(**env: Any) -> ConsumerSettings:
    return ConsumerSettings(
        database_url=SecretStr("postgresql://u@127.0.0.1:1/db"),
        clickhouse_url=SecretStr("http://u:p@127.0.0.1:1/default"),
        **env,
    )


def test_tracer_is_off_without_a_dsn_and_on_with_one(clickhouse_server, sentry_ingest):
    """Without SENTRY_DSN the hot path keeps the plain encoder and nothing is traced; with it
    (initialised as the consumer's entry point does) the real encoder, sink worker and
    ClickHouse sink ship a batch as one transaction carrying its rows' trace id."""
    # GIVEN no DSN: the tracer is off and the encoder the plain one
    off = BatchTracer.for_settings(_settings(sentry_traces_sample_rate=1.0))
    assert not off.active
    assert type(off.encoder(_relation(), source="s", timeline=1)) is EventLogEncoder
    # GIVEN Sentry initialised from settings with a DSN and a sample rate
    settings = _settings(sentry_dsn=sentry_ingest.dsn, sentry_traces_sample_rate=1.0)
    configure_sentry(
        dsn=settings.sentry_dsn,
        environment=settings.environment,
        traces_sample_rate=settings.sentry_traces_sample_rate,
    )
    transport = connect(clickhouse_server.url)
    try:
        migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
        tracer = BatchTracer.for_settings(settings)
        assert tracer.active
        worker = SinkWorker(
            ClickHouseSink(transport, source="tracing_test"), retry_cap_seconds=1, tracer=tracer
        )
        # WHEN two rows of one request are encoded, cut, written and confirmed
        trace_id = uuid.uuid4().hex
        encoder = tracer.encoder(_relation(), source="tracing_test", timeline=1)
        rows = [
            encoder.encode(
                [
                    b"2026-12-01 12:00:00+00",
                    str(uuid.uuid4()).encode(),
                    b"traced_test",
                    b"2026-12-01 12:00:00+00",
                    b"test",
                    b'{"n": 1}',
                    b"1",
                    trace_id.encode(),
                ],
                SourcePosition(100, seq),
            )
            for seq in range(2)
        ]
        batch = Batch(rows=rows, nbytes=sum(map(len, rows)), confirm_lsn=101)
        tracer.cut(batch)
        assert worker.submit(batch, timeout=10)
        wait_for(lambda: worker.durable_lsn == 101, timeout=30, what="the batch durable")
        tracer.confirmed(worker.durable_lsn)
        worker.stop(abort=False, deadline=time.monotonic() + 10)
        sentry_sdk.flush()
        # THEN one transaction with the batch's spans and its trace id arrived
        [sent] = _sent_batches(sentry_ingest)
        assert _ops(sent) == ["cdc.decode", "cdc.queue", "cdc.insert", "cdc.confirm"]
        assert sent["tags"]["cdc.trace_ids"] == trace_id
        assert sent["contexts"]["trace"]["data"]["rows"] == 2
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)  # inactive again, as without a DSN
        transport.close()


# A row's trace id: one of a few requests, or none (published with tracing off).
_trace = st.sampled_from([b"a" * 32, b"b" * 32, b"c" * 32, None])


@given(
    transactions=st.lists(st.lists(_trace, min_size=1, max_size=8), max_size=12),
    max_rows=st.integers(1, 6),
)
def test_batch_carries_exactly_the_trace_ids_of_its_rows(transactions, max_rows):
    """Cut by the real batch builder (split transactions, carried-over rows), each batch's
    trace ids are the distinct ids of the rows it holds."""
    builder = BatchBuilder(max_rows=max_rows, max_bytes=10**9, max_seconds=60)
    trace_ids = TraceIds()
    traces_of: dict[bytes, bytes | None] = {}
    batches: list[Batch] = []
    for n, transaction in enumerate(transactions):
        for m, trace_id in enumerate(transaction):
            row = json.dumps([n, m]).encode()
            traces_of[row] = trace_id
            trace_ids.note(trace_id)
            batches += builder.add(row)
        cut = builder.commit(n + 1)
        if cut is not None:
            batches.append(cut)
    last = builder.drain_committed()
    if last is not None:
        batches.append(last)
    for batch in batches:
        expected = {traces_of[row] for row in batch.rows} - {None}
        got = trace_ids.take(len(batch.rows), collect=True)
        assert sorted(got) == sorted(t.decode() for t in expected if t is not None)
        assert len(got) == len(set(got))
