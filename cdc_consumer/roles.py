"""Least-privilege roles, one per job, which `migrate` creates and grants on every run.

They are group roles that cannot log in; the login roles the processes use are a DBA's to create
(with their passwords) and to make members of them: deploy/postgres/roles.sql and
deploy/clickhouse/users.sh, run once, and docs/operations.md, "Roles". Grants follow the tables,
so they are made here, after the migrations, and made exact: each role's privileges on our
tables are revoked and granted again in one transaction, so a release that narrows one takes
effect (in ClickHouse grants only add: see `clickhouse_role_statements`).

PostgreSQL (the consumer's login role also needs the REPLICATION attribute, which membership
does not carry):
- `outbox_web`: the web app. INSERT on the outbox, which it never reads; DML on Django's tables;
  SELECT on cdc_progress for GET /health/outbox.
- `outbox_maintenance`: the Celery worker and Beat. The prune reads and deletes outbox rows and
  reads cdc_progress; the slot check reads cdc_progress.
- `outbox_consumer`: `run`, `backfill`, `verify`, `status`, `health`. Reads the outbox, writes
  cdc_progress, reads the migrations' record to check the schema is migrated.
- the migrator is whoever runs `migrate`: it owns the tables (DDL), creates the publication and
  the slot (REPLICATION), and these roles (CREATEROLE, once).

ClickHouse:
- `outbox_writer`: the consumer. INSERT and SELECT on the tables it delivers to and keeps its
  runs and sources in, SELECT on the migrations' record, and for the fence of earlier runs
  KILL QUERY with SELECT on system.processes, which KILL QUERY reads with the caller's rights
  (a stock server requires a grant for system tables; it also shows the writer other users'
  running queries), and CLUSTER on a cluster (KILL QUERY ON CLUSTER); CREATE TEMPORARY TABLE
  for the `input()` of its guarded inserts.
- `outbox_analyst`: SELECT on event_log and the dead-letter table, nothing else.

A migrator allowed none of this (a single-user development setup) gets a warning and keeps
working; the processes then run as that user.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc_consumer.clickhouse import ClickHouseTransport
from cdc_consumer.clickhouse_cluster import on_cluster
from cdc_consumer.errors import PipelineError
from cdc_consumer.event_log import DEAD_LETTER_TABLE, EVENT_LOG_TABLE
from cdc_consumer.outbox import OUTBOX_SCHEMA, OUTBOX_TABLE

log = structlog.get_logger(__name__)

WEB_ROLE = "outbox_web"
MAINTENANCE_ROLE = "outbox_maintenance"
CONSUMER_ROLE = "outbox_consumer"
POSTGRES_ROLES = (WEB_ROLE, MAINTENANCE_ROLE, CONSUMER_ROLE)

PROGRESS_TABLE = "cdc_progress"
MIGRATIONS_TABLE = "cdc_schema_migrations"

# Our tables' privileges by role; no role has any other privilege on them.
POSTGRES_GRANTS: dict[str, dict[str, tuple[str, ...]]] = {
    OUTBOX_TABLE: {
        WEB_ROLE: ("INSERT",),
        MAINTENANCE_ROLE: ("SELECT", "DELETE"),
        CONSUMER_ROLE: ("SELECT",),
    },
    PROGRESS_TABLE: {
        WEB_ROLE: ("SELECT",),
        MAINTENANCE_ROLE: ("SELECT",),
        CONSUMER_ROLE: ("SELECT", "INSERT", "UPDATE"),
    },
    MIGRATIONS_TABLE: {CONSUMER_ROLE: ("SELECT",)},
}
# Django's own record, which only the migrator (manage.py migrate) reads and writes.
_NOT_THE_WEB_APPS = frozenset({*POSTGRES_GRANTS, "django_migrations"})

WRITER_ROLE = "outbox_writer"
ANALYST_ROLE = "outbox_analyst"
CLICKHOUSE_ROLES = (WRITER_ROLE, ANALYST_ROLE)
RUNS_TABLE = "cdc_runs"
SOURCES_TABLE = "cdc_sources"


def ensure_postgres_roles(conn: psycopg.Connection[Any]) -> bool:
    """Create the roles that are missing and grant each exactly its privileges, in one
    transaction; False (and a warning) if this user may not."""
    try:
        with conn.transaction():
            # GRANT queues behind an ACCESS EXCLUSIVE lock (a long ALTER) without end, and
            # everything after it behind the grant: give up instead, and grant next time.
            conn.execute("SET LOCAL lock_timeout = '5s'")
            existing = {
                str(name)
                for (name,) in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(POSTGRES_ROLES),)
                )
            }
            for role in POSTGRES_ROLES:
                if role not in existing:
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
            for statement in _postgres_grants(_web_app_tables(conn), _partitions_of_ours(conn)):
                conn.execute(statement)
    except (
        psycopg.errors.InsufficientPrivilege,
        psycopg.errors.LockNotAvailable,
        # Another database of the cluster created the role meanwhile: the next migrate grants.
        psycopg.errors.DuplicateObject,
        psycopg.errors.UniqueViolation,
    ) as exc:
        log.warning(
            "postgresql roles not granted",
            error=str(exc).strip().splitlines()[0],
            hint="run deploy/postgres/roles.sql as a superuser once, or give the migrator"
            " CREATEROLE; until then every process needs the migrator's privileges",
        )
        return False
    log.info("postgresql roles granted", roles=list(POSTGRES_ROLES))
    return True


def _web_app_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """Tables of the schema that are not ours, nor a partition (reached through its parent,
    whose privileges count there; a partition of the outbox holds outbox rows)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
        " ORDER BY c.relname",
        (OUTBOX_SCHEMA,),
    )
    return [str(name) for (name,) in rows if str(name) not in _NOT_THE_WEB_APPS]


