"""What `publish()` adds to a request, against the old way: inserting the event straight into
ClickHouse. Issue 4's figures, all from one run.

    .venv/bin/python bench/bench_publish.py [--publishes 5000] [--direct-inserts 1000] \
        [--many 10000] [--repeats 5]

Starts a disposable PostgreSQL, migrates it (Django's migrations and the sql/ runner) and times:

1. `publish(event)` of a `UserCreated`, N single calls inside one `transaction.atomic()` (the
   caller's transaction) after 500 warm-up calls: p50, p99 and mean of the call alone; building
   the event is timed apart. Beside it, on the same connection: `SELECT 1` (the round trip
   every statement pays, the floor) and the same row written by the ORM's `Model.save()`
   (the path publish does not take).
2. The old way, one synchronous single-row insert per event into `event_log`: through
   clickhouse-connect's `client.insert` to the chDB HTTP test server (tests/support), and into
   chDB in this process (`INSERT ... FORMAT JSONEachRow`, one row). Each timed call turns the
   event into a row and inserts it, as `publish` turns it into an outbox row.
3. `publish_many(events)` of --many events in one transaction, commit included, --repeats
   times (best and median), and of 100 events (the multi-row INSERT path).

Prints one JSON line. Importing chDB costs this process ~260 MB; it happens last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import django
import orjson
import psycopg
from django.core.management import call_command
from django.db import transaction
from uuid_utils.compat import uuid7

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import where_and_when
from cdc_consumer import migrations
from cdc_consumer.clickhouse import ChdbTransport, connect
from cdc_consumer.event_log import EVENT_LOG_TABLE
from cdc_consumer.outbox import OUTBOX_COLUMNS
from demo.postgres import DisposablePostgres
from tests.support.fix_clickhouse import start_test_server

WARMUP_PUBLISHES = 500
WARMUP_DIRECT_INSERTS = 50
SMALL_LIST = 100
# An application logging straight to ClickHouse writes the outbox row's columns (event_log's
# source_lsn/source_seq and event_context_raw take their defaults; trace_id is '', as tracing
# is off here). Their types are given up front, so each insert is one HTTP request: without
# them clickhouse-connect first asks the server to DESCRIBE the table, a second round trip.
DIRECT_COLUMN_TYPES = (
    "UUID",
    "LowCardinality(String)",
    "DateTime64(6, 'UTC')",
    "LowCardinality(String)",
    "JSON",
    "UInt64",
    "String",
)


def _django_setup(database_url: str) -> None:
    # web.config reads these; the key is random so no run reuses a secret.
    os.environ.update(
        {
            "DATABASE_URL": database_url,
            "DJANGO_SETTINGS_MODULE": "web.settings",
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(32),
            "ENVIRONMENT": "bench",
            "LOG_LEVEL": "warning",
        }
    )
    django.setup()
    call_command("migrate", verbosity=0)
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrations.migrate_postgres(conn, migrations.SQL_ROOT / "postgres")


def _summary(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p99 (nearest rank) and mean, in microseconds."""
    ordered = sorted(samples_ns)

    def rank(share: float) -> float:
        return ordered[max(0, math.ceil(share * len(ordered)) - 1)] / 1000

    return {
        "p50_us": round(rank(0.50), 1),
        "p99_us": round(rank(0.99), 1),
        "mean_us": round(statistics.fmean(ordered) / 1000, 1),
    }


def _time_calls(call: Callable[[Any], object], events: Sequence[Any], warmup: int) -> list[int]:
    """Run `call(event)` for each event; the durations of all but the first `warmup`, in ns."""
    samples: list[int] = []
    for index, event in enumerate(events):
        started = time.perf_counter_ns()
        call(event)
        elapsed = time.perf_counter_ns() - started
        if index >= warmup:
            samples.append(elapsed)
    return samples


def _select_one(_event: Any) -> None:
    """One statement's round trip through Django's cursor: what no publish can go below."""
    from django.db import connection  # noqa: PLC0415  (after django.setup())

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _orm_save(event: Any) -> None:
    """The same outbox row through `Model.save()`, as publish could have written it."""
    from web.outbox.models import EventOutbox  # noqa: PLC0415  (after django.setup())
    from web.outbox.publish import event_context_serialize  # noqa: PLC0415

    EventOutbox(
        event_id=uuid7(),
        event_type=event.event_type,
        event_date_time=datetime.now(UTC),
        environment="bench",
        event_context=orjson.Fragment(event_context_serialize(event=event, max_bytes=65536)),
        metadata_version=event.metadata_version,
    ).save(force_insert=True)


def _direct_row(event: Any) -> list[Any]:
    """The event as one event_log row, the way an application would build it."""
    return [
        uuid7(),
        event.event_type,
        datetime.now(UTC),
        "bench",
        event.model_dump(mode="json"),
        event.metadata_version,
        "",
    ]


