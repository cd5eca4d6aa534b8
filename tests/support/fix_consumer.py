"""pytest plugin: the real consumer as a subprocess, one slot per test.

The consumer runs exactly as in production (`python -m cdc_consumer run`), so tests can stop it
with SIGTERM, kill it with SIGKILL, and read its JSON log lines. Tests wait on state changes
(the slot's confirmed position, rows in ClickHouse), never on fixed sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc_consumer.pgoutput import str_to_lsn
from cdc_consumer.shard import Shard

WAIT_SECONDS = 60.0


def wait_for(condition: Callable[[], Any], *, timeout: float = WAIT_SECONDS, what: str) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def current_wal_lsn(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str_to_lsn(str(row[0]))


@dataclass
class Consumer:
    """One consumer configuration (its own slot and publication) and its running process."""

    env: dict[str, str]
    log_path: Path
    postgres_url: str
    process: subprocess.Popen[bytes] | None = None
    _log_file: Any = field(default=None, repr=False)

    @property
    def slot(self) -> str:
        return self.env["CDC_SLOT"]

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cdc_consumer", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def point_at(self, database_url: str) -> None:
        """From now on, read (and clean up) the PostgreSQL at `database_url`, as a deployment
        does when its database endpoint moves to a promoted standby."""
        self.env["DATABASE_URL"] = database_url
        self.postgres_url = database_url

    def migrate(self) -> None:
        result = self.cli("migrate")
        assert result.returncode == 0, result.stderr

    def start(self, *, streaming: bool = True) -> None:
        """Start `run`; return once it streams (its restart read done), or, with
        `streaming=False`, once it holds the slot."""
        assert self.process is None or self.process.poll() is not None, "already running"
        streamed_before = self._count("streaming")
        self._log_file = self.log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "cdc_consumer", "run"], env=self.env, stderr=self._log_file
        )
        self.process = process

        def ready() -> bool:
            if streaming:
                return self._count("streaming") > streamed_before
            return self.slot_active()

        wait_for(lambda: ready() or process.poll() is not None, what="consumer started")
        assert process.poll() is None, self.log_text()

    def _count(self, event: str) -> int:
        return sum(1 for e in self.log_events() if e.get("event") == event)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        walsender = self.slot_pid()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self._log_file.close()
        # The walsender lets go of the slot a moment after the client disappears (another
        # consumer may take it at once, so wait for this one's walsender, not for "inactive").
        wait_for(lambda: self.slot_pid() != walsender or walsender is None, what="slot released")
        return code

    def slot_pid(self) -> int | None:
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
            ).fetchone()
        return row[0] if row else None

    def slot_row(self) -> tuple[Any, ...] | None:
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (self.slot,),
            ).fetchone()

    def slot_active(self) -> bool:
        row = self.slot_row()
        return bool(row and row[0])

    def confirmed_lsn(self) -> int:
        row = self.slot_row()
        return str_to_lsn(row[1]) if row and row[1] else 0

    def wait_confirmed(self, lsn: int, timeout: float = WAIT_SECONDS) -> None:
        """Wait until the slot is confirmed at or past `lsn` (i.e. ClickHouse holds it)."""

        def reached() -> bool:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"consumer exited early:\n{self.log_text()}")
            return self.confirmed_lsn() >= lsn

        wait_for(reached, timeout=timeout, what=f"slot {self.slot} confirmed")

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            wait_for(lambda: not self.slot_active(), what="slot released")
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (self.slot,),
            )


@pytest.fixture
def make_consumer(postgres_url: str, tmp_path: Path) -> Iterator[Callable[..., Consumer]]:
    """Build consumers for a ClickHouse URL, each with its own slot; dropped after the test.
    `database_url` names another database of the session's server (default: its own)."""
    made: list[Consumer] = []

    def make(
        clickhouse_url: str, *, database_url: str = postgres_url, **overrides: str
    ) -> Consumer:
        name = f"t{uuid.uuid4().hex[:10]}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "PYTEST_"))},
            "DATABASE_URL": database_url,
            "CLICKHOUSE_URL": clickhouse_url,
            "CDC_SLOT": f"{name}_slot",
            "CDC_PUBLICATION": f"{name}_pub",
            "CDC_BATCH_MAX_SECONDS": "0.2",
            "CDC_STATUS_INTERVAL_SECONDS": "1",
            "CDC_RETRY_MAX_SECONDS": "1",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
            **overrides,
        }
        consumer = Consumer(env=env, log_path=tmp_path / f"{name}.log", postgres_url=database_url)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.close()


