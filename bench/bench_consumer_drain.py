"""How fast the consumer drains a backlog, against pg_recvlogical on the same WAL.

    .venv/bin/python bench/bench_consumer_drain.py --events 500000 [--tx-size 100] \
        [--transport chdb|http] [--fsync] [--metrics] [--sentry RATE] [--profile FILE]

Starts a disposable PostgreSQL, creates the consumer's slot and a second slot for
pg_recvlogical, writes N outbox rows (~240 bytes each) in transactions of --tx-size rows with
the consumer stopped, then times (1) pg_recvlogical reading the whole backlog to /dev/null (the
ceiling: the server's decoding speed), (2) the consumer, from its slot going active to the
slot being confirmed past the last row (decode, encode, insert into ClickHouse, confirm), and
(3) ClickHouse taking the same batches with no consumer (`clickhouse_ceiling`: the other
ceiling; the ratio that counts is to the slower of the two). Prints
one JSON line; the consumer's peak RSS is sampled every 50 ms, and its CPU time (user and
system, all threads) over the drain is reported per event. With --fsync the consumer runs
with CLICKHOUSE_FSYNC_AFTER_INSERT=true (ClickHouse fsyncs every part before it answers). With
--metrics it serves metrics (CDC_METRICS_PORT), scraped every second while it drains (a
pessimistic Prometheus), and the last scrape's shipped count and latency count are reported.
With --sentry RATE it traces: SENTRY_DSN names a local Sentry ingest endpoint in this process
(`tests.support.sentry_ingest`, the tests' receiver, which keeps what it is sent) and
SENTRY_TRACES_SAMPLE_RATE is RATE (0.0, the default rate, sends errors only); the `cdc.batch`
transactions received are reported. Without it the consumer runs with no SENTRY_DSN, whatever
this process's environment holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import clickhouse_ceiling
from cdc_consumer import clickhouse
from cdc_consumer.pgoutput import str_to_lsn
from demo.postgres import DisposablePostgres, bin_dir
from tests.support.sentry_ingest import SentryIngest

FILL_SQL = """
DO $$
BEGIN
  FOR chunk IN 0 .. %(chunks)s - 1 LOOP
    INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,
                              event_context, metadata_version)
    SELECT gen_random_uuid(), 'user_created', clock_timestamp(), 'bench',
           jsonb_build_object('email', 'user' || g || '@bench.example', 'first_name', 'Ada',
                              'last_name', 'Lovelace', 'plan', 'pro', 'n', g),
           1
    FROM generate_series(chunk * %(size)s + 1, (chunk + 1) * %(size)s) AS g;
    COMMIT;
  END LOOP;
