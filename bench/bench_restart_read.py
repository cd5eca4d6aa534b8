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
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdc_consumer import migrations
from cdc_consumer.clickhouse import ChdbTransport
from cdc_consumer.clickhouse_sink import ClickHouseSink
from cdc_consumer.sink import SourceIdentity
from cdc_consumer.timeline import WalHistory

SOURCE = "bench_source"
FIRST = WalHistory(1)  # rows without a timeline, on a server that never failed over
_READ = re.compile(r"Parts: \d+ \| Granules: \d+")
UNBOUNDED = (
    "SELECT source_lsn, source_seq FROM (SELECT source_lsn, source_seq FROM event_log"
    " UNION ALL SELECT source_lsn, source_seq FROM event_log_dead_letter)"
    " ORDER BY source_lsn DESC, source_seq DESC LIMIT 1"
)


def _timed(run: Callable[[], object], repeats: int = 3) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return seconds


def _granules(transport: ChdbTransport, sql: str) -> str:
    plan = [str(row[0]) for row in transport.select(f"EXPLAIN indexes = 1 {sql}")]
    reads = [match.group(0) for line in plan if (match := _READ.search(line))]
    return reads[0] if reads else "?"


def measure(rows: int, above: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as directory:
        transport = ChdbTransport(str(Path(directory) / "ch"))
        try:
            migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
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

            bounded = _timed(startup)
            unbounded = _timed(lambda: transport.select(UNBOUNDED))
            return {
                "rows": rows,
                "rows_above_confirmed": above,
                "fill_seconds": round(fill_seconds, 1),
                "startup_best_s": round(min(bounded), 3),
                "startup_median_s": round(statistics.median(bounded), 3),
                "startup_granules": _granules(transport, sink.restart_read_sql(confirmed, FIRST)),
                "unbounded_read_best_s": round(min(unbounded), 3),
                "unbounded_read_median_s": round(statistics.median(unbounded), 3),
                "unbounded_granules": _granules(transport, UNBOUNDED),
                "machine": f"{platform.machine()} {platform.node()}",
                "date": time.strftime("%Y-%m-%d"),
            }
        finally:
            transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--above", type=int, default=1000)
    args = parser.parse_args()
    for rows in args.rows:
        print(json.dumps(measure(rows, args.above)), flush=True)


if __name__ == "__main__":
    main()