@pytest.fixture
def consumer_over(
    make_database: Callable[..., str], make_consumer, clickhouse_server
) -> Callable[..., tuple[Consumer, str]]:
    """A migrated, stopped consumer over a fresh database (an encoding, database settings; see
    make_database), and that database's URL. make_database is set up before make_consumer, so
    slots are dropped before databases."""

    def make(encoding: str = "UTF8", **settings: str) -> tuple[Consumer, str]:
        url = make_database(encoding, **settings)
        consumer = make_consumer(clickhouse_server.url, database_url=url)
        consumer.migrate()
        return consumer, url

    return make


def status_received_after(pg_conn, slot: str, since, *, seconds: float) -> bool:
    """True once the slot's walsender got a status update `seconds` after `since`."""
    row = pg_conn.execute(
        "SELECT r.reply_time > %s + make_interval(secs => %s) FROM pg_stat_replication r"
        " JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s",
        (since, seconds, slot),
    ).fetchone()
    return bool(row and row[0])


def publish_probes(conn: psycopg.Connection[Any], count: int, environment: str) -> list[str]:
    """Commit `count` outbox events in one transaction (plain SQL); returns their event ids."""
    rows = conn.execute(
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version)"
        " SELECT gen_random_uuid(), 'probe', clock_timestamp(), %s, jsonb_build_object('n', g), 1"
        " FROM generate_series(1, %s::int) AS g RETURNING event_id::text",
        (environment, count),
    ).fetchall()
    return [row[0] for row in rows]


def shards_holding(conn: psycopg.Connection[Any], event_ids: list[str], *, count: int) -> set[str]:
    """The shards (`k/count`) whose condition the outbox rows of these events meet."""
    found = set()
    for index in range(count):
        shard = Shard(index, count)
        query = sql.SQL("SELECT EXISTS (SELECT FROM event_outbox WHERE event_id = ANY(%s::uuid[])")
        row = conn.execute(
            query + sql.SQL(" AND {})").format(shard.condition), (event_ids,)
        ).fetchone()
        if row and row[0]:
            found.add(str(shard))
    return found


def create_partitioned_outbox(conn: psycopg.Connection[Any], partitions: dict[str, str]) -> None:
    """event_outbox as a table partitioned by created_at, before `migrate` (whose CREATE ...
    IF NOT EXISTS then keeps it), with `partitions`: name -> `FOR VALUES ...` bounds."""
    conn.execute(
        "CREATE TABLE event_outbox (event_id uuid NOT NULL, event_type text NOT NULL,"
        " event_date_time timestamptz NOT NULL, environment text NOT NULL,"
        " event_context jsonb NOT NULL, metadata_version bigint NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (event_id, created_at))"
        " PARTITION BY RANGE (created_at)"
    )
    for name, bounds in partitions.items():
        conn.execute(f"CREATE TABLE {name} PARTITION OF event_outbox {bounds}")


def kill_while_an_insert_executes(
    consumer: Consumer, faults: Any, pg_conn: psycopg.Connection[Any], environment: str
) -> None:
    """Publish 10 events and SIGKILL the consumer while the server executes their insert
    (held as executing: past where a KILL QUERY can cancel it)."""
    faults.hold_inserts(executing=True)
    publish_probes(pg_conn, 10, environment)
    faults.wait_for_held_inserts()
    assert consumer.stop(signal.SIGKILL) == -signal.SIGKILL


@contextmanager
def server_setting(pg_conn: psycopg.Connection[Any], name: str, value: str) -> Iterator[None]:
    """The server's `name` set to `value` (ALTER SYSTEM, reloaded) for the block."""
    pg_conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
    pg_conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        pg_conn.execute(f"ALTER SYSTEM RESET {name}")
        pg_conn.execute("SELECT pg_reload_conf()")


def short_wal_sender_timeout(
    pg_conn: psycopg.Connection[Any], value: str
) -> contextlib.AbstractContextManager[None]:
    """The server's wal_sender_timeout set to `value` (e.g. '2s') for the block."""
    return server_setting(pg_conn, "wal_sender_timeout", value)
