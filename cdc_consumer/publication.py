"""The outbox's publication: what the slot decodes for the consumer.

Managed in code rather than in a numbered SQL file because its name, its slot and its shard are
configuration (CDC_PUBLICATION, CDC_SLOT, CDC_SHARD). `migrate` creates it; every command that
streams or reads for the consumer checks it, since a publication that sends other tables, the
partitions' names, updates, or another shard's rows would lose or double events silently:
- inserts only, so pruning never reaches the slot;
- the outbox alone (plus CDC_IGNORED_TABLES), published through a partitioned outbox's root;
- the record `migrate` left in its comment (shard.PublicationRecord): made for this slot and
  this shard, with the row filter it was made with. A publication made before records existed
  is adopted by the next `migrate` when it has no row filter.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc_consumer import postgres
from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.outbox import OUTBOX_SCHEMA, OUTBOX_TABLE
from cdc_consumer.shard import PublicationRecord, Shard

log = structlog.get_logger(__name__)

# Row filters on publications came in PostgreSQL 15.
ROW_FILTER_MIN_VERSION = 150000
_SHARDS_DOC = "docs/operations.md, 'Several consumers'"


def ensure_publication(
    conn: psycopg.Connection[Any],
    name: str,
    *,
    slot: str,
    shard: Shard | None = None,
    ignored: frozenset[tuple[str, str]] = frozenset(),
    provision: bool = True,
) -> None:
    """Create the publication of the outbox for `slot` (and `shard`), or check an existing one;
    `provision=False` only checks. A CONFIGURATION error says what is wrong and what to do."""
    if shard is not None and conn.info.server_version < ROW_FILTER_MIN_VERSION:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"CDC_SHARD needs PostgreSQL 15 or later (row filters); this server is"
            f" {conn.info.server_version // 10000}",
            hint="unset CDC_SHARD and run one consumer",
        )
    row = conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot, puballtables,"
        " obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = %s",
        (name,),
    ).fetchone()
    if row is None and not provision:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"the schema is not migrated: publication {name} does not exist",
            hint="run `python -m cdc_consumer migrate` (as the migrator: docs/operations.md,"
            " 'Roles') before this command",
        )
    if row is None:
        _create(conn, name, slot=slot, shard=shard)
        return
    *publishes, via_root, all_tables, comment = row
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
    _check_tables(conn, name, ignored)
    _check_record(
        conn,
        name,
        PublicationRecord.from_comment(comment),
        slot=slot,
        shard=shard,
        provision=provision,
    )


def _create(conn: psycopg.Connection[Any], name: str, *, slot: str, shard: Shard | None) -> None:
    # Through the root: a partitioned outbox's rows then arrive as the outbox's own, not under
    # each partition's name (which the consumer refuses).
    where = sql.SQL("") if shard is None else sql.SQL(" WHERE ({})").format(shard.condition)
    with conn.transaction():
        _execute_as_owner(
            conn,
            sql.SQL(
                "CREATE PUBLICATION {name} FOR TABLE {schema}.{table}{where}"
                " WITH (publish = 'insert', publish_via_partition_root = true)"
            ).format(
                name=sql.Identifier(name),
                schema=sql.Identifier(OUTBOX_SCHEMA),
                table=sql.Identifier(OUTBOX_TABLE),
                where=where,
            ),
        )
        # The filter as PostgreSQL prints it back, which is what a later check compares with.
        record = PublicationRecord(slot, _spec(shard), _row_filter(conn, name))
        _write_record(conn, name, record)
    log.info("publication created", publication=name, slot=slot, shard=record.shard)


def _execute_as_owner(conn: psycopg.Connection[Any], statement: sql.Composed) -> None:
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"this role may not create or record the publication: {postgres.first_line(exc)}",
            hint="run this command as the migrator, who owns the database (docs/operations.md,"
            " 'Roles')",
        ) from exc


def _check_tables(
    conn: psycopg.Connection[Any], name: str, ignored: frozenset[tuple[str, str]]
) -> None:
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


def _check_record(
    conn: psycopg.Connection[Any],
    name: str,
    record: PublicationRecord | None,
    *,
    slot: str,
    shard: Shard | None,
    provision: bool,
) -> None:
    row_filter = _row_filter(conn, name)
    if record is None:
        # Made before publications carried a record, or by hand. Without a row filter it sends
        # every outbox row, which is what an unsharded consumer expects.
        if row_filter is not None:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"publication {name} filters the outbox's rows (WHERE {row_filter}), which"
                " migrate did not set: nothing here ships the rows it leaves out",
                hint="if consumers split the outbox by filters made by hand, switch them to"
                " CDC_SHARD through the backfill, which ships each event once; removing the"
                " filter while another consumer ships the rest would double those events"
                f" ({_SHARDS_DOC})",
            )
        if shard is not None:
            raise _other_shard(name, None, shard)
        if provision:
            _write_record(conn, name, PublicationRecord(slot, None, None))
            log.info("publication adopted", publication=name, slot=slot)
        return
    if record.slot != slot:
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"publication {name} was made for slot {record.slot}, not {slot}: two consumers"
            " given one publication",
            hint=f"give each consumer its own CDC_PUBLICATION and CDC_SLOT ({_SHARDS_DOC})",
        )
    if record.shard != _spec(shard):
        raise _other_shard(name, record.shard, shard)
    if row_filter != record.row_filter:
        where = "" if record.row_filter is None else f" WHERE ({record.row_filter})"
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            f"publication {name}'s row filter was changed after migrate made it (now"
            f" {row_filter or 'none'}, made with {record.row_filter or 'none'}): the consumers"
            " would no longer split the outbox exactly",
            hint=f"put it back: ALTER PUBLICATION {name} SET TABLE"
            f" {OUTBOX_SCHEMA}.{OUTBOX_TABLE}{where}; a consumer streaming"
            " while it was changed shipped by the changed filter, so run `python -m"
            " cdc_consumer verify --since <a time before the change>` for every shard, and"
            f" repair what it lists ({_SHARDS_DOC})",
        )


def _other_shard(name: str, made_for: str | None, shard: Shard | None) -> PipelineError:
    return PipelineError(
        ErrorKind.CONFIGURATION,
        f"publication {name} was made for {_describe(made_for)}, but CDC_SHARD says"
        f" {_describe(_spec(shard))}",
        hint="a consumer's shard is fixed when migrate makes its publication: changing the"
        f" number of consumers is a switch to new slots and publications ({_SHARDS_DOC})",
    )


def _describe(spec: str | None) -> str:
    return "the whole outbox" if spec is None else f"shard {spec}"


def _spec(shard: Shard | None) -> str | None:
    return None if shard is None else str(shard)


def _row_filter(conn: psycopg.Connection[Any], name: str) -> str | None:
    if conn.info.server_version < ROW_FILTER_MIN_VERSION:
        return None
    row = conn.execute(
        "SELECT rowfilter FROM pg_publication_tables"
        " WHERE pubname = %s AND schemaname = %s AND tablename = %s",
        (name, OUTBOX_SCHEMA, OUTBOX_TABLE),
    ).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def _write_record(conn: psycopg.Connection[Any], name: str, record: PublicationRecord) -> None:
    _execute_as_owner(
        conn,
        sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
            sql.Identifier(name), sql.Literal(record.comment())
        ),
    )


def _outbox_is_partitioned(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (OUTBOX_SCHEMA, OUTBOX_TABLE),
    ).fetchone()
    return bool(row and row[0])
