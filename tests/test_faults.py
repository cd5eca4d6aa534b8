"""Faults on the way: ClickHouse unreachable for a while, PostgreSQL restarted mid-stream.

The consumer runs as a process, as in production, against the session's PostgreSQL and the
ClickHouse HTTP interface; for the outage a TCP proxy sits between the consumer and ClickHouse.
Events are published from the test thread through the Django service, at a steady pace.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg
import pytest
from django.db import connection

from cdc_consumer.clickhouse import ClickHouseTransport, connect
from cdc_consumer.pgoutput import str_to_lsn
from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import Consumer, current_wal_lsn, wait_for
from web.accounts.services import user_create

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

OUTAGE_SECONDS = 30.0  # the figure; the outage test takes about this + 15 s
PUBLISH_INTERVAL_SECONDS = 0.02  # a steady 50 events/s
SAMPLE_INTERVAL_SECONDS = 0.25  # how often the slot, ClickHouse and the consumer's RSS are read
RETRY_CAP_SECONDS = 4.0  # above make_consumer's 1 s, so the backoff has room to grow
BACKOFF_BASE_SECONDS = 0.2  # delivery.py's first retry ceiling; ceilings double from there
PUBLISH_P99_BOUND_SECONDS = 0.05
RSS_BOUND_BYTES = 400 * 2**20  # the HTTP transport never loads chDB (~260 MB alone)
# An outage's worth of events is ~600 kB of pgoutput; a consumer that kept reading would leave
# next to nothing in its socket, one that stopped leaves up to a full receive buffer (~290 kB).
UNREAD_BACKLOG_MIN_BYTES = 32 * 1024
# make_consumer sends status every 1 s; the walsender would drop a consumer silent for
# wal_sender_timeout (60 s, longer than the outage), so freshness is what proves it answers.
REPLY_FRESH_SECONDS = 5.0


@dataclass
class _Published:
    email: str
    wal_after: int  # WAL insert position right after the commit: the commit ends at or before it


@dataclass
class _Publisher:
    """Creates users one by one at a steady pace, timing each `user_create` call."""

    tag: str
    pg_conn: psycopg.Connection[Any]
    events: list[_Published] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def run(self, seconds: float, phase: str, between: Callable[[], None]) -> None:
        """Publish for `seconds`, calling `between` every SAMPLE_INTERVAL_SECONDS."""
        latencies = self.latencies.setdefault(phase, [])
        now = time.monotonic()
        end, next_publish, next_sample = now + seconds, now, now
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                between()
                next_sample = now + SAMPLE_INTERVAL_SECONDS
            if now >= next_publish:
                email = f"{self.tag}-{len(self.events)}@example.test"
                started = time.perf_counter()
                user_create(email=email, first_name="Ada", last_name="Lovelace")
                latencies.append(time.perf_counter() - started)
                self.events.append(_Published(email, current_wal_lsn(self.pg_conn)))
                next_publish = max(next_publish + PUBLISH_INTERVAL_SECONDS, now)
            # Pacing a load generator, not waiting for a condition: sleep to the next tick.
            time.sleep(max(0.0, min(next_publish, next_sample, end) - time.monotonic()))


@dataclass
class _SlotSample:
    active: bool
    active_pid: int | None
    confirmed_lsn: int
    reply_age_seconds: float | None


@dataclass
class _Watch:
    """Samples the slot, ClickHouse (directly, not through the proxy) and the consumer's RSS,
    checking on every sample that the slot is not confirmed past an event ClickHouse lacks."""

    consumer: Consumer
    pg_conn: psycopg.Connection[Any]
    clickhouse: ClickHouseTransport
    publisher: _Publisher
    rss_peak: int = 0
    rss: list[int] = field(default_factory=list)
    unread: list[int] = field(default_factory=list)  # replication bytes the consumer left unread
    holder: int | None = None  # walsender PID that must keep the slot, once set
    catch_up_target: int = 0
    catch_up_from: float = 0.0
    catch_up_seconds: float | None = None

    def slot(self) -> _SlotSample:
        row = self.pg_conn.execute(
            "SELECT s.active, s.active_pid, s.confirmed_flush_lsn::text,"
            " extract(epoch FROM clock_timestamp() - r.reply_time)::float8"
            " FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid"
            " WHERE s.slot_name = %s",
            (self.consumer.slot,),
        ).fetchone()
        assert row is not None, f"slot {self.consumer.slot} is gone"
        return _SlotSample(row[0], row[1], str_to_lsn(row[2]), row[3])

    def delivered(self) -> list[str]:
        """Emails of this test's events in event_log, one per row (no FINAL)."""
        rows = self.clickhouse.select(
            "SELECT JSONExtractString(event_context_raw, 'email') AS email FROM event_log"
            f" WHERE startsWith(email, '{self.publisher.tag}-')"
        )
        return [row[0] for row in rows]

    def sample(self) -> None:
        assert self.consumer.process is not None
        assert self.consumer.process.poll() is None, self.consumer.log_text()
        rss = psutil.Process(self.consumer.process.pid).memory_info().rss
        self.rss.append(rss)
        self.rss_peak = max(self.rss_peak, rss)
        postgres_port = urlsplit(self.consumer.postgres_url).port or 5432
        self.unread.append(_unread_bytes(self.consumer.process.pid, postgres_port))
        # The slot first, ClickHouse second: whatever the slot confirmed had landed by then.
        slot = self.slot()
        delivered = set(self.delivered())
        undelivered = [e for e in self.publisher.events if e.email not in delivered]
        if undelivered:
            first = undelivered[0]
            assert slot.confirmed_lsn < first.wal_after, f"slot confirmed past {first.email}"
        if self.holder is not None:
            assert (slot.active, slot.active_pid) == (True, self.holder), "walsender let go"
            assert slot.reply_age_seconds is not None
            assert slot.reply_age_seconds < REPLY_FRESH_SECONDS, "consumer went silent"
        target = self.catch_up_target
        if self.catch_up_seconds is None and target and slot.confirmed_lsn >= target:
            self.catch_up_seconds = time.monotonic() - self.catch_up_from

    def expect_catch_up(self, lsn: int) -> None:
        """From now, time how long until the slot is confirmed at or past `lsn`."""
        self.catch_up_target, self.catch_up_from = lsn, time.monotonic()

    def caught_up(self) -> bool:
        self.sample()
        return self.catch_up_seconds is not None


