"""Everything `migrate` sets up: schemas in both databases, the publication and the slot.

The slot is created here, before the consumer ever streams, so every event committed after
`migrate` returns is retained in the WAL for the consumer, even if it starts much later. A slot
that existed and shipped (its cdc_progress row says so) is not created again: the events
committed since it went are only in the outbox, and the backfill recreates it and ships them.
The publication is made and checked by `publication.py`.
The fsync table settings are too (CLICKHOUSE_FSYNC_AFTER_INSERT): every migrate brings them to
what the environment says, both ways.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog

from cdc_consumer import migrations, postgres, roles
from cdc_consumer.clickhouse import ClickHouseTransport, quote_string
from cdc_consumer.clickhouse_cluster import cluster_statement
from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.event_log import DEAD_LETTER_TABLE, EVENT_LOG_TABLE
from cdc_consumer.outbox import OUTBOX_SCHEMA, OUTBOX_TABLE
from cdc_consumer.publication import ensure_publication
from cdc_consumer.settings import ConsumerSettings

log = structlog.get_logger(__name__)

# MergeTree table settings, not query settings: ClickHouse refuses them in an INSERT's SETTINGS
# (UNKNOWN_SETTING, checked on 26.9), so they are set on the tables that acknowledge delivery.
# fsync_after_insert syncs each new part's files before the insert returns; fsync_part_directory
# syncs the part's directory after the rename that commits it (and after a merge's). A merge
# writes a new part and drops its sources: min_rows_to_fsync_after_merge = 1 syncs that part
# too, since a server keeps the sources only old_parts_lifetime (480 s) for a crash to fall back
# on, and chDB not at all (0). Both tables, because a dead-lettered event counts as delivered.
FSYNC_SETTINGS = ("fsync_after_insert", "fsync_part_directory", "min_rows_to_fsync_after_merge")
FSYNC_TABLES = (EVENT_LOG_TABLE, DEAD_LETTER_TABLE)

_POSTGRES_SQL = migrations.SQL_ROOT / "postgres"
_CLICKHOUSE_SQL = migrations.SQL_ROOT / "clickhouse"


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
    conn: psycopg.Connection[Any],
    name: str,
    *,
    url: str,
    failover: bool = False,
    provision: bool = True,
) -> None:
    """Create the pgoutput logical slot if it does not exist, as a failover slot when asked
    (`provision=False`: refuse a missing slot, or one to be made a failover slot, instead).

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
        _refuse_a_slot_that_shipped(conn, name)
    if row is None and not provision:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"replication slot {name} does not exist",
            hint="a new deployment: run `python -m cdc_consumer migrate`, which creates it; a"
            " slot that existed and was lost or dropped: the events since are only in the"
            " outbox, so run `python -m cdc_consumer backfill --since <a time before it went>`"
            " instead, which recreates the slot and ships them (a slot migrate made would"
            " start after them); docs/operations.md, 'The slot is lost'",
        )
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
        if not provision:
            raise _not_migrated(f"slot {name} is not a failover slot, as CDC_SLOT_FAILOVER asks")
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


