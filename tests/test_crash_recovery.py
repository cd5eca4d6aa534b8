"""Crash anywhere: the consumer SIGKILLed at random moments under continuous publishing.

Each kill lands in one of four moments: while the restarted consumer replays and re-reads what
was not confirmed, at a random point of steady streaming (reading, building a batch), while an
insert is in flight (held by the HTTP test server), and right after an insert landed but before
the slot was confirmed. Transactions of up to 50 rows meet `CDC_BATCH_MAX_ROWS=20`, so most are
split across batches and a kill often leaves one half in ClickHouse: the case the source position
watermark exists for (docs/adr/0002-exactly-once-in-clickhouse.md).

`CRASH_SEED=N` replays a schedule of kills (publishing timing still varies from run to run).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from tests.support.fix_clickhouse import ClickHouseServer
from tests.support.fix_clickhouse import clickhouse_select as _select
from tests.support.fix_consumer import Consumer, current_wal_lsn, wait_for

pytestmark = pytest.mark.e2e

KILLS = 24
BATCH_MAX_ROWS = 20  # below most transactions, so they are split across batches
MAX_TRANSACTION_ROWS = 50
MOMENTS = ("replay", "streaming", "insert_in_flight", "insert_landed")

PUBLISH_SQL = """
INSERT INTO event_outbox (event_id, event_type, event_date_time, environment, event_context,
                          metadata_version)
SELECT gen_random_uuid(), 'crash_probe', clock_timestamp(), %(environment)s,
       jsonb_build_object('tx', %(tx)s::int, 'n', g, 'size', %(size)s::int), 1
