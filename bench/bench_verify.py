"""How long `verify` takes over a window of N events, and how much memory it needs.

    .venv/bin/python bench/bench_verify.py --events 1000000 [--transport http|chdb]

Starts a disposable PostgreSQL and ClickHouse (the chDB HTTP test server, or chDB in process),
writes N outbox rows (~240 bytes each, 1,000 per transaction), lets the real consumer ship them
all, stops it, then runs `python -m cdc_consumer verify --since <before the first row> --json`
as its own process, sampling its RSS every 20 ms. Prints one JSON line with the time, the rate,
the peak RSS and what verify reported (it must be whole: checked == N).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_consumer_drain import FILL_SQL, bench_engines
from bench.measure import where_and_when
from cdc_consumer.pgoutput import str_to_lsn


def _peak_rss(command: list[str], env: dict[str, str]) -> tuple[float, int, str, int]:
    """Run `command`; its wall seconds, peak RSS in bytes, stdout and exit code."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.DEVNULL)
        watched = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        out.seek(0)
        return seconds, peak, out.read().decode(), process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--transport", choices=["chdb", "http"], default="http")
    args = parser.parse_args()
    with bench_engines("bench-verify-", args.transport) as (_work, pg, clickhouse_url):
        env = {**os.environ, "DATABASE_URL": pg.url, "CLICKHOUSE_URL": clickhouse_url,
               "LOG_FORMAT": "json", "LOG_LEVEL": "warning"}  # fmt: skip
        consumer_cli = [sys.executable, "-m", "cdc_consumer"]
        subprocess.run([*consumer_cli, "migrate"], env=env, check=True, capture_output=True)
        with psycopg.connect(pg.url, autocommit=True) as conn:
            since = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
            filled = time.perf_counter()
            conn.execute(FILL_SQL % {"chunks": args.events // 1000, "size": 1000})
            fill_seconds = time.perf_counter() - filled
            target = str_to_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
            drained = time.perf_counter()
            consumer = subprocess.Popen([*consumer_cli, "run"], env=env, stderr=subprocess.DEVNULL)
            while True:
                row = conn.execute(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                    " WHERE slot_name = 'event_outbox_slot'"
                ).fetchone()
                if row and row[0] and str_to_lsn(row[0]) >= target:
                    break
                if consumer.poll() is not None:
                    raise SystemExit("consumer died")
                time.sleep(0.1)
            consumer.send_signal(signal.SIGTERM)
            consumer.wait(60)
            drain_seconds = time.perf_counter() - drained
        command = [*consumer_cli, "verify", "--since", since.isoformat(), "--json"]
        seconds, peak, stdout, code = _peak_rss(command, env)
        report = json.loads(stdout)
        print(json.dumps({
            "events": args.events,
            "transport": args.transport,
            "fill_seconds": round(fill_seconds, 1),
            "drain_seconds": round(drain_seconds, 1),
            "verify_seconds": round(seconds, 2),
            "verify_events_per_s": round(args.events / seconds),
            "verify_peak_rss_mb": round(peak / 2**20),
            "verify_exit": code,
            "checked": report["checked"],
            "missing": report["missing_count"],
            "doubled": report["doubled_count"],
            "in_flight": report["in_flight"],
            **where_and_when(),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
