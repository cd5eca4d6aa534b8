"""ClickHouse on a cluster: the replicated schema, and the settings delivery relies on there.

The files in sql/clickhouse are written for one server. With CLICKHOUSE_CLUSTER set, the runner
applies `cluster_statement` of each of their statements instead: the same tables, created and
altered `ON CLUSTER`, on the replicated variant of their MergeTree engine. Only the statement
shapes below are rewritten; anything else is refused, because a statement passed through
unchanged would run on one host and leave the cluster's hosts disagreeing about the schema.

Pure functions, no I/O. Why the consumer needs each piece: docs/adr/0005-clickhouse-cluster.md.
"""

from __future__ import annotations

import re
from typing import Literal

from cdc_consumer.errors import ErrorKind, PipelineError

# CLICKHOUSE_INSERT_QUORUM: 0 is off; 'auto' is ClickHouse's own majority of the replicas.
InsertQuorum = int | Literal["auto"]

# ClickHouse's conventional replication path: one ZooKeeper node per shard, database and table.
# {shard} and {replica} are each host's macros; {database} is expanded by ClickHouse itself.
ZOOKEEPER_PATH = "/clickhouse/tables/{{shard}}/{{database}}/{table}"
REPLICA_NAME = "{replica}"
_MERGE_TREE_FAMILY = frozenset(
    {
        "MergeTree",
        "ReplacingMergeTree",
        "SummingMergeTree",
        "AggregatingMergeTree",
        "CollapsingMergeTree",
        "VersionedCollapsingMergeTree",
        "GraphiteMergeTree",
        "CoalescingMergeTree",
    }
)
# Comments and string literals are blanked out before matching, so a comment that mentions an
# engine, or a DEFAULT holding one, is never rewritten.
_NOT_CODE = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^'\\]|\\.)*'", re.DOTALL)
_NAME = r"(?:`[^`]+`|\"[^\"]+\"|[A-Za-z_][A-Za-z0-9_]*)"
_TARGET = rf"(?P<name>{_NAME}(?:\s*\.\s*{_NAME})?)"
_CREATE_TABLE = re.compile(rf"\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_TARGET}", re.I)
_ALTER_TABLE = re.compile(rf"\s*ALTER\s+TABLE\s+{_TARGET}", re.I)
_CREATE_DATABASE = re.compile(rf"\s*CREATE\s+DATABASE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_TARGET}", re.I)
_ON_CLUSTER = re.compile(r"\bON\s+CLUSTER\b", re.I)
_ENGINE = re.compile(r"\bENGINE\s*=\s*(?P<engine>[A-Za-z_][A-Za-z0-9_]*)", re.I)
_AS = re.compile(r"\bAS\b", re.I)
_PLAIN_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A replicated table ignores the non-replicated window; the replicated one is its counterpart.
_NON_REPLICATED_DEDUP = re.compile(r"\bnon_replicated_deduplication_window\b", re.I)
_REPLICATED_DEDUP = "replicated_deduplication_window"
_HINT = (
    "write sql/clickhouse files for one server (CREATE TABLE on a MergeTree engine, ALTER"
    " TABLE, CREATE DATABASE); to use another statement on a cluster, teach"
    " cdc_consumer/clickhouse_cluster.py its shape first, with a test"
)


