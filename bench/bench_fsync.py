"""What CLICKHOUSE_FSYNC_AFTER_INSERT costs one insert into event_log, by batch size.

    .venv/bin/python bench/bench_fsync.py [--sizes 1000,10000,50000] [--repeats 3] [--dir DIR]
    strace -f -c -e trace=fsync,fdatasync .venv/bin/python bench/bench_fsync.py --modes on ...

Migrates a fresh chDB data directory (in process, on DIR's disk: fsync costs what that disk
costs), then inserts batches of outbox-shaped rows through the consumer's own encoder and sink
(`ClickHouseSink.write`, the pinned insert settings), alternating rounds with the fsync table
settings off and on, as `migrate` sets them. Prints one JSON line: per batch size and mode, the
median and worst insert in milliseconds, and the kind of part (Compact or Wide) the inserts made,
since ClickHouse fsyncs every file of a part and a Wide part has a file per column. Under
`strace -c` with `--modes on` alone, the syscall summary is what the fsyncs themselves took.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdc_consumer import migrations, provisioning
from cdc_consumer.backfill import TEXT_RELATION
from cdc_consumer.clickhouse import ChdbTransport
from cdc_consumer.clickhouse_sink import ClickHouseSink
from cdc_consumer.event_log import EventLogEncoder
from cdc_consumer.sink import SourcePosition


def _rows(encoder: EventLogEncoder, count: int, lsn: int) -> list[bytes]:
    """`count` encoded rows like the drain benchmark's (~240 bytes of outbox payload each)."""
    now = datetime.now(UTC).isoformat(sep=" ").encode()
    rows = []
    for n in range(count):
        context = (
            f'{{"n": {n}, "plan": "pro", "email": "user{n}@bench.example", "last_name":'
            f' "Lovelace", "first_name": "Ada"}}'
        ).encode()
        values = [str(uuid.uuid4()).encode(), b"user_created", now, b"bench", context, b"1", None]
        rows.append(encoder.encode(values, SourcePosition(lsn, n)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each mode per size")
    parser.add_argument("--inserts", type=int, default=10, help="inserts per round")
    parser.add_argument("--dir", default=None, help="parent of the chDB data directory")
    parser.add_argument("--modes", default="off,on", help="which of off,on to run, in turn")
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="bench-fsync-", dir=args.dir))
    transport = ChdbTransport(str(work / "ch"))
    migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
    sink = ClickHouseSink(transport, source="bench")
    encoder = EventLogEncoder(TEXT_RELATION, source="bench", timeline=1)
    results: dict[str, dict[str, object]] = {}
    lsn = 0
    for size in (int(s) for s in args.sizes.split(",")):
        modes = args.modes.split(",")
        timings: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                provisioning.ensure_fsync(transport, enabled=mode == "on")
                for _ in range(args.inserts):
                    lsn += 1
                    rows = _rows(encoder, size, lsn)
                    started = time.perf_counter()
                    sink.write(rows)
                    timings[mode].append((time.perf_counter() - started) * 1000)
        [[part_type]] = transport.select(
            "SELECT any(part_type) FROM system.parts WHERE table = 'event_log' AND active"
            f" AND rows = {size}"
        )
        for mode, values in timings.items():
            results[f"{size}_{mode}"] = {
                "inserts": len(values),
                "p50_ms": round(statistics.median(values), 1),
                "max_ms": round(max(values), 1),
            }
        results[f"{size}_part_type"] = {"part_type": part_type}
        if set(timings) == {"off", "on"}:
            off, on = (statistics.median(timings[m]) for m in ("off", "on"))
            results[f"{size}_cost"] = {
                "extra_ms_p50": round(on - off, 1),
                "ratio": round(on / off, 2),
            }
    transport.close()
    shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "results": results,
                "dir": str(work.parent),
                "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}",
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
    )


if __name__ == "__main__":
    main()