def _refuse_a_slot_that_shipped(conn: psycopg.Connection[Any], name: str) -> None:
    """Refuse to create slot `name` if cdc_progress has its row: an earlier slot of that name
    shipped events, and its row still drives pruning. A new slot starts at the current WAL
    position, after the events committed since the old one went; its catalog_xmin (and, once
    it ships, its commit times) would then let the prune delete them, unshipped, from the
    only place they are. The backfill recreates the slot and ships them instead."""
    exists = conn.execute("SELECT to_regclass('cdc_progress') IS NOT NULL").fetchone()
    if not (exists and exists[0]):
        return  # before the first migrate creates it (sql/postgres/0002): nothing shipped
    row = conn.execute(
        "SELECT last_commit_time,"
        f" coalesce((SELECT min(created_at) FROM {OUTBOX_SCHEMA}.{OUTBOX_TABLE}), now())"
        " FROM cdc_progress WHERE slot = %s",
        (name,),
    ).fetchone()
    if row is None:
        return
    last_shipped, oldest = row
    if last_shipped is not None:
        shipped, since = f"its last shipped commit is from {_iso(last_shipped)}", last_shipped
    else:
        # No shipped commit recorded: every row in the outbox (none pruned since) may be missing.
        shipped, since = "it recorded no shipped commit", oldest
    raise PipelineError(
        ErrorKind.CONFIGURATION,
        f"replication slot {name} does not exist, but cdc_progress shows an earlier slot of"
        f" that name: {shipped}, and a slot created now would start after the events"
        " committed since, which pruning would then delete unshipped",
        hint=f"run `python -m cdc_consumer backfill --since {_iso(since)}`, which recreates"
        " the slot and ships the events it missed; or, to start over without them, delete"
        f" the old slot's progress (DELETE FROM cdc_progress WHERE slot = '{name}';) and run"
        " `python -m cdc_consumer migrate`; docs/operations.md, 'The slot is lost'",
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


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


def ensure_consumer_publication(
    conn: psycopg.Connection[Any], settings: ConsumerSettings, *, provision: bool = True
) -> None:
    """The publication these settings stream (publication.ensure_publication)."""
    ensure_publication(
        conn,
        settings.cdc_publication,
        slot=settings.cdc_slot,
        shard=settings.cdc_shard,
        ignored=settings.ignored_tables,
        provision=provision,
    )


def migrate_all(settings: ConsumerSettings, clickhouse: ClickHouseTransport) -> None:
    """Apply sql/ to both databases and make sure the publication and slot exist (a slot that
    shipped before and is gone is refused instead: `_refuse_a_slot_that_shipped`). PostgreSQL's
    parts run under the migrations' advisory lock, so processes starting at once (a consumer
    and a `migrate` job, two replicas) take turns instead of racing to create them."""
    url = settings.database_url.get_secret_value()
    with postgres.connect(url, autocommit=True) as conn, migrations.postgres_lock(conn):
        migrations.migrate_postgres(conn, _POSTGRES_SQL)
        ensure_consumer_publication(conn, settings)
        roles.ensure_postgres_roles(conn)
    _migrate_clickhouse(settings, clickhouse)
    roles.ensure_clickhouse_roles(clickhouse, cluster=settings.clickhouse_cluster)
    # The slot last: when it refuses to recreate one that shipped, the schemas are migrated
    # already, as the backfill it names checks.
    with postgres.connect(url, autocommit=True) as conn, migrations.postgres_lock(conn):
        ensure_slot(conn, settings.cdc_slot, url=url, failover=settings.cdc_slot_failover)


def check_migrated(
    settings: ConsumerSettings,
    clickhouse: ClickHouseTransport,
    *,
    slot: bool = True,
    publication: bool = True,
) -> None:
    """What the commands that use the schema check instead of migrating, so that they run with
    roles that may not change it (`roles`): every sql/ file applied in both databases, the
    publication as `migrate` makes it (`publication`), the slot (`slot`) and the fsync table
    settings. A CONFIGURATION error names what is missing, with `migrate` as the hint."""
    with postgres.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        try:
            unapplied = migrations.unapplied_postgres(conn, _POSTGRES_SQL)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"this role may not read what is migrated: {postgres.first_line(exc)}",
                hint="run `python -m cdc_consumer migrate`, which grants outbox_consumer, and"
                " make this login role a member of it (docs/operations.md, 'Roles')",
            ) from exc
        _refuse_unapplied("postgres", unapplied)
        if publication:
            ensure_consumer_publication(conn, settings, provision=False)
        if slot:
            ensure_slot(
                conn,
                settings.cdc_slot,
                url=settings.database_url.get_secret_value(),
                failover=settings.cdc_slot_failover,
                provision=False,
            )
    migrations.refuse_other_topology(clickhouse, settings.clickhouse_cluster)
    _refuse_unapplied(
        "clickhouse",
        migrations.unapplied_clickhouse(clickhouse, _CLICKHOUSE_SQL),
        also="; a user without grants on the tables sees none of them (outbox_writer)"
        + (
            "; on a cluster the record is per shard: run migrate with CLICKHOUSE_URL naming a"
            " host of this one"
            if settings.clickhouse_cluster
            else ""
        ),
    )
    ensure_fsync(
        clickhouse,
        enabled=settings.clickhouse_fsync_after_insert,
        cluster=settings.clickhouse_cluster,
        provision=False,
    )


