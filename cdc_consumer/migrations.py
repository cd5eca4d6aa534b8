"""The sql/ runner: applies numbered files in order and records what it applied, per database.

Each database keeps a `cdc_schema_migrations` table (name, checksum, applied_at). A file already
applied is skipped; a file whose text changed after it was applied is refused, because the
database no longer matches what the repository says it is. New files are applied in name order.
PostgreSQL applies each file and its record in one transaction under an advisory lock, so two
processes migrating at once cannot both apply it. ClickHouse has no transactions: statements
are written idempotently (`IF NOT EXISTS`) and the record is written after them.

On a ClickHouse cluster (CLICKHOUSE_CLUSTER) the same files are applied as
`clickhouse_cluster.cluster_statement` rewrites them (ON CLUSTER, replicated engines); the
record keeps the checksum of the file as written, so the files stay the one source of truth.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import structlog

from cdc_consumer.clickhouse import ClickHouseTransport
from cdc_consumer.clickhouse_cluster import cluster_statement, sql_string
from cdc_consumer.errors import ErrorKind, PipelineError

SQL_ROOT = Path(__file__).resolve().parent.parent / "sql"
_STATEMENT_END = re.compile(r";[ \t]*(?:--[^\n]*)?(?:\n|$)")
# Arbitrary but fixed: serialises concurrent migrators on one PostgreSQL database.
_PG_ADVISORY_LOCK = 0x0C_DC_5C_4E

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class MigrationFile:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migration_files(directory: Path) -> list[MigrationFile]:
    """The numbered .sql files of one database, in the order they apply."""
    return [MigrationFile(p.name, p.read_text()) for p in sorted(directory.glob("*.sql"))]


def pending(
    files: Iterable[MigrationFile], records: Iterable[Sequence[Any]]
) -> list[MigrationFile]:
    """Files not yet applied, given the (name, checksum) rows of the runner's record; refuses
    any applied file whose text has since changed."""
    applied = {str(name): str(checksum) for name, checksum in records}
    todo = []
    for file in files:
        recorded = applied.get(file.name)
        if recorded is None:
            todo.append(file)
        elif recorded != file.checksum:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"migration {file.name} was edited after it was applied",
                hint="never edit an applied migration: revert it and add a new numbered file",
            )
    return todo


def split_statements(sql: str) -> list[str]:
    """Statements of a file, split at a `;` that ends a line (ClickHouse takes one per query)."""
    return [s.strip() for s in _STATEMENT_END.split(sql) if _has_code(s)]


def _has_code(chunk: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in chunk.splitlines())


@contextmanager
def postgres_lock(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """The migrations' advisory lock for the session, across statements and transactions (the
    slot cannot be created in a transaction that has written). migrate_postgres takes the same
    lock per transaction, which a session already holding it is granted at once."""
    conn.execute("SELECT pg_advisory_lock(%s)", (_PG_ADVISORY_LOCK,))
    try:
        yield
    finally:
        if not conn.broken:  # a lost session has let go of its locks already
            conn.execute("SELECT pg_advisory_unlock(%s)", (_PG_ADVISORY_LOCK,))


def migrate_postgres(conn: psycopg.Connection[tuple[object, ...]], directory: Path) -> list[str]:
    """Apply pending PostgreSQL migrations; returns the names applied."""
    with conn.transaction():
        conn.execute(
            "CREATE TABLE IF NOT EXISTS cdc_schema_migrations ("
            " name text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    applied_names: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_ADVISORY_LOCK,))
        rows = conn.execute("SELECT name, checksum FROM cdc_schema_migrations").fetchall()
        for file in pending(migration_files(directory), rows):
            conn.execute(file.sql.encode())
            conn.execute(
                "INSERT INTO cdc_schema_migrations (name, checksum) VALUES (%s, %s)",
                (file.name, file.checksum),
            )
            applied_names.append(file.name)
    _log_applied("postgres", applied_names)
    return applied_names


def unapplied_postgres(conn: psycopg.Connection[Any], directory: Path) -> list[str]:
    """The files of `directory` not applied to this database (all of them if none was);
    refuses an applied file since edited, as the runner does. Reads only."""
    exists = conn.execute("SELECT to_regclass('cdc_schema_migrations') IS NOT NULL").fetchone()
    rows = (
        conn.execute("SELECT name, checksum FROM cdc_schema_migrations").fetchall()
        if exists and exists[0]
        else []
    )
    files = pending(migration_files(directory), rows)
    return [file.name for file in files]


def unapplied_clickhouse(transport: ClickHouseTransport, directory: Path) -> list[str]:
    """As `unapplied_postgres`, for ClickHouse's current database."""
    exists = transport.select(
        "SELECT count() FROM system.tables"
        " WHERE database = currentDatabase() AND name = 'cdc_schema_migrations'"
    )
    rows = (
        transport.select("SELECT name, checksum FROM cdc_schema_migrations FINAL")
        if exists[0][0]
        else []
    )
    files = pending(migration_files(directory), rows)
    return [file.name for file in files]