def sql_string(value: str) -> str:
    """A ClickHouse string literal holding `value`."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def on_cluster(cluster: str) -> str:
    """The `ON CLUSTER '<cluster>'` clause."""
    return f"ON CLUSTER {sql_string(cluster)}"


def quorum_insert_settings(quorum: InsertQuorum) -> dict[str, str]:
    """Insert settings for a quorum write; none when quorum is off (0)."""
    if quorum == 0:
        return {}
    # Sequential quorum: ClickHouse refuses an insert while the previous one has not reached
    # its quorum, so inserts are linearised and every replica of a quorum holds all earlier
    # ones; select_sequential_consistency relies on exactly that.
    return {"insert_quorum": str(quorum), "insert_quorum_parallel": "0"}


def quorum_select_settings(quorum: InsertQuorum) -> dict[str, str]:
    """Select settings that see every insert acknowledged under that quorum."""
    # A replica missing a quorum-acknowledged insert refuses the query rather than answer a
    # lower position, so the restart read never skips less than what was acknowledged.
    return {} if quorum == 0 else {"select_sequential_consistency": "1"}


def cluster_statement(statement: str, *, cluster: str) -> str:
    """`statement` (one statement of a sql/clickhouse file) as it is applied on `cluster`.

    CREATE TABLE, ALTER TABLE and CREATE DATABASE gain ON CLUSTER after their target; a
    MergeTree-family engine becomes its Replicated variant with the conventional path and
    replica macros, followed by its own arguments; non_replicated_deduplication_window becomes
    replicated_deduplication_window. Any other statement raises a CONFIGURATION error.
    """
    code = _NOT_CODE.sub(lambda m: " " * len(m.group()), statement)
    if _ON_CLUSTER.search(code):
        raise _refusal(statement, "already names a cluster")
    edits: list[tuple[int, int, str]] = []
    if target := _CREATE_TABLE.match(code):
        edits.append(_replicated_engine(statement, code, target))
    elif target := _CREATE_DATABASE.match(code):
        if _ENGINE.search(code):
            raise _refusal(statement, "chooses a database engine")
    elif not (target := _ALTER_TABLE.match(code)):
        raise _refusal(
            statement, "is not a statement this generator knows how to make cluster-safe"
        )
    edits.append((target.end(), target.end(), f" {on_cluster(cluster)}"))
    edits += [(m.start(), m.end(), _REPLICATED_DEDUP) for m in _NON_REPLICATED_DEDUP.finditer(code)]
    for start, end, text in sorted(edits, reverse=True):
        statement = statement[:start] + text + statement[end:]
    return statement


def _replicated_engine(statement: str, code: str, create: re.Match[str]) -> tuple[int, int, str]:
    """The edit that turns a CREATE TABLE's engine clause into its Replicated variant."""
    columns = _skip_space(code, create.end())
    if not code.startswith("(", columns):
        raise _refusal(statement, "has no column list right after the table name")
    # Only the clauses after the column list, outside any parentheses, can hold the engine.
    tail = _top_level(code, _closing(statement, code, columns) + 1)
    engine = _ENGINE.search(tail)
    if engine is None:
        raise _refusal(statement, "names no ENGINE")
    if _AS.search(tail):
        raise _refusal(statement, "fills the table from a query (AS SELECT)")
    name = engine.group("engine")
    if name.startswith("Replicated"):
        raise _refusal(statement, "is already replicated: write sql/clickhouse for one server")
    if name not in _MERGE_TREE_FAMILY:
        raise _refusal(statement, f"uses engine {name}, which has no Replicated variant")
    end = engine.end("engine")
    own_arguments = ""
    opening = _skip_space(code, end)
    if code.startswith("(", opening):
        close = _closing(statement, code, opening)
        inner = statement[opening + 1 : close].strip()
        own_arguments = f", {inner}" if inner else ""
        end = close + 1
    path = sql_string(ZOOKEEPER_PATH.format(table=_table_name(statement, create)))
    engine_clause = f"Replicated{name}({path}, {sql_string(REPLICA_NAME)}{own_arguments})"
    return engine.start("engine"), end, engine_clause


def _table_name(statement: str, create: re.Match[str]) -> str:
    """The table's own name, unqualified and unquoted, which goes into the replication path."""
    name = re.split(r"\s*\.\s*", create.group("name"))[-1].strip('`"')
    if not _PLAIN_TABLE_NAME.match(name):
        raise _refusal(statement, f"names table {name!r}; the replication path needs a plain name")
    return name


def _skip_space(code: str, index: int) -> int:
    return len(code) - len(code[index:].lstrip())


def _closing(statement: str, code: str, opening: int) -> int:
    """The index of the parenthesis that closes the one at `opening`."""
    depth = 0
    for index in range(opening, len(code)):
        depth += {"(": 1, ")": -1}.get(code[index], 0)
        if depth == 0:
            return index
    raise _refusal(statement, "has an unbalanced parenthesis")


def _top_level(code: str, start: int) -> str:
    """`code` from `start` on with whatever sits inside parentheses blanked out (and all before
    `start` blanked too), so that positions still match the statement."""
    out = [" "] * start
    depth = 0
    for char in code[start:]:
        depth += char == "("
        out.append(" " if depth else char)
        depth -= char == ")"
    return "".join(out)


def _refusal(statement: str, why: str) -> PipelineError:
    lines = (line.strip() for line in statement.splitlines())
    first = next((line for line in lines if line and not line.startswith("--")), "")
    return PipelineError(
        ErrorKind.CONFIGURATION,
        f"cannot apply on a ClickHouse cluster: `{first[:120]}` {why}",
        hint=_HINT,
    )
