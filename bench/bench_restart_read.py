"""Consumer startup against the size of event_log: the fence, the source check and the restart
read (positions stored at or above the slot's confirmed position), against the unbounded read
the consumer used before (the maximum position over all of event_log).

    .venv/bin/python bench/bench_restart_read.py [--rows 10000000 100000000] [--above 1000]

For each size: a fresh chDB data directory with sql/clickhouse applied, N synthetic rows of
one source (INSERT ... SELECT FROM numbers(); commit LSN and event time rising together, as
they do in a real outbox), `--above` of them at or above the confirmed position. Each read runs
three times warm; the best and the median are printed with the granules the plan selects.
Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import (
    best_and_median,
    fresh_clickhouse,
    granules_selected,
    timed,
    where_and_when,
)
from cdc_consumer.clickhouse_sink import ClickHouseSink
from cdc_consumer.sink import SourceIdentity
from cdc_consumer.timeline import WalHistory

SOURCE = "bench_source"
FIRST = WalHistory(1)  # rows without a timeline, on a server that never failed over
UNBOUNDED = (
    "SELECT source_lsn, source_seq FROM (SELECT source_lsn, source_seq FROM event_log"
    " UNION ALL SELECT source_lsn, source_seq FROM event_log_dead_letter)"
    " ORDER BY source_lsn DESC, source_seq DESC LIMIT 1"
)


def measure(rows: int, above: int) -> dict[str, object]:
    with fresh_clickhouse("bench-restart-") as transport:
        started = time.perf_counter()
        transport.command(
            "INSERT INTO event_log (event_id, event_type, event_date_time, environment,"
            " event_context, event_context_raw, metadata_version, source, source_lsn,"
            " source_seq) SELECT generateUUIDv4(number), 'user_created',"
            " toDateTime64('2025-01-01 00:00:00', 6, 'UTC')"
            " + toIntervalMicrosecond(number * 100000), 'bench', '{}', '{}', 1,"
            f" '{SOURCE}', number * 100, number % 3 FROM numbers({rows})"
        )
        fill_seconds = time.perf_counter() - started
        confirmed = (rows - above) * 100
        sink = ClickHouseSink(transport, source=SOURCE)
        identity = SourceIdentity("7000000000000000000", "bench", "bench_slot")

        def startup() -> None:
            sink.fence_earlier_runs()
            sink.check_source(identity, FIRST, slot_lsn=confirmed)
            stored = sink.stored_positions(confirmed, FIRST)
            assert stored.rows == above, stored.rows

        bounded = timed(startup)
        unbounded = timed(lambda: transport.select(UNBOUNDED))
        return {
            "rows": rows,
            "rows_above_confirmed": above,
            "fill_seconds": round(fill_seconds, 1),
            **best_and_median("startup", bounded),
            "startup_granules": granules_selected(
                transport, sink.restart_read_sql(confirmed, FIRST)
            ),
            **best_and_median("unbounded_read", unbounded),
            "unbounded_granules": granules_selected(transport, UNBOUNDED),
            **where_and_when(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--above", type=int, default=1000)
    args = parser.parse_args()
    for rows in args.rows:
        print(json.dumps(measure(rows, args.above)), flush=True)


if __name__ == "__main__":
    main()