def _refuse_unapplied(database: str, names: list[str], *, also: str = "") -> None:
    if names:
        raise _not_migrated(f"{database} migrations not applied: {', '.join(names)}", also=also)


def _not_migrated(what: str, *, also: str = "") -> PipelineError:
    return PipelineError(
        ErrorKind.CONFIGURATION,
        f"the schema is not migrated: {what}",
        hint="run `python -m cdc_consumer migrate` (as the migrator: docs/operations.md,"
        f" 'Roles') before this command{also}",
    )


def _migrate_clickhouse(settings: ConsumerSettings, clickhouse: ClickHouseTransport) -> None:
    migrations.migrate_clickhouse(clickhouse, _CLICKHOUSE_SQL, cluster=settings.clickhouse_cluster)
    ensure_fsync(
        clickhouse,
        enabled=settings.clickhouse_fsync_after_insert,
        cluster=settings.clickhouse_cluster,
    )


def fsync_statements(
    *, enabled: bool, cluster: str | None = None, tables: Sequence[str] = FSYNC_TABLES
) -> list[str]:
    """The ALTERs that put the fsync settings of `tables` where the environment says: each set
    to 1, or reset to the server's default (its `<merge_tree>` config, 0 unless changed)."""
    if enabled:
        change = "MODIFY SETTING " + ", ".join(f"{name} = 1" for name in FSYNC_SETTINGS)
    else:
        change = "RESET SETTING " + ", ".join(FSYNC_SETTINGS)
    statements = [f"ALTER TABLE {table} {change}" for table in tables]
    if cluster is None:
        return statements
    return [cluster_statement(statement, cluster=cluster) for statement in statements]


def tables_off_fsync_target(ddl_by_table: Mapping[str, str], *, enabled: bool) -> list[str]:
    """The delivery tables whose DDL (`create_table_query`) does not already say what the
    environment asks: all three settings at 1, or none of them set."""
    off_target = []
    for table in FSYNC_TABLES:
        ddl = ddl_by_table.get(table, "")
        values = [re.search(rf"\b{name}\s*=\s*(\d+)", ddl) for name in FSYNC_SETTINGS]
        if enabled:
            wrong = any(value is None or value.group(1) != "1" for value in values)
        else:
            wrong = any(value is not None for value in values)
        if wrong:
            off_target.append(table)
    return off_target


def clickhouse_ddl(*, cluster: str | None, fsync: bool) -> str:
    """Every ClickHouse statement `migrate` applies to an empty database under this
    configuration, for review: the sql/ files (as rewritten for `cluster`), then the fsync
    settings when they are on (off, a new table has nothing to reset)."""
    files = migrations.clickhouse_ddl(migrations.SQL_ROOT / "clickhouse", cluster=cluster)
    if not fsync:
        return f"{files}\n-- CLICKHOUSE_FSYNC_AFTER_INSERT=false: no fsync settings\n"
    statements = fsync_statements(enabled=True, cluster=cluster)
    return (
        f"{files}\n-- CLICKHOUSE_FSYNC_AFTER_INSERT=true\n"
        + "\n\n".join(f"{statement};" for statement in statements)
        + "\n"
    )


def ensure_fsync(
    clickhouse: ClickHouseTransport,
    *,
    enabled: bool,
    cluster: str | None = None,
    provision: bool = True,
) -> None:
    """Alter only the tables whose fsync settings differ from what the environment asks (or,
    `provision=False`, refuse them). On a cluster the host named by CLICKHOUSE_URL is read,
    and the ALTERs it needs run ON CLUSTER."""
    names = ", ".join(quote_string(table) for table in FSYNC_TABLES)
    rows = clickhouse.select(
        "SELECT name, create_table_query FROM system.tables"
        f" WHERE database = currentDatabase() AND name IN ({names})"
    )
    tables = tables_off_fsync_target({str(n): str(ddl) for n, ddl in rows}, enabled=enabled)
    if tables and not provision:
        raise _not_migrated(
            f"the fsync settings of {', '.join(tables)} are not what"
            f" CLICKHOUSE_FSYNC_AFTER_INSERT={str(enabled).lower()} asks"
        )
    for statement in fsync_statements(enabled=enabled, cluster=cluster, tables=tables):
        clickhouse.command(statement)
    if provision:
        log.info("clickhouse fsync after insert", enabled=enabled, altered=tables)
