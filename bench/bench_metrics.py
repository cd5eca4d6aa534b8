"""What the consumer's metrics cost per batch, against observing every event one by one.

    .venv/bin/python bench/bench_metrics.py [--rows 50000] [--repeats 200]

For a batch of --rows rows, in transactions of 100 rows and of 1 row (the worst case: one
latency observation per row), times `PrometheusMetrics.batch_written` and `written` (what the
sink worker calls once per batch), the empty hooks of metrics off, and the alternative the
design avoids: prometheus-client's `Histogram.observe` once per event. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdc_consumer.batch import Batch
from cdc_consumer.metrics import LATENCY_BUCKETS, OFF, Metrics, PrometheusMetrics

_PG_EPOCH_UNIX = 946_684_800


def _batch(rows: int, tx_size: int) -> Batch:
    now_us = int((time.time() - _PG_EPOCH_UNIX) * 1e6)
    row = b"x" * 240
    commits = [(now_us - 1_000_000 + n, tx_size) for n in range(rows // tx_size)]
    return Batch(rows=[row] * rows, nbytes=240 * rows, confirm_lsn=1, commits=commits)


def _best_us(work: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return round(best * 1e6, 1)


def _per_batch(metrics: Metrics, batch: Batch) -> Callable[[], None]:
    def work() -> None:
        metrics.written("batch", rows=len(batch.rows), nbytes=batch.nbytes, seconds=0.5)
        metrics.batch_written(batch)

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    result: dict[str, object] = {"rows": args.rows}
    for tx_size in (100, 1):
        batch = _batch(args.rows, tx_size)
        on = _best_us(_per_batch(PrometheusMetrics(), batch), args.repeats)
        result[f"tx_{tx_size}_on_us_per_batch"] = on
        result[f"tx_{tx_size}_on_ns_per_event"] = round(on * 1000 / args.rows, 2)
    result["off_us_per_batch"] = _best_us(_per_batch(OFF, _batch(args.rows, 100)), args.repeats)
    histogram = Histogram("x_seconds", "x", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())

    def per_event() -> None:
        for _ in range(args.rows):
            histogram.observe(0.7)

    every = _best_us(per_event, max(3, args.repeats // 20))
    result["observe_per_event_us_per_batch"] = every
    result["observe_per_event_ns_per_event"] = round(every * 1000 / args.rows, 1)
    result["python"] = platform.python_version()
    result["machine"] = f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
