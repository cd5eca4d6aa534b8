"""The sql/ runner: applies numbered files in order and records what it applied, per database.

Each database keeps a `cdc_schema_migrations` table (name, checksum, applied_at). A file already
applied is skipped; a file whose text changed after it was applied is refused, because the
database no longer matches what the repository says it is. New files are applied in name order.
PostgreSQL applies each file and its record in one transaction under an advisory lock, so two
processes migrating at once cannot both apply it. ClickHouse has no transactions: statements
are written idempotently (`IF NOT EXISTS`) and the record is written after them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import structlog

from cdc_consumer.clickhouse import ClickHouseTransport
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


def pending(files: Iterable[MigrationFile], applied: dict[str, str]) -> list[MigrationFile]:
    """Files not yet applied; refuses any applied file whose text has since changed."""
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
        for file in pending(migration_files(directory), {str(n): str(c) for n, c in rows}):
            conn.execute(file.sql.encode())
            conn.execute(
                "INSERT INTO cdc_schema_migrations (name, checksum) VALUES (%s, %s)",
                (file.name, file.checksum),
            )
            applied_names.append(file.name)
    _log_applied("postgres", applied_names)
    return applied_names


def migrate_clickhouse(transport: ClickHouseTransport, directory: Path) -> list[str]:
    """Apply pending ClickHouse migrations; returns the names applied."""
    transport.command(
        "CREATE TABLE IF NOT EXISTS cdc_schema_migrations"
        " (name String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3))"
        " ENGINE = ReplacingMergeTree ORDER BY name"
    )
    rows = transport.select("SELECT name, checksum FROM cdc_schema_migrations FINAL")
    applied_names: list[str] = []
    for file in pending(migration_files(directory), {str(n): str(c) for n, c in rows}):
        for statement in split_statements(file.sql):
            transport.command(statement)
        transport.command(
            "INSERT INTO cdc_schema_migrations (name, checksum) VALUES "
            f"({_quote(file.name)}, {_quote(file.checksum)})"
        )
        applied_names.append(file.name)
    _log_applied("clickhouse", applied_names)
    return applied_names


def _quote(value: str) -> str:
    # Only file names and hex digests pass through here; still, quote like ClickHouse does.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _log_applied(database: str, names: list[str]) -> None:
    emit: Callable[..., object] = log.info if names else log.debug
    emit("migrations applied", database=database, applied=names)
