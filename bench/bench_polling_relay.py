"""The alternative people build instead of reading the WAL: a polling relay, on the same workload
as the drain and latency benchmarks. It lives only here, to be measured against.

    .venv/bin/python bench/bench_polling_relay.py [--events 200000] [--rate 1000] [--seconds 30] \
        [--batch 10000] [--poll-seconds 0.1]

The relay (`relay_once`) is the usual one: in a transaction, SELECT up to --batch unsent outbox
rows oldest first FOR UPDATE SKIP LOCKED, insert them into ClickHouse, UPDATE them as sent,
commit; sleep --poll-seconds when there were none. (It is also not exactly-once: a crash between
the ClickHouse insert and the commit sends those rows again.) It needs a `sent_at` column and a
partial index on unsent rows, added here to the bench's own outbox.

Two phases, one JSON line:
1. backlog: --events rows written with the relay stopped, then drained; events/s, and what the
   relay left in PostgreSQL per event: WAL bytes it wrote and dead tuples (autovacuum off on the
   table for the count; the WAL-reading consumer writes neither, it only reads the WAL);
2. steady: --rate events/s for --seconds with the relay polling, commit → queryable latency
   measured as bench_latency.py does.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_consumer_drain import FILL_SQL, bench_engines
from bench.bench_latency import LatencyPoller, publish_steadily
from bench.measure import where_and_when
from cdc_consumer import clickhouse, migrations

_COLUMNS = (
    "event_id",
    "event_type",
    "event_date_time",
    "environment",
    "event_context",
    "event_context_raw",
    "metadata_version",
)
_SELECT = """
SELECT event_id::text, event_type, event_date_time::text, environment, event_context::text,
       metadata_version
FROM event_outbox WHERE sent_at IS NULL ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED
"""


def relay_once(
    conn: psycopg.Connection[Any], sink: clickhouse.ClickHouseTransport, batch: int
) -> int:
    """One round of the relay; returns how many rows it sent."""
    with conn.transaction():
        rows = conn.execute(_SELECT, (batch,)).fetchall()
        if not rows:
            return 0
        encoded = [
            orjson.dumps(dict(zip(_COLUMNS, (i, t, d, e, orjson.Fragment(c), c, v), strict=True)))
            for i, t, d, e, c, v in rows
        ]
        sink.insert(
            "event_log",
            encoded,
            columns=_COLUMNS,
            query_id=f"relay-{uuid.uuid4().hex}",
            settings={"date_time_input_format": "best_effort"},
        )
        conn.execute(
            "UPDATE event_outbox SET sent_at = now() WHERE event_id = ANY(%s::uuid[])",
            ([row[0] for row in rows],),
        )
    return len(rows)


class Relay(threading.Thread):
    def __init__(self, url: str, clickhouse_url: str, *, batch: int, poll_seconds: float) -> None:
        super().__init__(name="relay", daemon=True)
        self._url, self._clickhouse_url = url, clickhouse_url
        self._batch, self._poll = batch, poll_seconds
        self.stop = threading.Event()
        self.sent = 0
        self.inserts = 0
        self.failed: BaseException | None = None

    def run(self) -> None:
        try:
            self._relay()
        except BaseException as exc:
            self.failed = exc
            raise

    def check(self) -> None:
        if self.failed is not None:
            raise SystemExit(f"the relay failed: {self.failed!r}")

    def _relay(self) -> None:
        sink = clickhouse.connect(self._clickhouse_url)
        try:
            with psycopg.connect(self._url, autocommit=True) as conn:
                while not self.stop.is_set():
                    sent = relay_once(conn, sink, self._batch)
                    self.sent += sent
                    self.inserts += 1 if sent else 0
                    if not sent:
                        self.stop.wait(self._poll)
        finally:
            sink.close()


def _prepare(url: str, clickhouse_url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        migrations.migrate_postgres(conn, migrations.SQL_ROOT / "postgres")
        conn.execute("ALTER TABLE event_outbox ADD COLUMN sent_at timestamptz")
        conn.execute("CREATE INDEX event_outbox_unsent ON event_outbox (created_at)"
                     " WHERE sent_at IS NULL")  # fmt: skip
        conn.execute("ALTER TABLE event_outbox SET (autovacuum_enabled = false)")
    transport = clickhouse.connect(clickhouse_url)
    try:
        migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
    finally:
        transport.close()


def _wal_lsn(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def _backlog(url: str, clickhouse_url: str, args: argparse.Namespace) -> dict[str, object]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FILL_SQL % {"chunks": args.events // 100, "size": 100})
        before = _wal_lsn(conn)
        relay = Relay(url, clickhouse_url, batch=args.batch, poll_seconds=args.poll_seconds)
        started = time.perf_counter()
        relay.start()
        while relay.sent < args.events:
            relay.check()
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        relay.stop.set()
        relay.join()
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)::bigint,"
            " (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'event_outbox')",
            (before,),
        ).fetchone()
    assert row is not None
    wal, dead = int(row[0]), int(row[1])
    return {
        "backlog_events": args.events,
        "backlog_seconds": round(seconds, 2),
        "backlog_events_per_s": round(args.events / seconds),
        "relay_wal_bytes_per_event": round(wal / args.events),
        "dead_tuples_per_event": round(dead / args.events, 2),
    }


def _steady(url: str, clickhouse_url: str, args: argparse.Namespace) -> dict[str, object]:
    relay = Relay(url, clickhouse_url, batch=args.batch, poll_seconds=args.poll_seconds)
    relay.start()
    poller = LatencyPoller(clickhouse_url)
    poller.start()
    published = publish_steadily(url, rate=args.rate, seconds=args.seconds)
    latency = poller.finish(published, within=30, check=relay.check)
    relay.stop.set()
    relay.join()
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        **latency,
        "inserts_per_s": round(relay.inserts / args.seconds, 1),
        "rows_per_insert": round(relay.sent / max(1, relay.inserts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=10_000, help="rows per relay round")
    parser.add_argument("--poll-seconds", type=float, default=0.1)
    args = parser.parse_args()
    with bench_engines("bench-relay-", "http") as (_work, pg, clickhouse_url):
        _prepare(pg.url, clickhouse_url)
        backlog = _backlog(pg.url, clickhouse_url, args)
        steady = _steady(pg.url, clickhouse_url, args)
    print(json.dumps({
        "batch": args.batch,
        "poll_seconds": args.poll_seconds,
        **backlog,
        **steady,
        **where_and_when(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
