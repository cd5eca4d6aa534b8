"""Scale-out: the aggregate drain of one consumer against N shards (CDC_SHARD) on the same WAL.

    .venv/bin/python bench/bench_scale_out.py --events 1000000 [--shards 2] [--transport http]

Starts a disposable PostgreSQL and ClickHouse, migrates one unsharded consumer and N shard
consumers (each its own slot and row-filtered publication) so that every slot holds the same
backlog, writes N outbox rows with all of them stopped, then drains it twice: the one consumer
alone, then the N shards at once, each from the first slot going active until every slot is
confirmed past the last row (event_log emptied between the two). Prints one JSON line: for each
run the seconds, the aggregate events/s, and the CPU seconds of the consumers, of the
walsenders (each decodes all the WAL, and evaluates its row filter on every row) and of the
ClickHouse server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_consumer_drain import (
    FILL_SQL,
    bench_engines,
    clickhouse_server_process,
    process_cpu_seconds,
)
from cdc_consumer import clickhouse
from cdc_consumer.pgoutput import str_to_lsn


def _env(database_url: str, clickhouse_url: str, slot: str, shard: str | None) -> dict[str, str]:
    env = {**os.environ, "DATABASE_URL": database_url, "CLICKHOUSE_URL": clickhouse_url,
           "CDC_SLOT": f"{slot}_slot", "CDC_PUBLICATION": f"{slot}_pub",
           "LOG_FORMAT": "json", "LOG_LEVEL": "warning"}  # fmt: skip
    for name in ("CDC_METRICS_PORT", "CDC_SHARD", "CDC_SOURCE", "SENTRY_DSN"):
        env.pop(name, None)
    if shard is not None:
        env["CDC_SHARD"] = shard
    return env


def _drain(url: str, envs: list[dict[str, str]], target: int) -> dict[str, float]:
    """Run these consumers at once until each one's slot is confirmed at `target`."""
    slots = [env["CDC_SLOT"] for env in envs]
    consumers = [
        subprocess.Popen([sys.executable, "-m", "cdc_consumer", "run"], env=env) for env in envs
    ]
    procs = [psutil.Process(c.pid) for c in consumers]
    server = clickhouse_server_process()
    started = 0.0
    cpu_at_start: dict[str, float] = {}
    walsenders: list[psutil.Process] = []
    peak_rss = 0
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT active_pid, confirmed_flush_lsn::text FROM pg_replication_slots"
                " WHERE slot_name = ANY(%s)",
                (slots,),
            ).fetchall()
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in procs))
            if not started and all(pid for pid, _ in rows) and len(rows) == len(slots):
                started = time.perf_counter()
                walsenders = [psutil.Process(pid) for pid, _ in rows]
                cpu_at_start = {
                    "consumers": sum(process_cpu_seconds(p) for p in procs),
                    "walsenders": sum(process_cpu_seconds(p) for p in walsenders),
                    "clickhouse_server": process_cpu_seconds(server) if server else 0.0,
                }
            if started and all(str_to_lsn(lsn) >= target for _, lsn in rows):
                break
            if any(c.poll() is not None for c in consumers):
                raise SystemExit("a consumer died")
            time.sleep(0.05)
    seconds = time.perf_counter() - started
    cpu = {
        "consumers": sum(process_cpu_seconds(p) for p in procs) - cpu_at_start["consumers"],
        "walsenders": sum(process_cpu_seconds(p) for p in walsenders) - cpu_at_start["walsenders"],
        "clickhouse_server": (process_cpu_seconds(server) if server else 0.0)
        - cpu_at_start["clickhouse_server"],
    }
    for consumer in consumers:
        consumer.send_signal(signal.SIGTERM)
    for consumer in consumers:
        consumer.wait(60)
    return {
        "seconds": round(seconds, 2),
        **{f"{name}_cpu_seconds": round(value, 2) for name, value in cpu.items()},
        "consumers_peak_rss_mb": round(peak_rss / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tx-size", type=int, default=100)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--transport", choices=["chdb", "http"], default="http")
    args = parser.parse_args()
    if args.transport == "chdb":
        raise SystemExit("chdb:// is one process per data directory: shards need --transport http")
    with bench_engines("bench-scale-", args.transport) as (_work, pg, clickhouse_url):
        single = [_env(pg.url, clickhouse_url, "single", None)]
        shards = [
            _env(pg.url, clickhouse_url, f"shard{k}", f"{k}/{args.shards}")
            for k in range(args.shards)
        ]
        for env in single + shards:
            subprocess.run([sys.executable, "-m", "cdc_consumer", "migrate"], env=env,
                           check=True, capture_output=True)  # fmt: skip
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(FILL_SQL % {"chunks": args.events // args.tx_size, "size": args.tx_size})
            [target] = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("0/0",)
        runs = {}
        for name, envs in (("one_consumer", single), (f"{args.shards}_shards", shards)):
            transport = clickhouse.connect(clickhouse_url)
            try:
                transport.command("TRUNCATE TABLE event_log")
            finally:
                transport.close()
            run = _drain(pg.url, envs, str_to_lsn(target))
            run["events_per_s"] = round(args.events / run["seconds"])
            run["walsender_cpu_us_per_event"] = round(
                run["walsenders_cpu_seconds"] / args.events * 1e6, 1
            )
            runs[name] = run
    one, many = runs["one_consumer"], runs[f"{args.shards}_shards"]
    print(json.dumps({
        "events": args.events,
        "tx_size": args.tx_size,
        "shards": args.shards,
        "transport": args.transport,
        **runs,
        "speedup": round(one["seconds"] / many["seconds"], 2),
        "walsender_cpu_ratio": round(
            many["walsenders_cpu_seconds"] / max(one["walsenders_cpu_seconds"], 1e-9), 2
        ),
        "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}",
    }))  # fmt: skip


if __name__ == "__main__":
    main()