def _partitions_of_ours(conn: psycopg.Connection[Any]) -> list[str]:
    """The partitions, at any depth, of our tables (a partitioned outbox's)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class p JOIN pg_namespace n ON n.oid = p.relnamespace,"
        " LATERAL pg_partition_tree(p.oid) AS t JOIN pg_class c ON c.oid = t.relid"
        " WHERE n.nspname = %s AND p.relname = ANY(%s) AND t.level > 0 ORDER BY c.relname",
        (OUTBOX_SCHEMA, list(POSTGRES_GRANTS)),
    )
    return [str(name) for (name,) in rows]


def _postgres_grants(web_app_tables: list[str], partitions: list[str]) -> list[sql.Composed]:
    def table(name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(OUTBOX_SCHEMA), sql.Identifier(name))

    roles = sql.SQL(", ").join(map(sql.Identifier, POSTGRES_ROLES))
    statements = [
        sql.SQL("REVOKE ALL ON {} FROM {}").format(table(name), roles)
        for name in [*POSTGRES_GRANTS, *partitions]
    ]
    for name, by_role in POSTGRES_GRANTS.items():
        for role, privileges in by_role.items():
            statements.append(
                sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL(", ").join(map(sql.SQL, privileges)),
                    table(name),
                    sql.Identifier(role),
                )
            )
    web = sql.Identifier(WEB_ROLE)
    for name in web_app_tables:
        statements.append(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(table(name), web)
        )
    statements.append(
        sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
            sql.Identifier(OUTBOX_SCHEMA), web
        )
    )
    return statements


def clickhouse_role_statements(database: str, *, cluster: str | None = None) -> list[str]:
    """The statements that create the ClickHouse roles and grant them on `database`."""
    where = f" {on_cluster(cluster)}" if cluster else ""
    db = "`" + database.replace("\\", "\\\\").replace("`", "\\`") + "`"

    def grant(privileges: str, target: str, role: str) -> str:
        return f"GRANT{where} {privileges} ON {target} TO {role}"

    # Grants only add: ClickHouse has no transaction to revoke and grant again in, and a
    # consumer inserting between the two would be refused. A release that narrows a role
    # says so, with the REVOKE to run.
    statements = [f"CREATE ROLE IF NOT EXISTS {role}{where}" for role in CLICKHOUSE_ROLES]
    for table in (EVENT_LOG_TABLE, DEAD_LETTER_TABLE, RUNS_TABLE, SOURCES_TABLE):
        statements.append(grant("INSERT, SELECT", f"{db}.{table}", WRITER_ROLE))
    statements += [
        grant("SELECT", f"{db}.{MIGRATIONS_TABLE}", WRITER_ROLE),
        grant("KILL QUERY", "*.*", WRITER_ROLE),
        grant("SELECT", "system.processes", WRITER_ROLE),
        grant("CREATE TEMPORARY TABLE", "*.*", WRITER_ROLE),
    ]
    if cluster:
        # CLUSTER for ON CLUSTER (the fence); REMOTE for the cluster() table function the
        # presence check and verify read every shard through.
        statements.append(grant("CLUSTER, REMOTE", "*.*", WRITER_ROLE))
    for table in (EVENT_LOG_TABLE, DEAD_LETTER_TABLE):
        statements.append(grant("SELECT", f"{db}.{table}", ANALYST_ROLE))
    return statements


def ensure_clickhouse_roles(transport: ClickHouseTransport, *, cluster: str | None = None) -> bool:
    """Create the ClickHouse roles and grant them; False where this user may not manage
    access (a warning), or the engine keeps no roles at all (the embedded chDB, whose only
    access storage is its read-only users.xml: nothing to grant, no warning)."""
    [[database, writable]] = transport.select(
        "SELECT currentDatabase(), (SELECT count() FROM system.user_directories"
        " WHERE type != 'users_xml')"
    )
    if not writable:
        log.info("clickhouse roles skipped", reason="this engine has no writable access storage")
        return False
    try:
        for statement in clickhouse_role_statements(str(database), cluster=cluster):
            transport.command(statement)
    except PipelineError as exc:
        log.warning(
            "clickhouse roles not granted",
            error=str(exc),
            hint="run deploy/clickhouse/users.sh as an admin with access management, or let"
            " the migrator manage access; until then the consumer needs the migrator's grants",
        )
        return False
    log.info("clickhouse roles granted", roles=list(CLICKHOUSE_ROLES))
    return True
