"""The consumer's life: a busy slot, graceful and impatient stops, a stop in every state it
can wait in, a schema change mid-stream."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from cdc_consumer.pgoutput import str_to_lsn
from cdc_consumer.postgres import CONNECT_TIMEOUT_SECONDS
from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import (
    Consumer,
    current_wal_lsn,
    kill_while_an_insert_executes,
    publish_probes,
    wait_for,
)
from tests.support.fix_proxy import TcpProxy
from web.accounts.services import user_create

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# The stop tests' CDC_SHUTDOWN_GRACE_SECONDS, and what leaving may take beyond it: the last
# status update and progress record, and the interpreter's own exit.
GRACE_SECONDS = 2.0
LEAVE_BOUND_SECONDS = 3.0


def _count(url: str, tag: str) -> int:
    rows = clickhouse_select(
        url, f"SELECT count() FROM event_log WHERE event_context_raw LIKE '%{tag}%'"
    )
    return int(rows[0][0])


def _create(tag: str, count: int) -> None:
    for _ in range(count):
        user_create(
            email=f"{tag}-{uuid.uuid4().hex[:8]}@example.test", first_name="L", last_name="C"
        )


def test_busy_slot_is_named_and_waited_for(make_consumer, clickhouse_server, pg_conn):
    """A second consumer on a held slot names the holder's PID, retries, and never writes."""
    # GIVEN a consumer holding the slot
    first = make_consumer(clickhouse_server.url)
    first.migrate()
    first.start()
    holder = pg_conn.execute(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (first.slot,)
    ).fetchone()[0]
    # WHEN a stale second consumer starts on the same slot
    second = make_consumer(
        clickhouse_server.url,
        CDC_SLOT=first.slot,
        CDC_PUBLICATION=first.env["CDC_PUBLICATION"],
        CDC_RETRY_MAX_SECONDS="0.5",
    )
    second.start(streaming=False)
    wait_for(
        lambda: any(
            f"is active for PID {holder}" in e.get("error", "") for e in second.log_events()
        ),
        what="the second consumer to name the slot's holder",
    )
    tag = f"busy-{uuid.uuid4().hex[:8]}"
    _create(tag, 3)
    first.wait_confirmed(current_wal_lsn(pg_conn))
    # THEN only the holder wrote; once it stops, the second takes over
    assert not [e for e in second.log_events() if e["event"] == "batch written"]
    assert first.stop() == 0
    _create(tag, 2)
    second.wait_confirmed(current_wal_lsn(pg_conn))
    assert _count(clickhouse_server.url, tag) == 5
    assert second.stop() == 0


def test_sigterm_under_load_flushes_confirms_and_exits_zero(
    make_consumer, clickhouse_server, pg_conn
):
    """SIGTERM while events stream in: the committed batch is shipped and confirmed, exit 0."""
    consumer = make_consumer(clickhouse_server.url, CDC_BATCH_MAX_SECONDS="5")
    consumer.migrate()
    consumer.start()
    tag = f"term-{uuid.uuid4().hex[:8]}"
    _create(tag, 30)  # below every batch limit: only the stop can ship them in time
    published_to = current_wal_lsn(pg_conn)
    wait_for(lambda: _sent_lsn(pg_conn, consumer.slot) >= published_to, what="events sent")
    assert _count(clickhouse_server.url, tag) == 0  # read, but still waiting for the age limit
    started = time.monotonic()
    assert consumer.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 30  # CDC_SHUTDOWN_GRACE_SECONDS' default
    assert _count(clickhouse_server.url, tag) == 30
    last_commit = clickhouse_select(
        clickhouse_server.url,
        f"SELECT max(source_lsn) FROM event_log WHERE event_context_raw LIKE '%{tag}%'",
    )[0][0]
    assert consumer.confirmed_lsn() > last_commit  # confirmed at the commit's end


def _sent_lsn(pg_conn, slot: str) -> int:
    """How far the slot's walsender has sent WAL to the consumer."""
    row = pg_conn.execute(
        "SELECT r.sent_lsn::text FROM pg_stat_replication r"
        " JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s",
        (slot,),
    ).fetchone()
    return str_to_lsn(row[0]) if row and row[0] else 0


