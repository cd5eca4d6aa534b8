"""`make demo`: the whole pipeline on embedded engines, end to end, with a verdict.

A disposable PostgreSQL from the wheel (configured by postgres.conf), ClickHouse in process
through chDB, and the real consumer as a subprocess, in two phases:

1. requests: N users created through the Django service from --workers threads, each publishing
   `user_created` in its own transaction. Their rate is the service's (Django, two INSERTs and
   a durable commit per user), not the pipeline's: the pipeline keeps up and is measured by how
   long after the last request it had the last event confirmed.
2. bulk: --bulk events published with `publish_many` in transactions of 1,000, as a backfill or
   a batch job would. Here the pipeline's own rate shows: from the first commit to the slot
   confirmed past the last (the consumer confirms only what ClickHouse holds).

Then it stops the consumer with SIGTERM, counts what ClickHouse has, and prints one JSON line.
Exit code 0 only if every event of both phases arrived exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

from cdc_consumer.pgoutput import str_to_lsn
from demo.postgres import DisposablePostgres

_WAIT_LIMIT_SECONDS = 600


def _confirmed(conn: psycopg.Connection[tuple[str | None]], slot: str) -> int:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    return str_to_lsn(row[0]) if row and row[0] else 0


_BULK_TRANSACTION = 1000


def _setup_django() -> None:
    import django  # noqa: PLC0415  (after DATABASE_URL is set)

    django.setup()
    from django.core.management import call_command  # noqa: PLC0415

    call_command("migrate", verbosity=0)


def _publish(events: int, workers: int) -> float:
    """Create `events` users through the service from `workers` threads, as concurrent requests
    would; returns the seconds it took."""
    from django.db import connection  # noqa: PLC0415

    from web.accounts.services import user_create  # noqa: PLC0415

    def create_range(worker: int) -> None:
        try:
            for n in range(worker, events, workers):
                user_create(email=f"user{n}@demo.example", first_name="Demo", last_name=f"#{n}")
        finally:
            connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(create_range, range(workers)))
    return time.perf_counter() - started


def _publish_bulk(events: int) -> float:
    """Publish `events` with `publish_many`, `_BULK_TRANSACTION` to a transaction; returns the
    seconds it took."""
    from django.db import connection, transaction  # noqa: PLC0415

    from web.accounts.events import UserCreated  # noqa: PLC0415
    from web.outbox.publish import publish_many  # noqa: PLC0415

    started = time.perf_counter()
    try:
        for first in range(0, events, _BULK_TRANSACTION):
            lot = range(first, min(events, first + _BULK_TRANSACTION))
            with transaction.atomic():
                publish_many(
                    UserCreated(email=f"bulk{n}@demo.example", first_name="Bulk", last_name=f"#{n}")
                    for n in lot
                )
    finally:
        connection.close()
    return time.perf_counter() - started


def _wait_confirmed(url: str, slot: str, consumer: subprocess.Popen[bytes]) -> float:
    """Wait until the slot is confirmed past everything written so far; returns when."""
    with psycopg.connect(url, autocommit=True) as conn:
        current = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert current is not None
        target = str_to_lsn(str(current[0]))
        deadline = time.monotonic() + _WAIT_LIMIT_SECONDS
        while _confirmed(conn, slot) < target and consumer.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    return time.perf_counter()


def _count(chdb_path: Path) -> tuple[int, int]:
    from cdc_consumer.clickhouse import ChdbTransport  # noqa: PLC0415

    transport = ChdbTransport(str(chdb_path))
    try:
        rows = transport.select("SELECT count(), uniqExact(event_id) FROM event_log")
    finally:
        transport.close()
    return int(rows[0][0]), int(rows[0][1])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4, help="concurrent publishers")
    parser.add_argument(
        "--bulk", type=int, default=None, help="events of the bulk phase (default: 10 x --events)"
    )
    args = parser.parse_args()
    bulk = 10 * args.events if args.bulk is None else args.bulk
    workdir = Path(tempfile.mkdtemp(prefix="outbox-demo-"))
    postgres = DisposablePostgres(root=workdir / "postgres")
    postgres.start()
    chdb_path = workdir / "clickhouse"
    env = {
        **os.environ,
        "DATABASE_URL": postgres.url,
        "CLICKHOUSE_URL": f"chdb://{chdb_path}",
        "ENVIRONMENT": os.environ.get("ENVIRONMENT", "demo"),
        "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY", "demo-only-secret-key"),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "info"),
    }
    # The consumer logs every batch to its own file; the publishers stay quiet on the terminal.
    web_env = {"LOG_LEVEL": os.environ.get("DEMO_WEB_LOG_LEVEL", "warning")}
    os.environ.update(env | web_env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "web.settings")
    slot = env.get("CDC_SLOT", "event_outbox_slot")
    consumer_log = workdir / "consumer.log"
    try:
        subprocess.run([sys.executable, "-m", "cdc_consumer", "migrate"], env=env, check=True)
        with consumer_log.open("w") as log_file:
            consumer = subprocess.Popen(
                [sys.executable, "-m", "cdc_consumer", "run"], env=env, stderr=log_file
            )
            _setup_django()
            started = time.perf_counter()
            publish_seconds = _publish(args.events, args.workers)
            requests_confirmed = _wait_confirmed(postgres.url, slot, consumer)
            bulk_started = time.perf_counter()
            bulk_publish_seconds = _publish_bulk(bulk)
            bulk_confirmed = _wait_confirmed(postgres.url, slot, consumer)
            consumer.send_signal(signal.SIGTERM)
            consumer_exit = consumer.wait(timeout=60)
        inserts = sum('"batch written"' in line for line in consumer_log.read_text().splitlines())
        delivered, distinct = _count(chdb_path)
    finally:
        postgres.destroy()
    published = args.events + bulk
    bulk_seconds = bulk_confirmed - bulk_started
    result = {
        "published": published,
        "delivered": distinct,
        "duplicates": delivered - distinct,
        "clickhouse_inserts": inserts,
        "consumer_exit": consumer_exit,
        # Phase 1: the Django service's rate, and how far behind it the pipeline finished.
        "requests": args.events,
        "request_publish_events_per_s": round(args.events / publish_seconds, 1),
        "request_workers": args.workers,
        "confirmed_after_last_request_s": round(requests_confirmed - started - publish_seconds, 3),
        # Phase 2: the pipeline's own rate, commit of the first to confirm of the last.
        "bulk": bulk,
        "bulk_publish_events_per_s": round(bulk / bulk_publish_seconds) if bulk else 0,
        "pipeline_events_per_s": round(bulk / bulk_seconds) if bulk else 0,
    }
    print(json.dumps(result))
    ok = distinct == published and delivered == distinct and consumer_exit == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