def _unread_bytes(pid: int, server_port: int) -> int:
    """Bytes waiting in the receive queues of `pid`'s connections to `server_port` (Linux):
    what the server sent that the process has not read yet."""
    ports = {
        conn.laddr.port
        for conn in psutil.Process(pid).net_connections("tcp4")
        if conn.raddr and conn.raddr.port == server_port
    }
    unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, queues = line.split()[1], line.split()[4]  # addr:port, tx_queue:rx_queue (hex)
        if int(local.split(":")[1], 16) in ports:
            unread += int(queues.split(":")[1], 16)
    return unread


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def _retries(consumer: Consumer) -> list[dict[str, Any]]:
    return [e for e in consumer.log_events() if e["event"] == "batch write failed, retrying"]


def _first_write_after(consumer: Consumer, since: dt.datetime) -> float:
    """Seconds from `since` to the consumer's first `batch written` log line after it."""
    for event in consumer.log_events():
        at = dt.datetime.fromisoformat(event["timestamp"])
        if event["event"] == "batch written" and at >= since:
            return (at - since).total_seconds()
    pytest.fail("no batch written after the outage")


@pytest.mark.usefixtures("merges_stopped")
def test_clickhouse_outage_delays_delivery_and_nothing_else(
    make_consumer,
    clickhouse_server,
    tcp_proxy,
    pg_conn,
    record_property,
):
    """ClickHouse cut off for 30 s: publishing goes on, the slot waits, then all arrives once."""
    if clickhouse_server.secure:
        pytest.skip("the proxy forwards plain TCP: TLS would not match the proxy's address")
    # GIVEN a consumer reaching ClickHouse through a proxy, and events published at a steady pace
    proxy = tcp_proxy(clickhouse_server.host, clickhouse_server.port)
    proxied = dataclasses.replace(clickhouse_server, host="127.0.0.1", port=proxy.port)
    consumer = make_consumer(proxied.url, CDC_RETRY_MAX_SECONDS=str(RETRY_CAP_SECONDS))
    consumer.migrate()
    consumer.start()
    publisher = _Publisher(f"outage-{uuid.uuid4().hex[:8]}", pg_conn)
    clickhouse = connect(clickhouse_server.url)
    watch = _Watch(consumer, pg_conn, clickhouse, publisher)
    try:
        publisher.run(3.0, "before", watch.sample)
        # WHEN the transport is cut for OUTAGE_SECONDS while publishing goes on
        proxy.cut()
        first_in_outage, first_rss_in_outage = len(publisher.events), len(watch.rss)
        watch.holder = watch.slot().active_pid
        publisher.run(OUTAGE_SECONDS, "outage", watch.sample)
        rss_outage = watch.rss[first_rss_in_outage:]
        unread_at_end_of_outage = watch.unread[-1]
        # THEN (checked on every sample above) the same walsender kept the slot and heard from
        # the consumer, and the slot was never confirmed past an event ClickHouse lacked
        during = {e.email for e in publisher.events[first_in_outage:]}
        assert not during & set(watch.delivered()), "events got through the cut"
        # WHEN the transport comes back while publishing goes on
        proxy.restore()
        restored_at = dt.datetime.now(dt.UTC)
        watch.expect_catch_up(current_wal_lsn(pg_conn))
        publisher.run(5.0, "after", watch.sample)
        wait_for(watch.caught_up, what="the consumer to catch up after the outage")
        consumer.wait_confirmed(current_wal_lsn(pg_conn))
        delivered = watch.delivered()
    finally:
        clickhouse.close()
    assert consumer.stop() == 0
    # THEN everything published before, during and after the outage is there exactly once
    published = [e.email for e in publisher.events]
    assert len(delivered) == len(set(delivered)) == len(published)
    assert set(delivered) == set(published)
    # AND publishing did not notice the outage: no errors (they would have raised), fast as ever
    before, outage = publisher.latencies["before"], publisher.latencies["outage"]
    assert _p99(outage) < PUBLISH_P99_BOUND_SECONDS
    # AND the consumer retried with jittered backoff growing to the cap, and never reconnected
    retries = _retries(consumer)
    assert len(retries) >= 5
    for retry in retries:
        ceiling = min(RETRY_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (retry["attempt"] - 1))
        assert 0 <= retry["retry_in"] <= ceiling + 0.005  # retry_in is rounded to 0.01
    assert max(r["retry_in"] for r in retries) > BACKOFF_BASE_SECONDS * 2**3  # past attempt 4
    assert len({r["retry_in"] for r in retries if r["attempt"] > 5}) > 1  # jitter
    assert not [e for e in consumer.log_events() if e["event"] == "source failed, reconnecting"]
    # AND it stopped reading the WAL instead of buffering it: the stream piled up unread in its
    # socket (and behind it in the walsender and the WAL), and its memory stayed bounded
    assert unread_at_end_of_outage >= UNREAD_BACKLOG_MIN_BYTES
    assert watch.rss_peak < RSS_BOUND_BYTES
    figures = {
        "outage_seconds": OUTAGE_SECONDS,
        "events_published": len(published),
        "events_during_outage": len(outage),
        "catch_up_seconds": round(watch.catch_up_seconds or 0.0, 2),
        "first_write_after_restore_seconds": round(_first_write_after(consumer, restored_at), 2),
        "publish_p50_ms_before": round(statistics.median(before) * 1000, 2),
        "publish_p99_ms_before": round(_p99(before) * 1000, 2),
        "publish_p50_ms_outage": round(statistics.median(outage) * 1000, 2),
        "publish_p99_ms_outage": round(_p99(outage) * 1000, 2),
        "rss_peak_mb": round(watch.rss_peak / 2**20, 1),
        "rss_growth_during_outage_mb": round((max(rss_outage) - rss_outage[0]) / 2**20, 1),
        "unread_replication_kb_at_end_of_outage": unread_at_end_of_outage // 1024,
        "retries": len(retries),
        "max_retry_in": max(r["retry_in"] for r in retries),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"\noutage figures: {figures}")