END $$;
"""


@contextmanager
def bench_engines(prefix: str, transport: str) -> Iterator[tuple[Path, DisposablePostgres, str]]:
    """A work directory, a started disposable PostgreSQL and the CLICKHOUSE_URL of a fresh
    engine (chDB in process, which the consumer opens; or the chDB HTTP test server in its own
    process); all removed on leaving."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    pg = DisposablePostgres(root=work / "pg")
    pg.start()
    server = None
    try:
        if transport == "chdb":
            yield work, pg, f"chdb://{work / 'ch'}"
            return
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.support.clickhouse_http", "--path", str(work / "ch")],
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None
        port = server.stdout.readline().decode().strip().rsplit(":", 1)[1]
        yield work, pg, f"http://default:@127.0.0.1:{port}/default"
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of /metrics by name ({} while the server is not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


class _Scraper:
    """Scrapes the consumer's /metrics at most once a second (nothing when metrics are off)."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.scrapes = 0
        self.last: dict[str, float] = {}
        self._at = 0.0

    def tick(self, *, force: bool = False) -> None:
        if self.port is None or (not force and time.perf_counter() - self._at < 1.0):
            return
        self._at, self.scrapes = time.perf_counter(), self.scrapes + 1
        self.last = _scrape(self.port) or self.last

    def report(self) -> dict[str, object]:
        if self.port is None:
            return {}
        count = self.last.get("cdc_commit_to_insert_seconds_count")
        total = self.last.get("cdc_commit_to_insert_seconds_sum", 0.0)
        return {
            "scrapes": self.scrapes,
            "scraped_shipped": self.last.get("cdc_events_shipped_total"),
            "scraped_latency_count": count,
            "scraped_latency_mean_s": round(total / count, 2) if count else None,
        }


def _consumer_env(
    database_url: str, clickhouse_url: str, *, fsync: bool, metrics_port: int | None,
    sentry: tuple[str, float] | None = None,
) -> dict[str, str]:  # fmt: skip
    """The consumer's environment; `sentry` is (SENTRY_DSN, SENTRY_TRACES_SAMPLE_RATE)."""
    env = {**os.environ, "DATABASE_URL": database_url, "CLICKHOUSE_URL": clickhouse_url,
           "LOG_FORMAT": "json", "LOG_LEVEL": "info",
           "CLICKHOUSE_FSYNC_AFTER_INSERT": "true" if fsync else "false"}  # fmt: skip
    for name in ("CDC_METRICS_PORT", "SENTRY_DSN", "SENTRY_TRACES_SAMPLE_RATE"):
        env.pop(name, None)  # on only when asked for
    if metrics_port is not None:
        env["CDC_METRICS_PORT"] = str(metrics_port)
    if sentry is not None:
        env["SENTRY_DSN"], env["SENTRY_TRACES_SAMPLE_RATE"] = sentry[0], str(sentry[1])
    return env


def _truncate_event_log(clickhouse_url: str) -> None:
    transport = clickhouse.connect(clickhouse_url)
    try:
        transport.command("TRUNCATE TABLE event_log")
    finally:
        transport.close()


def _engine_processes(conn: psycopg.Connection[tuple[str]]) -> dict[str, psutil.Process]:
    """The processes doing the engines' part of the drain: the walsender streaming the
    consumer's slot and, over HTTP, the ClickHouse test server (chDB in process is the
    consumer's own CPU)."""
    row = conn.execute(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'event_outbox_slot'"
    ).fetchone()
    found = {"walsender": psutil.Process(int(row[0]))} if row and row[0] else {}
    server = clickhouse_server_process()
    if server is not None:
        found["clickhouse_server"] = server
    return found


def clickhouse_server_process() -> psutil.Process | None:
    """The ClickHouse test server bench_engines started for the HTTP transport, if any."""
    for child in psutil.Process().children():
        if "tests.support.clickhouse_http" in " ".join(child.cmdline()):
            return child
    return None


def process_cpu_seconds(proc: psutil.Process) -> float:
    """User and system CPU time of the process, all threads."""
    times = proc.cpu_times()
    return float(times.user + times.system)


def _lsn(conn: psycopg.Connection[tuple[str]], sql: str) -> int:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return str_to_lsn(str(row[0]))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--tx-size", type=int, default=100)
    parser.add_argument("--transport", choices=["chdb", "http"], default="chdb")
    parser.add_argument("--fsync", action="store_true", help="CLICKHOUSE_FSYNC_AFTER_INSERT=true")
    parser.add_argument("--metrics", action="store_true", help="CDC_METRICS_PORT, scraped 1/s")
    parser.add_argument(
        "--sentry",
        type=float,
        metavar="RATE",
        help="SENTRY_DSN at a local ingest endpoint, SENTRY_TRACES_SAMPLE_RATE=RATE (0.0-1.0)",
    )
    parser.add_argument("--profile", help="write a cProfile of the consumer to this file")
    parser.add_argument(
        "--py-spy",
        help="sample the consumer with py-spy (all threads, native frames off) into"
        " this file of collapsed stacks (py-spy's raw format; bench/stacks.py sums it)",
    )
    parser.add_argument("--log", type=Path, help="keep the consumer's log in this file")
    return parser.parse_args()


@dataclass
class _Backlog:
    target: int  # the WAL position past the last row
    wal_bytes: int
    fill_seconds: float


@dataclass
class _Drain:
    seconds: float
    cpu_seconds: float  # the consumer's, all threads
    engines_cpu: dict[str, float]  # the walsender's and (HTTP) the ClickHouse server's
    peak_rss: int
    log: str


def _fill(url: str, *, events: int, tx_size: int) -> _Backlog:
    """The backlog, written with the consumer stopped, and a slot over it for each ceiling."""
    with psycopg.connect(url, autocommit=True) as conn:
        for slot in ("bench_recv", "bench_ch"):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        started = time.perf_counter()
        conn.execute(FILL_SQL % {"chunks": events // tx_size, "size": tx_size})
        fill_seconds = time.perf_counter() - started
        target = _lsn(conn, "SELECT pg_current_wal_lsn()::text")
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = 'bench_recv'"
        ).fetchone()
    assert row is not None
    return _Backlog(target, int(row[0]), fill_seconds)


def _pg_recvlogical_seconds(url: str, target: int) -> float:
    """The PostgreSQL side's ceiling: pg_recvlogical decoding the backlog to /dev/null."""
    started = time.perf_counter()
    subprocess.run(
        [str(bin_dir() / "pg_recvlogical"), "-d", url, "--slot", "bench_recv", "--start",
         "-o", "proto_version=1", "-o", "publication_names=event_outbox_pub",
         "--endpos", f"{target >> 32:X}/{target & 0xFFFFFFFF:X}", "-f", "/dev/null"],
        check=True,
    )  # fmt: skip
    return time.perf_counter() - started


def _drain(
    args: argparse.Namespace, url: str, *, env: dict[str, str], log_path: Path,
    scraper: _Scraper, target: int,
) -> _Drain:  # fmt: skip
    """Run the consumer from its slot going active until the slot is confirmed at `target`."""
    with log_path.open("w") as log_file:
        profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
        consumer = subprocess.Popen(
            [sys.executable, *profile, "-m", "cdc_consumer", "run"], env=env, stderr=log_file
        )
        proc = psutil.Process(consumer.pid)
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(
                ["py-spy", "record", "--format", "raw", "--rate", "250", "--threads",
                 "--output", args.py_spy, "--pid", str(consumer.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        peak_rss, active_at, cpu_at_active = 0, 0.0, 0.0
        engines: dict[str, psutil.Process] = {}
        engines_at_active: dict[str, float] = {}
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                peak_rss = max(peak_rss, proc.memory_info().rss)
                row = conn.execute(
                    "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots"
                    " WHERE slot_name = 'event_outbox_slot'"
                ).fetchone()
                assert row is not None
                if not active_at and row[0]:
                    active_at, cpu_at_active = time.perf_counter(), process_cpu_seconds(proc)
                    engines = _engine_processes(conn)
                    engines_at_active = {n: process_cpu_seconds(p) for n, p in engines.items()}
                scraper.tick()
                if str_to_lsn(row[1]) >= target:
                    break
                if consumer.poll() is not None:
                    raise SystemExit(f"consumer died:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.05)
        drained_at = time.perf_counter()
        cpu_seconds = process_cpu_seconds(proc) - cpu_at_active
        engines_cpu = {n: process_cpu_seconds(p) - engines_at_active[n] for n, p in engines.items()}
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
            spy.wait(60)
        scraper.tick(force=True)  # a batch's metrics are recorded before its confirm
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(60)
    return _Drain(drained_at - active_at, cpu_seconds, engines_cpu, peak_rss, log_path.read_text())


@contextmanager
def _sentry_ingest(rate: float | None) -> Iterator[SentryIngest | None]:
    """A local Sentry ingest endpoint while the benchmark runs (None: tracing off)."""
    if rate is None:
        yield None
        return
    if not 0.0 <= rate <= 1.0:
        raise SystemExit(f"--sentry takes a sample rate within 0.0-1.0, not {rate}")
    ingest = SentryIngest()
    try:
        yield ingest
    finally:
        ingest.close()


def _clickhouse_ingest_seconds(url: str, clickhouse_url: str, target: int) -> float:
    """The ClickHouse side's ceiling: the same batches, encoded beforehand, into an emptied
    event_log through the consumer's write path."""
    encoded = clickhouse_ceiling.encoded_batches(
        url, slot="bench_ch", publication="event_outbox_pub", until_lsn=target, batch_rows=50_000
    )
    _truncate_event_log(clickhouse_url)
    return clickhouse_ceiling.ingest_seconds(clickhouse_url, encoded)


def main() -> None:
    args = _arguments()
    with (
        bench_engines("bench-drain-", args.transport) as (work, pg, clickhouse_url),
        _sentry_ingest(args.sentry) as ingest,
    ):
        scraper = _Scraper(_free_port() if args.metrics else None)
        sentry = None if ingest is None else (ingest.dsn, args.sentry)
        env = _consumer_env(pg.url, clickhouse_url, fsync=args.fsync, metrics_port=scraper.port,
                            sentry=sentry)  # fmt: skip
        subprocess.run([sys.executable, "-m", "cdc_consumer", "migrate"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        backlog = _fill(pg.url, events=args.events, tx_size=args.tx_size)
        recv_seconds = _pg_recvlogical_seconds(pg.url, backlog.target)
        drain = _drain(args, pg.url, env=env, log_path=work / "consumer.log", scraper=scraper,
                       target=backlog.target)  # fmt: skip
        ingest_seconds = _clickhouse_ingest_seconds(pg.url, clickhouse_url, backlog.target)
        traced = {} if ingest is None else {
            "sentry_traces_sample_rate": args.sentry,
            "sentry_batch_transactions": len(ingest.transactions("cdc.batch")),
        }  # fmt: skip
    if args.log:
        args.log.write_text(drain.log)
    batches = [json.loads(line) for line in drain.log.splitlines() if '"batch written"' in line]
    seconds = drain.seconds
    # What the machine's cores allow when the three share them: every CPU second the drain
    # took (consumer, walsender, ClickHouse server), spread over all cores.
    cores_bound = (drain.cpu_seconds + sum(drain.engines_cpu.values())) / (os.cpu_count() or 1)
    print(json.dumps({
        "events": args.events,
        "tx_size": args.tx_size,
        "transport": args.transport,
        "fsync": args.fsync,
        "metrics": args.metrics,
        "wal_bytes": backlog.wal_bytes,
        "fill_seconds": round(backlog.fill_seconds, 2),
        "pg_recvlogical_seconds": round(recv_seconds, 2),
        "pg_recvlogical_events_per_s": round(args.events / recv_seconds),
        "clickhouse_ingest_seconds": round(ingest_seconds, 2),
        "clickhouse_ingest_events_per_s": round(args.events / ingest_seconds),
        "consumer_seconds": round(seconds, 2),
        "consumer_events_per_s": round(args.events / seconds),
        "ratio_to_pg_recvlogical": round(recv_seconds / seconds, 2),
        "ratio_to_clickhouse_ingest": round(ingest_seconds / seconds, 2),
        "ratio_to_slower_ceiling": round(max(recv_seconds, ingest_seconds) / seconds, 2),
        "clickhouse_inserts": len(batches),
        "rows_per_insert": round(sum(b["rows"] for b in batches) / max(1, len(batches))),
        "consumer_cpu_seconds": round(drain.cpu_seconds, 2),
        "consumer_cpu_us_per_event": round(drain.cpu_seconds / args.events * 1e6, 1),
        **{f"{name}_cpu_seconds": round(cpu, 2) for name, cpu in drain.engines_cpu.items()},
        "cores_bound_seconds": round(cores_bound, 2),
        "ratio_to_cores_bound": round(cores_bound / seconds, 2),
        "consumer_peak_rss_mb": round(drain.peak_rss / 2**20),
        **scraper.report(),
        **traced,
        "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}",
    }))  # fmt: skip


if __name__ == "__main__":
    main()