FROM generate_series(1, %(size)s::int) AS g
"""


class Publisher(threading.Thread):
    """Publishes transactions of 1..50 events, one INSERT each, until stopped."""

    def __init__(self, postgres_url: str, environment: str, rng: random.Random) -> None:
        super().__init__(name="publisher", daemon=True)
        self._url = postgres_url
        self._environment = environment
        self._rng = rng
        self._stopping = threading.Event()
        self.published = 0
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self._url, autocommit=True) as conn:
                while not self._stopping.is_set():
                    size = self._rng.randint(1, MAX_TRANSACTION_ROWS)
                    params = {"environment": self._environment, "tx": self.transactions}
                    conn.execute(PUBLISH_SQL, {**params, "size": size})
                    self.published += size
                    self.transactions += 1
                    # Pacing, not waiting for a state: a steady ~500 events/s.
                    self._stopping.wait(self._rng.uniform(0, 0.08))
        except BaseException as exc:
            self.error = exc

    def finish(self) -> int:
        """Stop publishing; the number of events committed."""
        self._stopping.set()
        self.join(timeout=30)
        if self.error is not None:
            raise self.error
        return self.published


@dataclass
class Kill:
    """What event_log looked like right after one SIGKILL, for the report and for diagnosis."""

    moment: str
    confirmed_lsn: int
    ahead_of_slot: int  # rows in event_log the slot was not confirmed past: replay must skip
    split_transactions: int  # transactions only partly in event_log
    rows: int
    duplicates: int


def _delivered(clickhouse_url: str, environment: str) -> tuple[int, int]:
    """Rows and distinct events in event_log for one environment, without FINAL."""
    (rows, distinct), *_ = _select(
        clickhouse_url,
        "SELECT count(), count(DISTINCT event_id) FROM event_log"
        f" WHERE environment = '{environment}'",
    )
    return int(rows), int(distinct)


def _snapshot(clickhouse_url: str, environment: str, moment: str, confirmed: int) -> Kill:
    (rows, distinct, ahead), *_ = _select(
        clickhouse_url,
        f"SELECT count(), uniqExact(event_id), countIf(source_lsn >= {confirmed})"
        f" FROM event_log WHERE environment = '{environment}'",
    )
    (split,), *_ = _select(
        clickhouse_url,
        "SELECT count() FROM (SELECT JSONExtractUInt(event_context_raw, 'tx') AS tx,"
        " any(JSONExtractUInt(event_context_raw, 'size')) AS size, count() AS landed"
        f" FROM event_log WHERE environment = '{environment}' GROUP BY tx"
        " HAVING landed < size)",
    )
    return Kill(moment, confirmed, ahead, split, rows, rows - distinct)


def _kill(consumer: Consumer) -> None:
    code = consumer.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the consumer had exited by itself:\n{consumer.log_text()}"


def _kill_at(moment: str, consumer: Consumer, faults: ClickHouseServer, rng: random.Random) -> None:
    """SIGKILL the running consumer at `moment`; returns once its slot is free again."""
    if moment == "replay":
        # A random instant of the first second: reading the replay, skipping, building.
        time.sleep(rng.uniform(0, 0.3))
        _kill(consumer)
    elif moment == "streaming":
        time.sleep(rng.uniform(0.3, 1.5))
        _kill(consumer)
    elif moment == "insert_in_flight":
        time.sleep(rng.uniform(0, 0.5))
        faults.hold_inserts()
        held = faults.wait_for_held_inserts()
        _kill(consumer)
        faults.release_inserts()
        # ClickHouse finishes an insert whose client died once it has the whole body; here it
        # lands before the restart (test_abandoned_insert_is_fenced_... covers the other order).
        done = held["inserts"] + held["failed_inserts"]
        wait_for(
            lambda: faults.stats()["inserts"] + faults.stats()["failed_inserts"] > done,
            what="the abandoned insert to finish",
        )
    elif moment == "insert_landed":
        landed = faults.stats()["inserts"]
        deadline = time.monotonic() + 30
        # No sleep between polls: the confirm follows the insert within milliseconds.
        while faults.stats()["inserts"] == landed:
            assert time.monotonic() < deadline, "no insert landed within 30 s"
        _kill(consumer)
    else:
        pytest.fail(f"unknown moment {moment}")


def test_sigkill_anywhere_delivers_every_event_once(
    merges_stopped, make_consumer, clickhouse_faults, pg_conn
):
    """Killed at random moments and restarted 24 times, the consumer delivers every event once."""
    seed = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash recovery seed {seed} (CRASH_SEED={seed} replays the schedule)")
    rng = random.Random(seed)
    # GIVEN a consumer on the HTTP transport cutting batches of at most 20 rows
    faults = clickhouse_faults
    consumer = make_consumer(faults.url, CDC_BATCH_MAX_ROWS=str(BATCH_MAX_ROWS))
    consumer.migrate()
    environment = f"crash-{uuid.uuid4().hex[:12]}"
    publisher = Publisher(consumer.postgres_url, environment, random.Random(rng.random()))
    schedule = [MOMENTS[n % len(MOMENTS)] for n in range(KILLS)]
    rng.shuffle(schedule)
    kills: list[Kill] = []
    started = time.monotonic()
    # WHEN events are published steadily while it is killed at each moment and restarted
    publisher.start()
    try:
        for moment in schedule:
            consumer.start()
            _kill_at(moment, consumer, faults, rng)
            kills.append(_snapshot(faults.url, environment, moment, consumer.confirmed_lsn()))
    finally:
        published = publisher.finish()
    # THEN once a last run is confirmed past the final WAL position and stopped cleanly,
    final_lsn = current_wal_lsn(pg_conn)
    consumer.start()
    consumer.wait_confirmed(final_lsn)
    assert consumer.stop() == 0
    delivered, distinct = _delivered(faults.url, environment)
    report: dict[str, Any] = {
        "seed": seed,
        "seconds": round(time.monotonic() - started, 1),
        "published": published,
        "transactions": publisher.transactions,
        "delivered": delivered,
        "raw_duplicates": delivered - distinct,
        "kills": len(kills),
        "kills_with_rows_ahead_of_slot": sum(1 for k in kills if k.ahead_of_slot),
        "rows_ahead_of_slot_by_moment": {
            moment: [k.ahead_of_slot for k in kills if k.moment == moment] for moment in MOMENTS
        },
        "kills_with_split_transaction_in_event_log": sum(1 for k in kills if k.split_transactions),
    }
    print(report)
    diagnosis = f"seed {seed}; kills: {kills}"
    # ... every published event is in event_log exactly once, without FINAL
    outbox = pg_conn.execute(
        "SELECT count(*) FROM event_outbox WHERE environment = %s", (environment,)
    ).fetchone()
    assert outbox == (published,)
    assert (delivered, distinct) == (published, published), diagnosis
    assert all(k.duplicates == 0 for k in kills), diagnosis
    # ... and the kills did hit the hard cases: rows already in ClickHouse but not confirmed,
    # and transactions split across batches with only their first part landed.
    assert report["kills_with_rows_ahead_of_slot"] > 0, diagnosis
    assert report["kills_with_split_transaction_in_event_log"] > 0, diagnosis


def _publish(pg_conn, environment: str, tx: int, size: int) -> None:
    pg_conn.execute(PUBLISH_SQL, {"environment": environment, "tx": tx, "size": size})


def test_abandoned_insert_is_fenced_before_the_watermark_is_read(
    merges_stopped, make_consumer, clickhouse_faults, pg_conn
):
    """An insert its killed consumer left executing cannot land after the restart's watermark."""
    faults = clickhouse_faults
    consumer = make_consumer(faults.url)
    consumer.migrate()
    environment = f"abandoned-{uuid.uuid4().hex[:12]}"
    consumer.start()
    # GIVEN a consumer killed while ClickHouse is still executing its insert of transaction 0
    faults.hold_inserts()
    _publish(pg_conn, environment, tx=0, size=10)
    faults.wait_for_held_inserts()
    assert consumer.stop(signal.SIGKILL) == -signal.SIGKILL
    # WHEN more is published and the consumer restarts while that insert is still running
    _publish(pg_conn, environment, tx=1, size=10)
    consumer.start(streaming=False)  # its fence waits for the abandoned insert
    # and ClickHouse then finishes whatever insert is still running
    wait_for(
        lambda: faults.stats()["held_inserts"] + faults.stats()["killed_queries"] == 2,
        what="the restarted consumer's insert",
    )
    faults.release_inserts()
    final_lsn = current_wal_lsn(pg_conn)
    consumer.wait_confirmed(final_lsn)
    assert consumer.stop() == 0
    # THEN each of the 20 events is in event_log once, without FINAL: the restart cancelled
    # the abandoned insert before reading its watermark (had it landed afterwards, the replay
    # would have doubled its 10 events)
    delivered, distinct = _delivered(faults.url, environment)
    runs = [
        {key: e[key] for key in ("event", "watermark_lsn", "watermark_seq", "rows") if key in e}
        for e in consumer.log_events()
        if e.get("event") in ("streaming", "batch written")
    ]
    assert (delivered, distinct) == (20, 20), runs
    assert faults.stats()["killed_queries"] == 1, runs
