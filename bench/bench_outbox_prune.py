"""`outbox_prune` itself over a large outbox, half of whose rows have no known commit time.

    .venv/bin/python bench/bench_outbox_prune.py [--rows 1000000] [--chunk 5000]

Starts a disposable PostgreSQL (postgres.conf), applies sql/postgres and creates the slot as
`migrate` does, then fills event_outbox with N rows of ~240 bytes: the first half committed
while track_commit_timestamp was off (their commit time reads NULL, as rows past the server's
commit-timestamp horizon do), the second half with it on. It times three prunes with retention
0 through the real Django code path:
1. "held": the slot has not moved since before the rows, so nothing may go (the cost of a
   prune that finds nothing: what each run pays while the consumer is behind);
2. "full": cdc_progress says everything shipped and the slot is advanced past every row
   (pg_log_standby_snapshot, then pg_replication_slot_advance), so every row goes: those with
   a commit time by the commit-time rule, the others by the slot's catalog_xmin;
3. "empty": the same again, with nothing left.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import where_and_when
from cdc_consumer import migrations, provisioning
from cdc_consumer.publication import ensure_publication
from demo.postgres import DisposablePostgres

SLOT = "bench_prune_slot"
ROWS = """
INSERT INTO event_outbox (event_id, event_type, event_date_time, environment, event_context,
                          metadata_version, created_at)
SELECT gen_random_uuid(), 'user_created', clock_timestamp(), 'bench',
       jsonb_build_object('email', 'user' || g || '@bench.example', 'first_name', 'Ada',
                          'last_name', 'Lovelace', 'plan', 'pro', 'n', g),
       1, now() - interval '8 days'
FROM generate_series(1, %(rows)s) AS g
"""


def _restart_with_commit_timestamps(server: DisposablePostgres, value: str) -> None:
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET track_commit_timestamp = {value}")
    server.stop()
    server.start()


def _fill(server: DisposablePostgres, rows: int) -> None:
    with psycopg.connect(server.url, autocommit=True) as conn:
        migrations.migrate_postgres(conn, migrations.SQL_ROOT / "postgres")
        ensure_publication(conn, "bench_prune_pub", slot=SLOT)
        provisioning.ensure_slot(conn, SLOT, url=server.url)
    _restart_with_commit_timestamps(server, "off")
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(ROWS, {"rows": rows // 2})
    _restart_with_commit_timestamps(server, "on")
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(ROWS, {"rows": rows - rows // 2})
        conn.execute("VACUUM ANALYZE event_outbox")


def _ship_everything(server: DisposablePostgres) -> None:
    with psycopg.connect(server.url, autocommit=True) as conn:
        # catalog_xmin moves to a running-transactions record's oldest xid once the slot has
        # been confirmed past that record; a few rounds of both move it past every row.
        for _ in range(10):
            conn.execute("SELECT pg_log_standby_snapshot()")
            conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (SLOT,))
            [[passed]] = conn.execute(
                "SELECT (SELECT min(age(xmin)) FROM event_outbox) > age(catalog_xmin)"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (SLOT,),
            ).fetchall()
            if passed:
                break
        conn.execute(
            "INSERT INTO cdc_progress (slot, confirmed_lsn, last_commit_time, confirmed_at,"
            " updated_at) VALUES (%s, pg_current_wal_lsn(), now(), now(), now())"
            " ON CONFLICT (slot) DO UPDATE SET last_commit_time = now()",
            (SLOT,),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=5_000)
    args = parser.parse_args()
    server = DisposablePostgres.create(prefix="outbox-bench-outbox-prune-")
    server.start()
    try:
        started = time.perf_counter()
        _fill(server, args.rows)
        fill_s = time.perf_counter() - started
        os.environ.update(
            DATABASE_URL=server.url,
            DJANGO_SECRET_KEY="bench-only",
            DJANGO_SETTINGS_MODULE="web.settings",
            LOG_LEVEL="warning",
        )
        # Django reads its settings from the environment at import: only now is it set.
        import django  # noqa: PLC0415

        django.setup()
        from web.outbox.prune import outbox_prune  # noqa: PLC0415

        def prune() -> tuple[float, int, int]:
            started = time.perf_counter()
            result = outbox_prune(
                slots=[SLOT],
                retention=timedelta(0),
                commit_margin=timedelta(0),
                chunk_rows=args.chunk,
            )
            return time.perf_counter() - started, result.deleted, result.chunks

        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO cdc_progress (slot, confirmed_lsn, last_commit_time, confirmed_at,"
                " updated_at) VALUES (%s, '0/0', now() - interval '30 days', now(), now())",
                (SLOT,),
            )
        held_s, held_deleted, _ = prune()
        _ship_everything(server)
        full_s, deleted, chunks = prune()
        empty_s, _, _ = prune()
    finally:
        server.destroy()
    assert held_deleted == 0, held_deleted
    assert deleted == args.rows, deleted
    print(
        json.dumps(
            {
                "rows": args.rows,
                "rows_without_commit_time": args.rows // 2,
                "chunk_rows": args.chunk,
                "fill_s": round(fill_s, 1),
                "held_prune_s": round(held_s, 2),
                "full_prune_s": round(full_s, 2),
                "full_prune_rows_per_s": round(deleted / full_s),
                "chunks": chunks,
                "empty_prune_s": round(empty_s, 3),
                **where_and_when(),
            }
        )
    )


if __name__ == "__main__":
    main()