def _create_users(count: int, tag: str) -> list[str]:
    emails = [f"{tag}-{n}@example.test" for n in range(count)]
    for email in emails:
        user_create(email=email, first_name="Ada", last_name="Lovelace")
    return emails


def _events(consumer: Consumer, name: str) -> list[int]:
    """Indexes, in the consumer's log, of the lines for event `name`."""
    return [i for i, e in enumerate(consumer.log_events()) if e["event"] == name]


def _wait_streaming_again(consumer: Consumer) -> None:
    """Wait until the consumer logged `streaming` after its last reconnect attempt."""
    wait_for(
        lambda: (
            _events(consumer, "streaming")[-1]
            > _events(consumer, "source failed, reconnecting")[-1]
        ),
        what="the consumer to stream again",
    )


def test_postgres_restart_mid_stream_loses_nothing(
    merges_stopped, make_consumer, clickhouse_server, postgres_server, postgres_url
):
    """PostgreSQL restarted mid-stream: the consumer reconnects and every event arrives once."""
    # GIVEN a streaming consumer, with events published just before the restart
    consumer = make_consumer(clickhouse_server.url, CDC_BATCH_MAX_ROWS="7")
    consumer.migrate()
    consumer.start()
    tag = f"pg-restart-{uuid.uuid4().hex[:8]}"
    emails = _create_users(60, f"{tag}-before")
    # WHEN the server stops (fast shutdown) and, once the consumer noticed, starts again
    connection.close()  # Django's session would not survive the restart; it reconnects lazily
    postgres_server.stop()
    try:
        wait_for(
            lambda: len(_events(consumer, "source failed, reconnecting")) >= 2,
            what="the consumer to try again while PostgreSQL is down",
        )
    finally:
        postgres_server.start()
    emails += _create_users(40, f"{tag}-after")
    # THEN it streams again from where it was confirmed
    _wait_streaming_again(consumer)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        consumer.wait_confirmed(current_wal_lsn(conn))
        outbox_ids = {
            row[0]
            for row in conn.execute(
                "SELECT event_id::text FROM event_outbox WHERE event_context->>'email' = ANY(%s)",
                (emails,),
            )
        }
    assert consumer.stop() == 0
    reconnects = [e for e in consumer.log_events() if e["event"] == "source failed, reconnecting"]
    assert all(e["retry_in"] <= 1.0 for e in reconnects)  # make_consumer's CDC_RETRY_MAX_SECONDS
    # AND every event is in ClickHouse exactly once (no FINAL)
    rows = clickhouse_select(
        clickhouse_server.url,
        "SELECT toString(event_id) FROM event_log"
        f" WHERE startsWith(JSONExtractString(event_context_raw, 'email'), '{tag}-')",
    )
    delivered = [row[0] for row in rows]
    assert len(outbox_ids) == len(emails) == 100
    assert len(delivered) == len(set(delivered)) == 100
    assert set(delivered) == outbox_ids


