"""What the ClickHouse benchmarks share: warm timings and the granules a plan selects."""

from __future__ import annotations

import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from cdc_consumer import migrations
from cdc_consumer.clickhouse import ChdbTransport

_READ = re.compile(r"Parts: \d+ \| Granules: \d+")


def timed(run: Callable[[], object], repeats: int = 3) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return seconds


def granules_selected(transport: ChdbTransport, sql: str) -> str:
    plan = [str(row[0]) for row in transport.select(f"EXPLAIN indexes = 1 {sql}")]
    reads = [match.group(0) for line in plan if (match := _READ.search(line))]
    return reads[0] if reads else "?"


def best_and_median(name: str, seconds: list[float]) -> dict[str, float]:
    return {
        f"{name}_best_s": round(min(seconds), 3),
        f"{name}_median_s": round(statistics.median(seconds), 3),
    }


def where_and_when() -> dict[str, object]:
    """The machine, how busy it was, and when: beside every figure."""
    return {
        "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@contextmanager
def fresh_clickhouse(prefix: str) -> Iterator[ChdbTransport]:
    """A chDB engine on a temporary directory with sql/clickhouse applied."""
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        transport = ChdbTransport(str(Path(directory) / "ch"))
        try:
            migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
            yield transport
        finally:
            transport.close()