def test_second_sigterm_exits_at_once_without_confirming(make_consumer, clickhouse_faults, pg_conn):
    """A second SIGTERM while the final flush is stuck exits at once and confirms nothing more."""
    consumer = make_consumer(clickhouse_faults.url)
    consumer.migrate()
    consumer.start()
    # The consumer's first cdc_progress write is WAL that an idle slot then confirms: let it
    # happen and settle before taking the position that must not move.
    wait_for(
        lambda: pg_conn.execute(
            "SELECT 1 FROM cdc_progress WHERE slot = %s", (consumer.slot,)
        ).fetchone(),
        what="the consumer's first progress record",
    )
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    clickhouse_faults.hold_inserts()
    try:
        _create(f"stuck-{uuid.uuid4().hex[:8]}", 1)
        # The stuck transaction commits at this position (or before, if others wrote since).
        # WAL of other sessions before it may still be confirmed (an idle slot follows
        # keepalives); the transaction must not be.
        after_stuck = current_wal_lsn(pg_conn)
        clickhouse_faults.wait_for_held_inserts()
        assert consumer.process is not None
        consumer.process.send_signal(signal.SIGTERM)
        wait_for(
            lambda: any(e["event"] == "stop requested, flushing" for e in consumer.log_events()),
            what="the first stop to be logged",
        )
        started = time.monotonic()
        code = consumer.stop(signal.SIGTERM, timeout=5)
        assert time.monotonic() - started < 5
        assert code == -signal.SIGTERM
        assert consumer.confirmed_lsn() < after_stuck
    finally:
        clickhouse_faults.release_inserts()


def test_added_column_does_not_stop_the_stream(make_consumer, clickhouse_server, pg_conn):
    """A nullable column added to event_outbox while streaming: events keep arriving."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    tag = f"ddl-{uuid.uuid4().hex[:8]}"
    _create(tag, 2)
    pg_conn.execute("ALTER TABLE event_outbox ADD COLUMN trace_note text")
    try:
        _create(tag, 2)
        pg_conn.execute(
            "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
            " event_context, metadata_version, trace_note)"
            " VALUES (gen_random_uuid(), 'user_created', now(), 'test', %s, 1, 'noted')",
            (f'{{"email": "{tag}-sql@example.test"}}',),
        )
        consumer.wait_confirmed(current_wal_lsn(pg_conn))
    finally:
        pg_conn.execute("ALTER TABLE event_outbox DROP COLUMN trace_note")
    assert _count(clickhouse_server.url, tag) == 5
    assert consumer.stop() == 0


def _stop_within_grace(consumer: Consumer, *, exit_code: int, unconfirmed_from: int) -> None:
    """SIGTERM the consumer: it exits with `exit_code` within the grace and the bound, and
    the slot is not confirmed at or past `unconfirmed_from`."""
    assert consumer.process is not None
    consumer.process.send_signal(signal.SIGTERM)
    limit = GRACE_SECONDS + LEAVE_BOUND_SECONDS
    try:
        consumer.process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"consumer still running {limit:.0f}s after SIGTERM:\n{consumer.log_text()}")
    assert consumer.stop() == exit_code, consumer.log_text()  # exited: this lets go of the slot
    assert consumer.confirmed_lsn() < unconfirmed_from


def _started(make_consumer: Callable[..., Consumer], url: str, **overrides: str) -> Consumer:
    """A migrated, streaming consumer with the stop tests' short grace."""
    consumer = make_consumer(url, CDC_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS), **overrides)
    consumer.migrate()
    consumer.start()
    return consumer


def _publish_held(faults: Any, pg_conn, count: int, tag: str) -> int:
    """Publish `count` probes in one transaction whose insert ClickHouse accepts and does not
    answer; returns the WAL position after it."""
    faults.hold_inserts()
    publish_probes(pg_conn, count, tag)
    after = current_wal_lsn(pg_conn)
    faults.wait_for_held_inserts()
    return after


def _stored(url: str, tag: str) -> tuple[int, int]:
    """Rows and distinct events of the probes tagged `tag` in event_log (no FINAL)."""
    rows = clickhouse_select(
        url, f"SELECT count(), uniqExact(event_id) FROM event_log WHERE environment = '{tag}'"
    )
    return int(rows[0][0]), int(rows[0][1])


def _logged(consumer: Consumer, event: str) -> int:
    return sum(1 for e in consumer.log_events() if e["event"] == event)


