"""Pruning the outbox: chunked DELETE by primary key (what outbox_prune does) against dropping
a day partition of a time-partitioned outbox, on the same rows.

    .venv/bin/python bench/bench_prune.py [--rows 200000] [--chunk 5000]

Starts a disposable PostgreSQL (postgres.conf: track_commit_timestamp on), fills two copies of
event_outbox with the same N rows of ~240 bytes (a plain table as in sql/postgres/, and one
partitioned by day on created_at, all rows in one day partition), then times (1) deleting them
in chunks with the shipped-commit-time rule, each chunk its own transaction, and the longest
chunk (how long row locks are held), and (2) DETACH + DROP of the partition. Also times 5,000
single-row publishing INSERTs into each table, the price the partitioned table would charge
every request. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.postgres import DisposablePostgres

COLUMNS = """
    event_id uuid NOT NULL, event_type text NOT NULL, event_date_time timestamptz NOT NULL,
    environment text NOT NULL, event_context jsonb NOT NULL, metadata_version bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
"""
ROW_SELECT = """
SELECT gen_random_uuid(), 'user_created', clock_timestamp(), 'bench',
       jsonb_build_object('email', 'user' || g || '@bench.example', 'first_name', 'Ada',
                          'last_name', 'Lovelace', 'plan', 'pro', 'n', g),
       1, '2026-11-18 12:00+00'
FROM generate_series(1, %(rows)s) AS g
"""
SINGLE_INSERT = (
    "INSERT INTO {table} (event_id, event_type, event_date_time, environment, event_context,"
    " metadata_version) VALUES (gen_random_uuid(), 'user_created', now(), 'bench',"
    ' \'{{"email": "a@b.example"}}\', 1)'
)
CHUNK_DELETE = """
DELETE FROM plain WHERE event_id IN (
    SELECT event_id FROM plain
    WHERE created_at < now() - interval '1 day'
      AND pg_xact_commit_timestamp(xmin) <= now()
    ORDER BY created_at LIMIT %(chunk)s)
"""


def _setup(conn: psycopg.Connection[tuple[object, ...]], rows: int) -> None:
    conn.execute(f"CREATE TABLE plain ({COLUMNS}, PRIMARY KEY (event_id))")
    conn.execute("CREATE INDEX ON plain (created_at)")
    conn.execute(f"CREATE TABLE parted ({COLUMNS}) PARTITION BY RANGE (created_at)")
    conn.execute("CREATE INDEX ON parted (created_at)")
    conn.execute("CREATE UNIQUE INDEX ON parted (event_id, created_at)")
    conn.execute(
        "CREATE TABLE parted_20261118 PARTITION OF parted"
        " FOR VALUES FROM ('2026-11-18') TO ('2026-11-19')"
    )
    conn.execute(
        "CREATE TABLE parted_20261125 PARTITION OF parted"
        " FOR VALUES FROM ('2026-11-25') TO ('2026-11-26')"
    )
    for table in ("plain", "parted"):
        conn.execute(f"INSERT INTO {table} {ROW_SELECT}", {"rows": rows})
    conn.execute("VACUUM ANALYZE plain")
    conn.execute("VACUUM ANALYZE parted")


def _single_inserts(conn: psycopg.Connection[tuple[object, ...]], table: str, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        conn.execute(SINGLE_INSERT.format(table=table))
    return (time.perf_counter() - started) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=5_000)
    args = parser.parse_args()
    server = DisposablePostgres.create(prefix="outbox-bench-prune-")
    server.start()
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            _setup(conn, args.rows)
            started = time.perf_counter()
            deleted = chunks = 0
            longest = 0.0
            while True:
                chunk_started = time.perf_counter()
                removed = conn.execute(CHUNK_DELETE, {"chunk": args.chunk}).rowcount
                longest = max(longest, time.perf_counter() - chunk_started)
                if removed == 0:
                    break
                deleted += removed
                chunks += 1
            chunked_s = time.perf_counter() - started
            started = time.perf_counter()
            conn.execute("ALTER TABLE parted DETACH PARTITION parted_20261118")
            conn.execute("DROP TABLE parted_20261118")
            dropped_s = time.perf_counter() - started
            insert_plain = _single_inserts(conn, "plain", 5000)
            insert_parted = _single_inserts(conn, "parted", 5000)
    finally:
        server.destroy()
    print(
        json.dumps(
            {
                "rows": args.rows,
                "chunk_rows": args.chunk,
                "chunked_delete_s": round(chunked_s, 2),
                "chunked_delete_rows_per_s": round(deleted / chunked_s),
                "chunks": chunks,
                "longest_chunk_ms": round(longest * 1000, 1),
                "partition_drop_ms": round(dropped_s * 1000, 1),
                "insert_ms_plain": round(insert_plain, 3),
                "insert_ms_partitioned": round(insert_parted, 3),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
