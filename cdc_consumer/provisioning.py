"""Everything `migrate` sets up: schemas in both databases, the publication and the slot.

The slot is created here, before the consumer ever streams, so every event committed after
`migrate` returns is retained in the WAL for the consumer, even if it starts much later.
The publication is managed in code rather than in a numbered SQL file because its name is
configuration (CDC_PUBLICATION); it publishes inserts only, so pruning never reaches the slot.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog

from cdc_consumer import migrations, postgres
from cdc_consumer.clickhouse import ClickHouseTransport
from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.outbox import OUTBOX_SCHEMA, OUTBOX_TABLE
from cdc_consumer.settings import ConsumerSettings

log = structlog.get_logger(__name__)


def ensure_publication(
    conn: psycopg.Connection[Any], name: str, *, ignored: frozenset[tuple[str, str]] = frozenset()
) -> None:
    """Create the insert-only publication of the outbox, or check an existing one: it publishes
    inserts only, through the root of a partitioned outbox, and no other table but those the
    operator listed as `ignored` (CDC_IGNORED_TABLES)."""
    row = conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot, puballtables"
        " FROM pg_publication WHERE pubname = %s",
        (name,),
    ).fetchone()
    if row is None:
        # Through the root: a partitioned outbox's rows then arrive as the outbox's own, not
        # under each partition's name (which the consumer refuses).
        conn.execute(
            f"CREATE PUBLICATION {name} FOR TABLE {OUTBOX_SCHEMA}.{OUTBOX_TABLE}"
            " WITH (publish = 'insert', publish_via_partition_root = true)"
        )
        log.info("publication created", publication=name)
        return
    *publishes, via_root, all_tables = row
    if tuple(publishes) != (True, False, False, False):
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"publication {name} must publish inserts only",
            hint=f"ALTER PUBLICATION {name} SET (publish = 'insert')",
        )
    if all_tables:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"publication {name} is FOR ALL TABLES: every table's rows would reach the consumer",
            hint=f"DROP PUBLICATION {name}, then `migrate` creates it for the outbox alone",
        )
    if not via_root and _outbox_is_partitioned(conn):
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"publication {name} publishes the partitioned outbox under its partitions' names",
            hint=f"ALTER PUBLICATION {name} SET (publish_via_partition_root = true)",
        )
    tables = {
        (str(schema), str(table))
        for schema, table in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (name,)
        )
    }
    if (OUTBOX_SCHEMA, OUTBOX_TABLE) not in tables:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"publication {name} does not include {OUTBOX_SCHEMA}.{OUTBOX_TABLE}",
            hint=f"ALTER PUBLICATION {name} ADD TABLE {OUTBOX_SCHEMA}.{OUTBOX_TABLE}",
        )
    others = sorted(
        f"{schema}.{table}" for schema, table in tables - {(OUTBOX_SCHEMA, OUTBOX_TABLE), *ignored}
    )
    if others:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"publication {name} also publishes {', '.join(others)}, which are not the outbox",
            hint=f"ALTER PUBLICATION {name} DROP TABLE {', '.join(others)}; or, if their rows"
            " are not events, list them in CDC_IGNORED_TABLES",
        )


def _outbox_is_partitioned(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (OUTBOX_SCHEMA, OUTBOX_TABLE),
    ).fetchone()
    return bool(row and row[0])


def ensure_slot(conn: psycopg.Connection[Any], name: str) -> None:
    """Create the pgoutput logical slot if it does not exist."""
    row = conn.execute(
        "SELECT plugin, slot_type FROM pg_replication_slots WHERE slot_name = %s", (name,)
    ).fetchone()
    if row is None:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        log.info("replication slot created", slot=name)
    elif tuple(row) != ("pgoutput", "logical"):
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"slot {name} exists but is not a pgoutput logical slot",
            hint="choose another CDC_SLOT or drop the slot",
        )


def migrate_all(settings: ConsumerSettings, clickhouse: ClickHouseTransport) -> None:
    """Apply sql/ to both databases and make sure the publication and slot exist. PostgreSQL's
    part runs under the migrations' advisory lock, so processes starting at once (a consumer
    and a `migrate` job, two replicas) take turns instead of racing to create them."""
    with (
        postgres.connect(settings.database_url.get_secret_value(), autocommit=True) as conn,
        migrations.postgres_lock(conn),
    ):
        migrations.migrate_postgres(conn, migrations.SQL_ROOT / "postgres")
        ensure_publication(conn, settings.cdc_publication, ignored=settings.ignored_tables)
        ensure_slot(conn, settings.cdc_slot)
    _migrate_clickhouse(settings, clickhouse)


def migrate_schemas(settings: ConsumerSettings, clickhouse: ClickHouseTransport) -> None:
    """Apply sql/ to both databases (the backfill creates the slot itself)."""
    with postgres.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        migrations.migrate_postgres(conn, migrations.SQL_ROOT / "postgres")
    _migrate_clickhouse(settings, clickhouse)


def _migrate_clickhouse(settings: ConsumerSettings, clickhouse: ClickHouseTransport) -> None:
    migrations.migrate_clickhouse(
        clickhouse, migrations.SQL_ROOT / "clickhouse", cluster=settings.clickhouse_cluster
    )
