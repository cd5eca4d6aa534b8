"""One transaction of 500,000 events: delivered whole, in bounded memory, confirmed only at its
commit, and replayed without duplicates after a SIGKILL half-way through.

The consumer runs with its production batch limits on the HTTP transport, so the transaction is
split into batches of `CDC_BATCH_MAX_ROWS` (50,000) rows.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable

import psutil
import pytest

from tests.support.fix_clickhouse import clickhouse_select as _select
from tests.support.fix_consumer import Consumer, current_wal_lsn, status_received_after, wait_for

pytestmark = pytest.mark.e2e

EVENTS = 500_000
BATCH_ROWS = 50_000  # the default CDC_BATCH_MAX_ROWS
RSS_LIMIT_MB = 300
SHIPPING_SECONDS = 180.0  # decoding and shipping 500k rows, twice over on 2 slow cores

FILL_SQL = """
INSERT INTO event_outbox (event_id, event_type, event_date_time, environment, event_context,
                          metadata_version)
SELECT gen_random_uuid(), 'bulk_imported', clock_timestamp(), %(environment)s,
       jsonb_build_object('email', 'user' || g || '@bulk.example', 'first_name', 'Ada',
                          'last_name', 'Lovelace', 'plan', 'pro', 'n', g),
       1
FROM generate_series(1, %(events)s::int) AS g
"""


class RssSampler(threading.Thread):
    """Peak resident memory of one process, sampled every 50 ms until it exits or is stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self._process = psutil.Process(pid)
        self._stopping = threading.Event()
        self.peak: int = 0

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.peak = max(self.peak, int(self._process.memory_info().rss))
            except psutil.NoSuchProcess:
                return
            self._stopping.wait(0.05)

    def finish(self) -> int:
        self._stopping.set()
        self.join()
        return self.peak


def _start_sampled(consumer: Consumer) -> RssSampler:
    consumer.start()
    assert consumer.process is not None
    sampler = RssSampler(consumer.process.pid)
    sampler.start()
    return sampler


def _watch_below_commit(
    consumer: Consumer, shipped: Callable[[], int], commit_lsn: int, *, until_rows: int
) -> int:
    """Poll until `until_rows` rows were shipped, asserting meanwhile that the slot stays below
    the commit; returns how many observations were made."""
    observations = 0
    deadline = time.monotonic() + SHIPPING_SECONDS
    while True:
        # Slot first, rows second: rows short of the whole transaction after the slot was read
        # means the slot was read while the transaction was still being shipped.
        confirmed = consumer.confirmed_lsn()
        rows = shipped()
        if rows >= until_rows:
            return observations
        assert confirmed < commit_lsn, f"slot confirmed at {confirmed} with {rows} rows in"
        observations += 1
        assert consumer.process is not None
        assert consumer.process.poll() is None, consumer.log_text()
        assert time.monotonic() < deadline, f"only {rows} rows shipped in {SHIPPING_SECONDS} s"
        time.sleep(0.05)  # sampling interval of a watch, not a wait for a state


def test_huge_transaction_arrives_whole_once_in_bounded_memory(
    merges_stopped, make_consumer, clickhouse_faults, pg_conn
):
    """A 500,000-event transaction arrives once, under 300 MB RSS, confirmed only at its commit."""
    faults = clickhouse_faults
    started = time.monotonic()
    # GIVEN a running consumer on the HTTP transport with the default batch limits
    consumer = make_consumer(faults.url)
    consumer.migrate()
    first_run = _start_sampled(consumer)
    baseline = int(faults.stats()["rows_inserted"])  # a first migration records itself

    def shipped() -> int:
        return int(faults.stats()["rows_inserted"]) - baseline

    environment = f"huge-{uuid.uuid4().hex[:12]}"
    # WHEN one transaction publishes 500,000 events
    fill_started = time.monotonic()
    pg_conn.execute(FILL_SQL, {"environment": environment, "events": EVENTS})
    fill_seconds = time.monotonic() - fill_started
    after_commit = current_wal_lsn(pg_conn)
    wait_for(
        lambda: shipped() > 0,
        timeout=SHIPPING_SECONDS,
        what="the first batch of the transaction",
    )
    ((commit_lsn, first_rows),) = _select(
        faults.url,
        f"SELECT any(source_lsn), count() FROM event_log WHERE environment = '{environment}'",
    )
    # THEN while it is shipped the slot stays below its commit, also across status updates
    assert 0 < first_rows < EVENTS
    assert consumer.confirmed_lsn() < commit_lsn
    faults.hold_inserts()
    held = faults.wait_for_held_inserts(timeout=SHIPPING_SECONDS)
    held_since = pg_conn.execute("SELECT clock_timestamp()").fetchone()[0]
    wait_for(
        lambda: status_received_after(pg_conn, consumer.slot, held_since, seconds=1.5),
        what="status updates while an insert of the transaction is held",
    )
    assert consumer.confirmed_lsn() < commit_lsn
    # WHEN it is SIGKILLed half-way (the held insert still lands, as ClickHouse finishes an
    # insert whose client died) and restarted
    assert consumer.stop(signal.SIGKILL) == -signal.SIGKILL
    peak_rss = first_run.finish()
    faults.release_inserts()
    landed_before_restart = held["rows_inserted"] - baseline + BATCH_ROWS
    assert landed_before_restart < EVENTS, "the held insert was the transaction's last"
    wait_for(
        lambda: shipped() >= landed_before_restart,
        what="the abandoned insert to finish",
    )
    assert consumer.confirmed_lsn() < commit_lsn
    second_run = _start_sampled(consumer)
    # THEN it resumes inside the transaction, still confirming nothing before its commit,
    observations = _watch_below_commit(consumer, shipped, commit_lsn, until_rows=EVENTS)
    consumer.wait_confirmed(after_commit, timeout=SHIPPING_SECONDS)
    assert consumer.stop() == 0
    peak_rss = max(peak_rss, second_run.finish())
    # ... every event is in event_log exactly once, without FINAL, in bounded memory
    ((delivered, distinct),) = _select(
        faults.url,
        "SELECT count(), count(DISTINCT event_id) FROM event_log"
        f" WHERE environment = '{environment}'",
    )
    resumed_at = [e for e in consumer.log_events() if e.get("event") == "streaming"][-1]
    report = {
        "events": EVENTS,
        "delivered": delivered,
        "raw_duplicates": delivered - distinct,
        "rows_before_kill": landed_before_restart,
        "stored_at_restart": resumed_at["stored_rows"],
        "watch_observations_after_restart": observations,
        "peak_rss_mb": round(peak_rss / 2**20),
        "fill_seconds": round(fill_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(report)
    assert (delivered, distinct) == (EVENTS, EVENTS), report
    assert shipped() == EVENTS, report
    assert resumed_at["stored_rows"] == landed_before_restart, report
    assert peak_rss < RSS_LIMIT_MB * 2**20, report
