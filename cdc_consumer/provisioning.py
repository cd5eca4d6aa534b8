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
from cdc_consumer.outbox import OUTBOX_TABLE
from cdc_consumer.settings import ConsumerSettings

log = structlog.get_logger(__name__)


def ensure_publication(conn: psycopg.Connection[Any], name: str) -> None:
    """Create the insert-only publication of event_outbox, or check an existing one."""
    row = conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication"
        " WHERE pubname = %s",
        (name,),
    ).fetchone()
    if row is None:
        conn.execute(
            f"CREATE PUBLICATION {name} FOR TABLE {OUTBOX_TABLE} WITH (publish = 'insert')"
        )
        log.info("publication created", publication=name)
        return
    if tuple(row) != (True, False, False, False):
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"publication {name} must publish inserts only",
            hint=f"ALTER PUBLICATION {name} SET (publish = 'insert')",
        )
    tables = conn.execute(
        "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND tablename = %s",
        (name, OUTBOX_TABLE),
    ).fetchone()
    if tables is None:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"publication {name} does not include {OUTBOX_TABLE}",
            hint=f"ALTER PUBLICATION {name} ADD TABLE {OUTBOX_TABLE}",
        )


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
    """Apply sql/ to both databases, then make sure the publication and slot exist."""
    migrate_schemas(settings, clickhouse)
    with postgres.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        ensure_publication(conn, settings.cdc_publication)
        ensure_slot(conn, settings.cdc_slot)


def migrate_schemas(settings: ConsumerSettings, clickhouse: ClickHouseTransport) -> None:
    """Apply sql/ to both databases (the backfill creates the slot itself)."""
    with postgres.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        migrations.migrate_postgres(conn, migrations.SQL_ROOT / "postgres")
    migrations.migrate_clickhouse(
        clickhouse, migrations.SQL_ROOT / "clickhouse", cluster=settings.clickhouse_cluster
    )
