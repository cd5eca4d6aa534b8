"""Fencing: once a new run of a source has read what is stored, no write of an earlier run
lands, whether that run was killed mid-insert or is alive and wakes from a freeze."""

from __future__ import annotations

import signal
import threading
import uuid

import psycopg
import pytest

from cdc_consumer import migrations
from cdc_consumer.clickhouse import connect
from cdc_consumer.clickhouse_sink import ClickHouseSink
from cdc_consumer.errors import ErrorKind, PipelineError
from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import (
    current_wal_lsn,
    kill_while_an_insert_executes,
    publish_probes,
    short_wal_sender_timeout,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _counts(url: str, environment: str) -> tuple[int, int]:
    ((rows, distinct),) = clickhouse_select(
        url,
        f"SELECT count(), uniqExact(event_id) FROM event_log WHERE environment = '{environment}'",
    )
    return int(rows), int(distinct)


def test_insert_of_a_superseded_run_is_refused_by_the_server(clickhouse_server):
    """Once a newer run claimed the source, an older run's insert fails as SUPERSEDED and
    writes nothing, though its client never heard of the newer run."""
    source = f"fence_{uuid.uuid4().hex[:10]}"
    environment = f"guard-{uuid.uuid4().hex[:12]}"
    row = (
        '{"event_id":"%s","event_type":"probe","event_date_time":"2026-12-01 00:00:00",'
        '"environment":"%s","event_context":{},"event_context_raw":"{}","metadata_version":1,'
        '"trace_id":"","source":"%s","source_lsn":1,"source_seq":%d}'
    )
    transport = connect(clickhouse_server.url)
    migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
    transport.close()
    older = ClickHouseSink(connect(clickhouse_server.url), source=source)
    newer = ClickHouseSink(connect(clickhouse_server.url), source=source)
    try:
        # GIVEN a run that claimed the source and wrote
        older.fence_earlier_runs()
        older.write([(row % (uuid.uuid4(), environment, source, 0)).encode()])
        # WHEN a newer run claims it, and the older one writes again
        newer.fence_earlier_runs()
        with pytest.raises(PipelineError) as refused:
            older.write([(row % (uuid.uuid4(), environment, source, 1)).encode()])
        # THEN the server refused it, and only the newer run's writes land from now on
        newer.write([(row % (uuid.uuid4(), environment, source, 2)).encode()])
    finally:
        older.close()
        newer.close()
    assert refused.value.kind is ErrorKind.SUPERSEDED
    assert _counts(clickhouse_server.url, environment) == (2, 2)


def test_fence_waits_for_an_insert_already_executing(
    make_consumer, clickhouse_faults, merges_stopped, pg_conn
):
    """A killed run's insert that the server is already executing (past cancelling) lands
    before the new run reads what is stored: its rows are skipped, not shipped again."""
    faults = clickhouse_faults
    consumer = make_consumer(faults.url)
    consumer.migrate()
    environment = f"executing-{uuid.uuid4().hex[:12]}"
    consumer.start()
    # GIVEN a consumer killed while the server executes its insert of 10 events
    kill_while_an_insert_executes(consumer, faults, pg_conn, environment)
    publish_probes(pg_conn, 10, environment)
    # WHEN the consumer restarts, and its fence is waiting on that insert
    consumer.start(streaming=False)
    wait_for(lambda: faults.stats()["waiting_kills"] == 1, what="the fence to wait for it")
    faults.release_inserts()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN the restart read saw the 10 rows, and each of the 20 events is there once (merges
    # stopped: nothing folded away)
    streaming = [e for e in consumer.log_events() if e.get("event") == "streaming"]
    assert streaming[-1]["stored_rows"] == 10
    assert _counts(faults.url, environment) == (20, 20)


def test_frozen_run_that_wakes_writes_nothing_its_successor_ships(
    make_consumer, merges_stopped, postgres_url, pg_conn
):
    """A consumer frozen (SIGSTOP) under load past wal_sender_timeout, a second one taking
    the slot over, the first woken (SIGCONT): every event is in event_log exactly once."""
    environment = f"frozen-{uuid.uuid4().hex[:12]}"
    fast = {"CDC_STATUS_INTERVAL_SECONDS": "0.5", "CDC_RETRY_MAX_SECONDS": "0.5"}
    first = make_consumer(merges_stopped.url, **fast)
    first.migrate()
    second = make_consumer(
        merges_stopped.url,
        CDC_SLOT=first.slot,
        CDC_PUBLICATION=first.env["CDC_PUBLICATION"],
        **fast,
    )
    published: list[str] = []
    done = threading.Event()

    def load() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            for _ in range(2000):
                if done.is_set():
                    return
                published.extend(publish_probes(conn, 20, environment))
                done.wait(0.01)

    loader = threading.Thread(target=load, daemon=True)
    with short_wal_sender_timeout(pg_conn, "3s"):
        try:
            # GIVEN a consumer shipping under steady load
            first.start()
            loader.start()
            first.wait_confirmed(current_wal_lsn(pg_conn))
            # WHEN it freezes until its walsender times out, and a second consumer takes over
            assert first.process is not None
            first.process.send_signal(signal.SIGSTOP)
            wait_for(lambda: not first.slot_active(), what="the frozen consumer's walsender to go")
            second.start()
            second.wait_confirmed(current_wal_lsn(pg_conn))
            # AND the first wakes, holding whatever it had queued, while the second ships on
            first.process.send_signal(signal.SIGCONT)
            wait_for(
                lambda: any(
                    e.get("event") in ("superseded, standing by", "source failed, reconnecting")
                    for e in first.log_events()
                ),
                what="the woken consumer to notice it lost the slot",
            )
        finally:
            done.set()
            loader.join()
    second.wait_confirmed(current_wal_lsn(pg_conn))
    assert second.stop() == 0
    first.wait_confirmed(current_wal_lsn(pg_conn))  # it may take the slot back: nothing left
    assert first.stop() == 0
    # THEN each event is in event_log exactly once (merges stopped: nothing folded away)
    assert _counts(merges_stopped.url, environment) == (len(published), len(published))


def test_retry_of_an_insert_whose_answer_was_lost_adds_nothing(
    make_consumer, clickhouse_faults, merges_stopped, pg_conn
):
    """An insert lands but its answer is lost: the retry sends the same bytes, ClickHouse drops
    it as a duplicate, and each event is there once."""
    faults = clickhouse_faults
    consumer = make_consumer(faults.url)
    consumer.migrate()
    environment = f"lost-answer-{uuid.uuid4().hex[:12]}"
    consumer.start()
    # GIVEN a server whose answer to the next insert is lost after it landed
    faults.lose_answers(1)
    # WHEN a batch is shipped
    publish_probes(pg_conn, 25, environment)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN it was sent twice, and landed once (merges stopped: nothing folded away)
    retried = [e for e in consumer.log_events() if e.get("event") == "batch write failed, retrying"]
    assert retried, consumer.log_text()
    assert _counts(faults.url, environment) == (25, 25)


def test_cancelled_insert_is_replayed_not_confirmed_past(
    make_consumer, clickhouse_faults, merges_stopped, pg_conn
):
    """An insert the server cancels (code 394, as a fence or an operator's KILL does) is never
    confirmed past: the consumer abandons it, reconnects, and the slot replays it once."""
    faults = clickhouse_faults
    consumer = make_consumer(faults.url)
    consumer.migrate()
    environment = f"cancelled-{uuid.uuid4().hex[:12]}"
    consumer.start()
    # GIVEN a server that cancels the next insert
    faults.fail_inserts(1, code=394, message="Query was cancelled")
    # WHEN a batch is shipped, and more WAL follows while nothing of ours is buffered
    publish_probes(pg_conn, 10, environment)
    wait_for(
        lambda: any(e.get("event") == "superseded, standing by" for e in consumer.log_events()),
        what="the cancelled insert to be noticed",
    )
    pg_conn.execute("SELECT pg_logical_emit_message(true, 'unrelated', 'wal')")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN the 10 events were replayed and are there once (merges stopped)
    assert _counts(faults.url, environment) == (10, 10)


def test_retry_adds_nothing_whatever_the_profile_says_of_insert_select_dedup(
    make_consumer, clickhouse_faults, merges_stopped, pg_conn
):
    """The guarded insert is an INSERT ... SELECT, whose deduplication ClickHouse 26.2+ decides
    by `deduplicate_insert_select` before `deduplicate_insert`: a profile turning it off made
    a retried batch land twice (before the sink pinned it)."""
    faults = clickhouse_faults
    consumer = make_consumer(faults.url)
    consumer.migrate()
    environment = f"select-dedup-{uuid.uuid4().hex[:12]}"
    consumer.start()
    # GIVEN a profile without INSERT SELECT deduplication, and a lost answer to the next insert
    faults.set_profile(deduplicate_insert_select="disable")
    faults.lose_answers(1)
    # WHEN a batch is shipped (and so sent twice)
    publish_probes(pg_conn, 25, environment)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN it landed once (merges stopped: nothing folded away)
    assert _counts(faults.url, environment) == (25, 25)


def test_a_batch_whose_connection_dropped_unanswered_lands_once(
    make_consumer, clickhouse_faults, merges_stopped, pg_conn
):
    """The insert lands, then its connection closes with no answer: clickhouse-connect sends the
    same bytes again on its own (the guarded insert is a plain POST since the batch became
    the request body), and ClickHouse drops the copy by its token: each event once."""
    faults = clickhouse_faults
    consumer = make_consumer(faults.url)
    consumer.migrate()
    environment = f"dropped-{uuid.uuid4().hex[:12]}"
    consumer.start()
    inserts_before = faults.stats()["inserts"]
    # GIVEN a server that lands the next insert and then closes its connection unanswered
    faults.drop_answers(1)
    # WHEN a batch is shipped
    publish_probes(pg_conn, 25, environment)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN it was sent at least twice and is there once (merges stopped: nothing folded away)
    assert faults.stats()["inserts"] - inserts_before >= 2
    assert _counts(faults.url, environment) == (25, 25)