# The runner's own record in ClickHouse, created before any file and rewritten like them.
CLICKHOUSE_RECORD = MigrationFile(
    "cdc_schema_migrations",
    "CREATE TABLE IF NOT EXISTS cdc_schema_migrations"
    " (name String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))"
    " ENGINE = ReplacingMergeTree ORDER BY name",
)


def clickhouse_statements(file: MigrationFile, *, cluster: str | None = None) -> list[str]:
    """The statements applied for `file`: as written, or rewritten for `cluster`."""
    statements = split_statements(file.sql)
    if cluster is None:
        return statements
    try:
        return [cluster_statement(statement, cluster=cluster) for statement in statements]
    except PipelineError as exc:
        raise PipelineError(exc.kind, f"{file.name}: {exc}", hint=exc.hint) from exc


def clickhouse_ddl(directory: Path, *, cluster: str | None = None) -> str:
    """Every ClickHouse statement `migrate` would apply to an empty database, runner's own table
    first, as one script for an operator to review."""
    sections = []
    for file in [CLICKHOUSE_RECORD, *migration_files(directory)]:
        statements = clickhouse_statements(file, cluster=cluster)
        sections.append(f"-- {file.name}\n" + "\n\n".join(f"{s};" for s in statements))
    return "\n\n".join(sections) + "\n"


def migrate_clickhouse(
    transport: ClickHouseTransport, directory: Path, *, cluster: str | None = None
) -> list[str]:
    """Apply pending ClickHouse migrations, for one server or ON `cluster`; returns the names
    applied."""
    files = migration_files(directory)
    # Every file is rewritten before anything runs, so a statement the cluster rewrite refuses
    # stops the runner before it has changed any host.
    statements = {f.name: clickhouse_statements(f, cluster=cluster) for f in files}
    refuse_other_topology(transport, cluster)
    for statement in clickhouse_statements(CLICKHOUSE_RECORD, cluster=cluster):
        transport.command(statement)
    rows = transport.select("SELECT name, checksum FROM cdc_schema_migrations FINAL")
    applied_names: list[str] = []
    for file in pending(files, rows):
        for statement in statements[file.name]:
            transport.command(statement)
        transport.command(
            "INSERT INTO cdc_schema_migrations (name, checksum) VALUES "
            f"({sql_string(file.name)}, {sql_string(file.checksum)})"
        )
        applied_names.append(file.name)
    _log_applied("clickhouse", applied_names)
    return applied_names


def refuse_other_topology(transport: ClickHouseTransport, cluster: str | None) -> None:
    """Refuse a database migrated for the other topology (one server, or a cluster) than
    CLICKHOUSE_CLUSTER says: migrating on would mix the two, and a consumer's fence would miss
    the other hosts."""
    # A database migrated for one server holds tables that are not replicated (and the other
    # way round); applying the remaining files for the other topology would mix the two.
    rows = transport.select(
        "SELECT engine FROM system.tables"
        " WHERE database = currentDatabase() AND name = 'cdc_schema_migrations'"
    )
    if not rows or str(rows[0][0]).startswith("Replicated") == (cluster is not None):
        return
    raise PipelineError(
        ErrorKind.CONFIGURATION,
        f"this ClickHouse database was migrated {'for one server' if cluster else 'on a cluster'},"
        f" and CLICKHOUSE_CLUSTER is {'set' if cluster else 'unset'}",
        hint="set CLICKHOUSE_CLUSTER as when the database was first migrated; moving existing"
        " tables to replicated engines is a manual ClickHouse operation",
    )


def _log_applied(database: str, names: list[str]) -> None:
    emit: Callable[..., object] = log.info if names else log.debug
    emit("migrations applied", database=database, applied=names)
