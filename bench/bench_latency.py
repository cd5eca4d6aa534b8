"""Commit → queryable in ClickHouse at a steady publish rate, and what it costs ClickHouse.

    .venv/bin/python bench/bench_latency.py --rate 1000 --seconds 60 [--batch-max-seconds 1.0] \
        [--transport http|chdb]

Starts a disposable PostgreSQL and ClickHouse (the drain benchmark's `bench_engines`), a
consumer with CDC_BATCH_MAX_SECONDS=--batch-max-seconds, and, once it streams, publishes
--rate events a second for --seconds: a transaction every 10 ms holding that tick's events,
each stamped with the server's clock_timestamp() as it is written (a few milliseconds before
its commit: the latency measured is, if anything, longer than commit → queryable). A poller
asks ClickHouse every 20 ms for the events that became visible since its last look (a range
of the sort key) and takes each one's latency as the time of the poll that first saw it minus
its stamp; the poll interval bounds the error (at most 20 ms more). Prints one JSON line: p50,
p99 and max latency, inserts a second and rows per insert (from the consumer's log).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_consumer_drain import _consumer_env, bench_engines
from bench.measure import where_and_when
from cdc_consumer import clickhouse

_TICK_SECONDS = 0.01
_POLL_SECONDS = 0.02
_PUBLISH = """
INSERT INTO event_outbox (event_id, event_type, event_date_time, environment, event_context,
                          metadata_version)
SELECT gen_random_uuid(), 'latency_probe', clock_timestamp(), 'bench',
       jsonb_build_object('email', 'user' || g || '@bench.example', 'plan', 'pro', 'n', g), 1
FROM generate_series(1, %s) AS g
"""


def publish_steadily(url: str, *, rate: int, seconds: float) -> int:
    """`rate` events a second for `seconds`, a transaction per tick; returns how many."""
    published, carry = 0, 0.0
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.monotonic()
        tick = 0
        while (now := time.monotonic()) - started < seconds:
            carry += rate * _TICK_SECONDS
            count, carry = int(carry), carry - int(carry)
            if count:
                conn.execute(_PUBLISH, (count,))
                published += count
            tick += 1
            time.sleep(max(0.0, started + tick * _TICK_SECONDS - now))
    return published


class LatencyPoller(threading.Thread):
    """Collects each probe's latency: first poll that saw it, less its stamp."""

    def __init__(self, clickhouse_url: str) -> None:
        super().__init__(name="poller", daemon=True)
        self._url = clickhouse_url
        self.latencies: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        transport = clickhouse.connect(self._url)
        last = 0  # microseconds since the epoch of the newest stamp seen
        try:
            while not self.done.is_set():
                rows = transport.select(
                    "SELECT toUnixTimestamp64Micro(event_date_time) FROM event_log"
                    " WHERE event_type = 'latency_probe'"
                    f" AND event_date_time > fromUnixTimestamp64Micro({last}, 'UTC')"
                )
                seen = time.time()
                for (stamp,) in rows:
                    self.latencies.append(seen - int(stamp) / 1e6)
                    last = max(last, int(stamp))
                time.sleep(_POLL_SECONDS)
        finally:
            transport.close()

    def finish(
        self, published: int, *, within: float, check: Callable[[], None] = lambda: None
    ) -> dict[str, object]:
        """Wait (up to `within` seconds, calling `check` between looks) until every one of
        `published` probes was seen, stop polling, and sum up their latencies."""
        deadline = time.monotonic() + within
        while len(self.latencies) < published and time.monotonic() < deadline:
            check()
            time.sleep(0.05)
        self.done.set()
        self.join()
        ordered = sorted(self.latencies)
        return {
            "published": published,
            "seen": len(ordered),
            "latency_p50_s": round(statistics.median(ordered), 3),
            "latency_p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
            "latency_max_s": round(ordered[-1], 3),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=1000, help="events a second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch-max-seconds", type=float, default=1.0)
    parser.add_argument("--transport", choices=["chdb", "http"], default="http")
    args = parser.parse_args()
    with bench_engines("bench-latency-", args.transport) as (work, pg, clickhouse_url):
        env = {
            **_consumer_env(pg.url, clickhouse_url, fsync=False, metrics_port=None),
            "CDC_BATCH_MAX_SECONDS": str(args.batch_max_seconds),
        }
        subprocess.run([sys.executable, "-m", "cdc_consumer", "migrate"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        log_path = work / "consumer.log"
        with log_path.open("w") as log_file:
            consumer = subprocess.Popen(
                [sys.executable, "-m", "cdc_consumer", "run"], env=env, stderr=log_file
            )
            while '"streaming"' not in log_path.read_text():
                if consumer.poll() is not None:
                    raise SystemExit(f"consumer died:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.05)
            poller = LatencyPoller(clickhouse_url)
            poller.start()
            published = publish_steadily(pg.url, rate=args.rate, seconds=args.seconds)
            latency = poller.finish(published, within=30 + 2 * args.batch_max_seconds)
            consumer.send_signal(signal.SIGTERM)
            consumer.wait(60)
        # Only probes are published, so every batch is one of the run's.
        batches = [
            json.loads(line)
            for line in log_path.read_text().splitlines()
            if '"batch written"' in line
        ]
    print(json.dumps({
        "rate": args.rate,
        "seconds": args.seconds,
        "batch_max_seconds": args.batch_max_seconds,
        "transport": args.transport,
        **latency,
        "inserts_per_s": round(len(batches) / args.seconds, 2),
        "rows_per_insert": round(sum(b["rows"] for b in batches) / max(1, len(batches))),
        "poll_seconds": _POLL_SECONDS,
        **where_and_when(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
