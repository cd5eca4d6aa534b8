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


# Failover slots (kept in step on standbys by sync_replication_slots) came in PostgreSQL 17.
FAILOVER_MIN_VERSION = 170000


def check_failover_supported(server_version: int, *, failover: bool) -> None:
    """Refuse CDC_SLOT_FAILOVER on a server (`server_version`, e.g. 170002) that has no failover
    slots: asked for it, the operator relies on the slot surviving a promotion, and an older
    server would lose it."""
    if failover and server_version < FAILOVER_MIN_VERSION:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"CDC_SLOT_FAILOVER needs PostgreSQL 17 or later; this server is"
            f" {server_version // 10000}",
            hint="unset CDC_SLOT_FAILOVER (a failover then loses the slot: see"
            " docs/runbook-failover.md, without failover slots), or upgrade PostgreSQL",
        )


def ensure_slot(
    conn: psycopg.Connection[Any], name: str, *, url: str, failover: bool = False
) -> None:
    """Create the pgoutput logical slot if it does not exist, as a failover slot when asked.

    An existing slot that is not a failover slot while CDC_SLOT_FAILOVER asks for one is
    altered (ALTER_REPLICATION_SLOT, on the replication connection `url` opens): turning it on
    only adds protection, and is what the operator asked for. The other way round is refused
    rather than altered: the default (false) cannot tell "I want it off" from "never set",
    and silently turning off a failover slot someone set up by hand would lose the slot at the
    next promotion."""
    check_failover_supported(conn.info.server_version, failover=failover)
    row = conn.execute(
        "SELECT plugin, slot_type, coalesce((to_jsonb(s) ->> 'failover')::boolean, false),"
        " active_pid FROM pg_replication_slots s WHERE slot_name = %s",
        (name,),
    ).fetchone()
    if row is None:
        if failover:
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', failover => true)",
                (name,),
            )
        else:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        log.info("replication slot created", slot=name, failover=failover)
        return
    plugin, slot_type, is_failover, holder = row
    if (plugin, slot_type) != ("pgoutput", "logical"):
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"slot {name} exists but is not a pgoutput logical slot",
            hint="choose another CDC_SLOT or drop the slot",
        )
    if failover and not is_failover:
        if holder is not None:
            # ALTER_REPLICATION_SLOT waits, without a bound, for whoever holds the slot.
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"cannot make slot {name} a failover slot: it is active for PID {holder}",
                hint="stop the consumer (or the stale walsender) holding it, then run"
                " `python -m cdc_consumer migrate`",
            )
        _make_failover_slot(url, name)
    elif is_failover and not failover:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"slot {name} is a failover slot but CDC_SLOT_FAILOVER is false",
            hint="set CDC_SLOT_FAILOVER=true to keep it one, or turn it off on a replication"
            f" connection (ALTER_REPLICATION_SLOT {name} (FAILOVER false)) if a promoted"
            " standby should not keep it",
        )


def _make_failover_slot(url: str, name: str) -> None:
    try:
        with postgres.connect(url, autocommit=True, replication="database") as conn:
            conn.execute(f"ALTER_REPLICATION_SLOT {name} (FAILOVER true)")
    except psycopg.Error as exc:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"could not make slot {name} a failover slot: {str(exc).strip()}",
            hint="stop whatever holds the slot, then run `python -m cdc_consumer migrate`",
        ) from exc
    log.info("replication slot made a failover slot", slot=name)


def migrate_all(settings: ConsumerSettings, clickhouse: ClickHouseTransport) -> None:
    """Apply sql/ to both databases, then make sure the publication and slot exist."""
    migrate_schemas(settings, clickhouse)
    with postgres.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        ensure_publication(conn, settings.cdc_publication)
        ensure_slot(
            conn,
            settings.cdc_slot,
            url=settings.database_url.get_secret_value(),
            failover=settings.cdc_slot_failover,
        )


def migrate_schemas(settings: ConsumerSettings, clickhouse: ClickHouseTransport) -> None:
    """Apply sql/ to both databases (the backfill creates the slot itself)."""
    with postgres.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        migrations.migrate_postgres(conn, migrations.SQL_ROOT / "postgres")
    migrations.migrate_clickhouse(
        clickhouse, migrations.SQL_ROOT / "clickhouse", cluster=settings.clickhouse_cluster
    )