def _direct_http(work: Path, events: Sequence[Any]) -> dict[str, float]:
    """clickhouse-connect `client.insert` of one row per event to the chDB HTTP test server."""
    server = start_test_server(work / "clickhouse-http")
    try:
        transport = connect(server.url)
        migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
        transport.close()
        client = server.client()

        def insert(event: Any) -> None:
            client.insert(
                EVENT_LOG_TABLE,
                [_direct_row(event)],
                column_names=OUTBOX_COLUMNS,
                column_type_names=DIRECT_COLUMN_TYPES,
            )

        samples = _time_calls(insert, events, WARMUP_DIRECT_INSERTS)
        client.close()
    finally:
        server.stop()
    return _summary(samples)


def _direct_chdb(work: Path, events: Sequence[Any]) -> dict[str, float]:
    """One single-row `INSERT ... FORMAT JSONEachRow` per event into chDB in this process."""
    chdb = ChdbTransport(str(work / "clickhouse-chdb"))
    try:
        migrations.migrate_clickhouse(chdb, migrations.SQL_ROOT / "clickhouse")
        head = f"INSERT INTO {EVENT_LOG_TABLE} ({', '.join(OUTBOX_COLUMNS)}) FORMAT JSONEachRow\n"

        def insert(event: Any) -> None:
            row = dict(zip(OUTBOX_COLUMNS, _direct_row(event), strict=True))
            chdb.command(head + orjson.dumps(row, default=str).decode())

        samples = _time_calls(insert, events, WARMUP_DIRECT_INSERTS)
    finally:
        chdb.close()
    return _summary(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--publishes", type=int, default=5_000)
    parser.add_argument("--direct-inserts", type=int, default=1_000)
    parser.add_argument("--many", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="outbox-bench-publish-"))
    pg = DisposablePostgres.create(prefix="outbox-bench-publish-pg-")
    pg.start()
    try:
        _django_setup(pg.url)
        from web.accounts.events import UserCreated  # noqa: PLC0415  (after django.setup())
        from web.outbox.publish import publish, publish_many  # noqa: PLC0415

        def build(count: int, tag: str) -> list[UserCreated]:
            return [
                UserCreated(email=f"user{tag}{n}@bench.example", first_name="Ada",
                            last_name="Lovelace")
                for n in range(count)
            ]  # fmt: skip

        started = time.perf_counter_ns()
        events = build(WARMUP_PUBLISHES + args.publishes, "p")
        build_us = (time.perf_counter_ns() - started) / len(events) / 1000
        with transaction.atomic():
            publish_samples = _time_calls(publish, events, WARMUP_PUBLISHES)
            floor = _summary(_time_calls(_select_one, events, WARMUP_PUBLISHES))
            orm = _summary(_time_calls(_orm_save, events, WARMUP_PUBLISHES))
        published = _summary(publish_samples)

        many_rates: list[float] = []
        many_build_s: list[float] = []
        for repeat in range(args.repeats):
            started = time.perf_counter_ns()
            batch = build(args.many, f"m{repeat}-")
            many_build_s.append((time.perf_counter_ns() - started) / 1e9)
            started = time.perf_counter_ns()
            with transaction.atomic():
                publish_many(batch)
            many_rates.append(args.many / ((time.perf_counter_ns() - started) / 1e9))
        small_rates: list[float] = []
        for repeat in range(args.repeats * 10):
            batch = build(SMALL_LIST, f"s{repeat}-")
            started = time.perf_counter_ns()
            with transaction.atomic():
                publish_many(batch)
            small_rates.append(SMALL_LIST / ((time.perf_counter_ns() - started) / 1e9))

        direct_events = build(WARMUP_DIRECT_INSERTS + args.direct_inserts, "d")
        http = _direct_http(work, direct_events)
        in_process = _direct_chdb(work, direct_events)
    finally:
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "publishes": args.publishes,
        "publish": published,
        "round_trip_floor": floor,
        "orm_save": orm,
        "event_build_us": round(build_us, 1),
        "direct_inserts": args.direct_inserts,
        "direct_http": http,
        "direct_chdb": in_process,
        "ratio_http": round(http["p50_us"] / published["p50_us"], 1),
        "ratio_chdb": round(in_process["p50_us"] / published["p50_us"], 1),
        "many": args.many,
        "many_events_per_s_best": round(max(many_rates)),
        "many_events_per_s_median": round(statistics.median(many_rates)),
        "many_build_s": round(statistics.median(many_build_s), 3),
        "small_list": SMALL_LIST,
        "small_list_events_per_s_median": round(statistics.median(small_rates)),
        "repeats": args.repeats,
        "python": platform.python_version(),
        **where_and_when(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