def _last(consumer: Consumer, name: str) -> dict[str, Any]:
    return consumer.log_events()[_events(consumer, name)[-1]]


def test_postgres_crash_with_a_batch_in_flight_doubles_nothing(
    merges_stopped, make_consumer, clickhouse_faults, postgres_server, postgres_url
):
    """PostgreSQL crashed while an insert is in flight: the replay skips what landed, loses none."""
    # GIVEN a streaming consumer whose latest insert ClickHouse holds in flight, unconfirmed
    consumer = make_consumer(clickhouse_faults.url)
    consumer.migrate()
    consumer.start()
    tag = f"pg-crash-{uuid.uuid4().hex[:8]}"
    emails = _create_users(20, f"{tag}-before")
    clickhouse_faults.hold_inserts()
    emails += _create_users(20, f"{tag}-in-flight")
    clickhouse_faults.wait_for_held_inserts()
    # WHEN PostgreSQL crashes, the held insert lands while it is down, and it starts again
    connection.close()  # Django's session would not survive the crash; it reconnects lazily
    postgres_server.stop(mode="immediate")
    try:
        wait_for(
            lambda: _events(consumer, "source failed, reconnecting"),
            what="the consumer to notice the crash",
        )
        clickhouse_faults.release_inserts()
        # It reconnects only once its queue is written, so a second failure means it landed.
        wait_for(
            lambda: len(_events(consumer, "source failed, reconnecting")) >= 2,
            what="the in-flight insert to land and the consumer to try again",
        )
    finally:
        postgres_server.start()
    emails += _create_users(20, f"{tag}-after")
    # THEN it replays from the slot's confirmed position, behind what ClickHouse holds: the
    # restart read finds the rows that landed while PostgreSQL was down
    _wait_streaming_again(consumer)
    assert _last(consumer, "streaming")["stored_rows"] >= 20
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        consumer.wait_confirmed(current_wal_lsn(conn))
    assert consumer.stop() == 0
    # AND every event is in ClickHouse exactly once (no FINAL)
    rows = clickhouse_select(
        clickhouse_faults.url,
        "SELECT JSONExtractString(event_context_raw, 'email') AS email FROM event_log"
        f" WHERE startsWith(email, '{tag}-')",
    )
    delivered = [row[0] for row in rows]
    assert len(delivered) == len(set(delivered)) == len(emails) == 60
    assert set(delivered) == set(emails)