def _through(proxy: TcpProxy, url: str) -> str:
    """`url` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _restart_delivers_once(
    consumer: Consumer,
    url: str,
    tag: str,
    pg_conn,
    events: int,
    *,
    once_streaming: Callable[[], None] = lambda: None,
) -> None:
    """Start the consumer again (calling `once_streaming` when its restart read is done): it
    catches up, exits 0 on SIGTERM, and each event is in event_log exactly once."""
    consumer.start()
    once_streaming()
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    assert _stored(url, tag) == (events, events)


@pytest.mark.usefixtures("merges_stopped")
def test_stop_in_reconnect_backoff_with_batches_abandoned_exits_one(
    make_consumer, clickhouse_faults, tcp_proxy, postgres_url, pg_conn
):
    """SIGTERM while reconnecting to a lost source, the batches it held abandoned: it leaves
    within the grace with exit 1, nothing confirmed past them; a restart delivers each once."""
    # GIVEN a consumer reaching PostgreSQL through a proxy, holding two transactions that
    # ClickHouse keeps refusing (the sink worker retries the first, the second waits behind)
    source = urlsplit(postgres_url)
    proxy = tcp_proxy(source.hostname or "127.0.0.1", source.port or 5432)
    consumer = _started(
        make_consumer,
        clickhouse_faults.url,
        DATABASE_URL=_through(proxy, postgres_url),
        CDC_RETRY_MAX_SECONDS="2",
    )
    clickhouse_faults.fail_inserts(10_000)
    tag = f"backoff-{uuid.uuid4().hex[:8]}"
    publish_probes(pg_conn, 5, tag)
    after_first = current_wal_lsn(pg_conn)
    wait_for(lambda: _logged(consumer, "batch write failed, retrying"), what="a refused batch")
    publish_probes(pg_conn, 5, tag)
    published_to = current_wal_lsn(pg_conn)
    wait_for(lambda: _sent_lsn(pg_conn, consumer.slot) >= published_to, what="events sent")
    # WHEN the source goes away, and the consumer is told to stop while it backs off
    # between reconnects
    proxy.cut()
    wait_for(
        lambda: _logged(consumer, "source failed, reconnecting") >= 2,
        what="the consumer to back off between failed reconnects",
    )
    # THEN it leaves within the grace, saying (exit 1) that it left events to the slot
    _stop_within_grace(consumer, exit_code=1, unconfirmed_from=after_first)
    assert _stored(clickhouse_faults.url, tag) == (0, 0)
    # AND with the source and ClickHouse back, a restart delivers every event exactly once
    proxy.restore()
    clickhouse_faults.reset()
    _restart_delivers_once(consumer, clickhouse_faults.url, tag, pg_conn, 10)


@pytest.mark.usefixtures("merges_stopped")
def test_stop_while_an_insert_hangs_unanswered_leaves_within_the_grace(
    make_consumer, clickhouse_faults, pg_conn
):
    """SIGTERM while ClickHouse holds the last insert with no answer: the stop does not wait
    for the HTTP timeout; exit 1 within the grace; a restart delivers each event once."""
    # GIVEN a consumer whose insert ClickHouse accepted and does not answer
    consumer = _started(make_consumer, clickhouse_faults.url)
    tag = f"hang-{uuid.uuid4().hex[:8]}"
    published_to = _publish_held(clickhouse_faults, pg_conn, 10, tag)
    # WHEN it is told to stop (the final drain waits on the sink worker, whose request hangs)
    # THEN it leaves within the grace, saying (exit 1) that it left events to the slot
    _stop_within_grace(consumer, exit_code=1, unconfirmed_from=published_to)
    # AND a restart fences the insert left hanging (cancels it) and delivers each event once
    _restart_delivers_once(
        consumer,
        clickhouse_faults.url,
        tag,
        pg_conn,
        10,
        once_streaming=clickhouse_faults.release_inserts,
    )


@pytest.mark.usefixtures("merges_stopped")
def test_stop_while_handing_a_batch_to_a_hung_worker_leaves_within_the_grace(
    make_consumer, clickhouse_faults, pg_conn
):
    """SIGTERM while the main loop waits to hand the sink worker a batch (one insert hangs,
    one batch is queued): it leaves within the grace with exit 1; a restart delivers once."""
    # GIVEN three batches of one transaction each: the first is held by ClickHouse with no
    # answer, the second waits in the worker's queue, the third in the main loop
    consumer = _started(make_consumer, clickhouse_faults.url, CDC_BATCH_MAX_ROWS="5")
    tag = f"handover-{uuid.uuid4().hex[:8]}"
    after_first = _publish_held(clickhouse_faults, pg_conn, 5, tag)
    publish_probes(pg_conn, 5, tag)
    publish_probes(pg_conn, 5, tag)
    published_to = current_wal_lsn(pg_conn)
    wait_for(lambda: _sent_lsn(pg_conn, consumer.slot) >= published_to, what="events sent")
    # WHEN it is told to stop, THEN it leaves within the grace, saying (exit 1) that it left
    # events to the slot
    _stop_within_grace(consumer, exit_code=1, unconfirmed_from=after_first)
    # AND a restart fences the insert left hanging and delivers every event exactly once
    _restart_delivers_once(
        consumer,
        clickhouse_faults.url,
        tag,
        pg_conn,
        15,
        once_streaming=clickhouse_faults.release_inserts,
    )


@pytest.mark.usefixtures("merges_stopped")
def test_stop_while_the_fence_waits_leaves_within_the_grace(
    make_consumer, clickhouse_faults, pg_conn
):
    """SIGTERM while the startup fence waits for a killed run's insert: it leaves within the
    grace with exit 0 (it received nothing); a restart delivers each event once."""
    # GIVEN a run killed while ClickHouse executes its insert, and a new run whose fence
    # (KILL QUERY ... SYNC) waits for that insert to end
    consumer = _started(make_consumer, clickhouse_faults.url)
    tag = f"fence-{uuid.uuid4().hex[:8]}"
    kill_while_an_insert_executes(consumer, clickhouse_faults, pg_conn, tag)
    published_to = current_wal_lsn(pg_conn)
    consumer.start(streaming=False)
    wait_for(lambda: clickhouse_faults.stats()["waiting_kills"], what="the fence to wait")
    # WHEN the new run is told to stop, THEN it leaves within the grace; it received
    # nothing, so it abandoned nothing (exit 0)
    _stop_within_grace(consumer, exit_code=0, unconfirmed_from=published_to)
    # AND once the killed run's insert has landed, a restart skips it and adds nothing twice
    clickhouse_faults.release_inserts()
    _restart_delivers_once(consumer, clickhouse_faults.url, tag, pg_conn, 10)


def test_stop_while_postgresql_never_answers_the_connect_leaves_within_the_connect_timeout(
    make_consumer, clickhouse_server, postgres_url
):
    """A PostgreSQL address that accepts the TCP connection and never answers: SIGTERM ends the
    consumer once the connect gives up (CONNECT_TIMEOUT_SECONDS), not psycopg's 130 s."""
    # GIVEN a listener that completes the handshake and then says nothing
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        port = silent.getsockname()[1]
        parts = urlsplit(postgres_url)
        host = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
        consumer = make_consumer(clickhouse_server.url)
        silent_url = urlunsplit(parts._replace(netloc=host))
        process = subprocess.Popen(
            [sys.executable, "-m", "cdc_consumer", "run"],
            env={**consumer.env, "DATABASE_URL": silent_url},
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(2.0)  # well into the connect
            assert process.poll() is None
            # WHEN it is asked to stop
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=CONNECT_TIMEOUT_SECONDS + 10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    # THEN it left within the connect timeout, non-zero (it never got to stream)
    assert code != 0
    assert time.monotonic() - stopped_at < CONNECT_TIMEOUT_SECONDS + 3


def _at_least(items: Callable[[], list[Any]], count: int) -> bool:
    return len(items()) >= count


def test_reconnect_after_streaming_again_starts_the_backoff_afresh(
    make_consumer, clickhouse_server, pg_conn
):
    """A walsender lost after the consumer had streamed for CDC_RETRY_MAX_SECONDS (1 s here)
    reconnects at attempt 1, the shortest backoff; lost again right after it came back (a
    source that flaps), the backoff keeps growing."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()

    def reconnects() -> list[dict[str, Any]]:
        return [e for e in consumer.log_events() if e["event"] == "source failed, reconnecting"]

    for failures, streamed_for in ((1, 1.5), (2, 1.5), (3, 0.0)):
        time.sleep(streamed_for)
        # WHEN the walsender is terminated while the consumer streams
        pg_conn.execute("SELECT pg_terminate_backend(%s)", (consumer.slot_pid(),))
        wait_for(partial(_at_least, reconnects, failures), what="the consumer to reconnect")
        wait_for(consumer.slot_active, what="streaming again")
    assert consumer.stop() == 0
    # THEN the two after a while streaming were first attempts, the flapping one was not
    assert [e["attempt"] for e in reconnects()] == [1, 1, 2]
