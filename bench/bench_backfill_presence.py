"""The backfill's presence check against the size of event_log: which of a chunk of event ids
ClickHouse already holds, looked up by the chunk's stretch of publish time (what the backfill
does) against by event_id alone (what it did before).

    .venv/bin/python bench/bench_backfill_presence.py [--rows 10000000 100000000] [--chunk 10000]

For each size: a fresh chDB data directory with sql/clickhouse applied, N synthetic rows of one
source under five event types, one event a second of publish time (a long stretch; the denser
a real outbox, the narrower a chunk's stretch), then the backfill's check for `--chunk`
consecutive events (LOOKUP_IDS ids per query, within the chunk's stretch of time), and the
check for one event by its stretch of time and by id alone, at three places in the table. Each
query runs once, on rows of its own (a repeated query is answered from ClickHouse's query
condition cache); best and median of the three are printed with the granules the plan selects.
One JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import (
    best_and_median,
    fresh_clickhouse,
    granules_selected,
    timed,
    where_and_when,
)
from cdc_consumer.backfill import CHUNK_ROWS
from cdc_consumer.clickhouse_sink import LOOKUP_IDS, stored_counts_sql, stored_event_counts

SOURCE = "bench_source"
EVENT_TYPES = "['user_created', 'user_updated', 'order_placed', 'order_paid', 'login']"


def _published(text: object) -> datetime:
    return datetime.fromisoformat(str(text)).replace(tzinfo=UTC)


def measure(rows: int, chunk: int) -> dict[str, object]:
    with fresh_clickhouse("bench-presence-") as transport:
        started = time.perf_counter()
        transport.command(
            "INSERT INTO event_log (event_id, event_type, event_date_time, environment,"
            " event_context, event_context_raw, metadata_version, source, source_lsn,"
            " source_seq) SELECT generateUUIDv4(number),"
            f" {EVENT_TYPES}[number % 5 + 1],"
            " toDateTime64('2024-01-01 00:00:00', 6, 'UTC') + toIntervalSecond(number),"
            f" 'bench', '{{}}', '{{}}', 1, '{SOURCE}', number + 1, 0 FROM numbers({rows})"
        )
        fill_seconds = time.perf_counter() - started
        # Each query runs once, on a chunk of its own: ClickHouse's query condition cache would
        # make a repeated query's second run read almost nothing.
        chunk_s: list[float] = []
        bounded_s: list[float] = []
        by_id_s: list[float] = []
        for offset in (rows // 4, rows // 2, rows * 3 // 4):
            picked = transport.select(
                "SELECT toString(event_id), toString(event_date_time) FROM event_log"
                f" ORDER BY event_date_time LIMIT {chunk} OFFSET {offset}"
            )
            # The backfill's lookup: the chunk's ids within its stretch of event_date_time.
            ids = [str(row[0]) for row in picked[1:]]
            between = (_published(picked[1][1]), _published(picked[-1][1]))
            check = partial(stored_event_counts, transport, ids, between=between)
            chunk_s += timed(check, repeats=1)
            # One query's worth (the chunk's first row, not in the above), by time and by id.
            first_id, first_published = str(picked[0][0]), _published(picked[0][1])
            bounded = stored_counts_sql([first_id], between=(first_published,) * 2)
            by_id = (
                "SELECT toString(event_id) FROM event_log"
                f" WHERE source = '{SOURCE}' AND event_id = '{first_id}'"
            )
            bounded_s += timed(partial(transport.select, bounded), repeats=1)
            by_id_s += timed(partial(transport.select, by_id), repeats=1)
        return {
            "rows": rows,
            "chunk": chunk,
            "fill_seconds": round(fill_seconds, 1),
            **best_and_median("chunk_check", chunk_s),
            "ids_per_query": LOOKUP_IDS,
            **best_and_median("by_time", bounded_s),
            "by_time_granules": granules_selected(transport, bounded),
            **best_and_median("by_id", by_id_s),
            "by_id_granules": granules_selected(transport, by_id),
            **where_and_when(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--chunk", type=int, default=CHUNK_ROWS)
    args = parser.parse_args()
    for rows in args.rows:
        print(json.dumps(measure(rows, args.chunk)), flush=True)


if __name__ == "__main__":
    main()
