"""The schema and settings for a ClickHouse cluster, as text and against the real engine.

No cluster runs here (chDB has no ZooKeeper), so the real engine is asked what it can answer:
its parser reads every rewritten statement (formatQuery), and it takes each replicated table
definition through every check it makes before it needs ZooKeeper.
"""

from __future__ import annotations

import dataclasses
import re
import uuid

import pytest

from cdc_consumer import migrations
from cdc_consumer.clickhouse import ChdbTransport, HttpTransport, connect
from cdc_consumer.clickhouse_cluster import (
    cluster_statement,
    on_cluster,
    quorum_insert_settings,
    quorum_select_settings,
    sql_string,
)
from cdc_consumer.clickhouse_sink import ClickHouseSink, stored_counts_sql
from cdc_consumer.errors import ErrorKind, PipelineError
from tests.support.fix_clickhouse import clickhouse_select

CLUSTER = "events"
ON = "ON CLUSTER 'events'"
PATH = "/clickhouse/tables/{shard}/{database}"
# The runner's own table and every file in sql/clickhouse, as `migrate` applies them.
FILES = [
    migrations.CLICKHOUSE_RECORD,
    *migrations.migration_files(migrations.SQL_ROOT / "clickhouse"),
]
_CREATE_TABLE = re.compile(r"^(?:\s*--[^\n]*\n)*\s*CREATE TABLE (?:IF NOT EXISTS )?(\w+) ", re.I)


def _cluster(sql: str) -> str:
    return cluster_statement(sql, cluster=CLUSTER)


def _clustered(file: migrations.MigrationFile) -> list[str]:
    return migrations.clickhouse_statements(file, cluster=CLUSTER)


def test_create_table_gains_on_cluster_and_the_replicated_engine():
    """CREATE TABLE gains ON CLUSTER after its name and the Replicated engine on its own path."""
    sql = (
        "CREATE TABLE IF NOT EXISTS cdc_sources (source LowCardinality(String), seen UInt64)"
        " ENGINE = ReplacingMergeTree ORDER BY source"
    )
    assert _cluster(sql) == (
        f"CREATE TABLE IF NOT EXISTS cdc_sources {ON} (source LowCardinality(String), seen UInt64)"
        f" ENGINE = ReplicatedReplacingMergeTree('{PATH}/cdc_sources', '{{replica}}')"
        " ORDER BY source"
    )


@pytest.mark.parametrize(
    ("engine", "replicated"),
    [
        ("MergeTree", f"ReplicatedMergeTree('{PATH}/t', '{{replica}}')"),
        ("MergeTree()", f"ReplicatedMergeTree('{PATH}/t', '{{replica}}')"),
        (
            "ReplacingMergeTree(seen)",
            f"ReplicatedReplacingMergeTree('{PATH}/t', '{{replica}}', seen)",
        ),
        (
            "ReplacingMergeTree( seen, is_deleted )",
            f"ReplicatedReplacingMergeTree('{PATH}/t', '{{replica}}', seen, is_deleted)",
        ),
        (
            "SummingMergeTree((seen, total))",
            f"ReplicatedSummingMergeTree('{PATH}/t', '{{replica}}', (seen, total))",
        ),
        (
            "CollapsingMergeTree(sign)",
            f"ReplicatedCollapsingMergeTree('{PATH}/t', '{{replica}}', sign)",
        ),
    ],
)
def test_engine_arguments_follow_the_replication_path(engine, replicated):
    """A MergeTree-family engine keeps its own arguments, after the path and replica name."""
    sql = (
        f"CREATE TABLE t (seen UInt64, total UInt64, sign Int8, is_deleted UInt8) ENGINE = {engine}"
    )
    assert _cluster(f"{sql} ORDER BY seen") == (
        f"CREATE TABLE t {ON} (seen UInt64, total UInt64, sign Int8, is_deleted UInt8)"
        f" ENGINE = {replicated} ORDER BY seen"
    )


def test_settings_keep_their_values_with_the_replicated_dedup_window():
    """non_replicated_deduplication_window becomes its replicated counterpart; others stay."""
    sql = (
        "CREATE TABLE t (x UInt8) ENGINE = MergeTree PARTITION BY x % 4 ORDER BY x"
        " SETTINGS index_granularity = 4096, non_replicated_deduplication_window = 1000"
    )
    assert _cluster(sql) == (
        f"CREATE TABLE t {ON} (x UInt8) ENGINE = ReplicatedMergeTree('{PATH}/t', '{{replica}}')"
        " PARTITION BY x % 4 ORDER BY x"
        " SETTINGS index_granularity = 4096, replicated_deduplication_window = 1000"
    )


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "ALTER TABLE event_log ADD COLUMN IF NOT EXISTS source LowCardinality(String)"
            " DEFAULT '' AFTER trace_id",
            f"ALTER TABLE event_log {ON} ADD COLUMN IF NOT EXISTS source LowCardinality(String)"
            " DEFAULT '' AFTER trace_id",
        ),
        (
            "ALTER TABLE event_log ADD INDEX IF NOT EXISTS source_lsn_minmax source_lsn"
            " TYPE minmax GRANULARITY 1",
            f"ALTER TABLE event_log {ON} ADD INDEX IF NOT EXISTS source_lsn_minmax source_lsn"
            " TYPE minmax GRANULARITY 1",
        ),
        (
            "ALTER TABLE event_log MATERIALIZE INDEX source_lsn_minmax",
            f"ALTER TABLE event_log {ON} MATERIALIZE INDEX source_lsn_minmax",
        ),
        (
            "ALTER TABLE event_log ADD PROJECTION IF NOT EXISTS by_position"
            " (SELECT source_lsn, source_seq ORDER BY source_lsn)",
            f"ALTER TABLE event_log {ON} ADD PROJECTION IF NOT EXISTS by_position"
            " (SELECT source_lsn, source_seq ORDER BY source_lsn)",
        ),
        (
            "alter table db.`event_log` modify setting non_replicated_deduplication_window=9",
            f"alter table db.`event_log` {ON} modify setting replicated_deduplication_window=9",
        ),
        (
            "CREATE DATABASE IF NOT EXISTS analytics",
            f"CREATE DATABASE IF NOT EXISTS analytics {ON}",
        ),
    ],
)
def test_alter_table_and_create_database_gain_on_cluster_after_their_target(sql, expected):
    """ALTER TABLE (columns, indexes, projections, settings) and CREATE DATABASE gain ON CLUSTER."""
    assert _cluster(sql) == expected


def test_comments_and_string_literals_are_not_rewritten():
    """An engine or setting named in a comment or a string literal stays as written."""
    sql = (
        "-- was ENGINE = MergeTree, non_replicated_deduplication_window = 5\n"
        "CREATE TABLE t (kind String DEFAULT 'ENGINE = Memory', x UInt8) -- ALTER TABLE u\n"
        "ENGINE = MergeTree ORDER BY x /* ENGINE = Log */"
    )
    assert _cluster(sql) == (
        "-- was ENGINE = MergeTree, non_replicated_deduplication_window = 5\n"
        f"CREATE TABLE t {ON} (kind String DEFAULT 'ENGINE = Memory', x UInt8) -- ALTER TABLE u\n"
        f"ENGINE = ReplicatedMergeTree('{PATH}/t', '{{replica}}') ORDER BY x /* ENGINE = Log */"
    )


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("INSERT INTO event_log (event_type) VALUES ('seed')", "is not a statement"),
        ("DROP TABLE event_log", "is not a statement"),
        ("CREATE MATERIALIZED VIEW v TO event_log AS SELECT * FROM raw", "is not a statement"),
        ("CREATE OR REPLACE TABLE t (x UInt8) ENGINE = MergeTree ORDER BY x", "is not a statement"),
        ("CREATE TABLE t (x UInt8) ENGINE = Memory", "engine Memory"),
        ("CREATE TABLE t (x UInt8) ENGINE = ReplicatedMergeTree('/p', 'r') ORDER BY x", "already"),
        ("CREATE TABLE t (x UInt8) ORDER BY x", "names no ENGINE"),
        ("CREATE TABLE t AS event_log", "no column list"),
        ("CREATE TABLE t (x UInt8) ENGINE = MergeTree ORDER BY x AS SELECT 1", "AS SELECT"),
        ("CREATE TABLE `a-b` (x UInt8) ENGINE = MergeTree ORDER BY x", "plain name"),
        ("ALTER TABLE event_log ON CLUSTER other DROP COLUMN x", "already names a cluster"),
        ("CREATE DATABASE d ENGINE = Replicated('/p', '{shard}', '{replica}')", "database engine"),
    ],
)
def test_statements_it_cannot_make_cluster_safe_are_refused(sql, why):
    """A statement outside the known shapes stops with a configuration error and a hint."""
    with pytest.raises(PipelineError) as caught:
        _cluster(sql)
    assert caught.value.kind is ErrorKind.CONFIGURATION
    assert why in str(caught.value)
    assert "clickhouse_cluster.py" in caught.value.hint


def test_cluster_name_is_quoted_as_a_string_literal():
    """The cluster name goes into SQL as an escaped string literal, whatever it holds."""
    assert on_cluster("it's\\") == "ON CLUSTER 'it\\'s\\\\'"


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_every_repository_statement_is_rewritten_for_the_cluster(file):
    """Each statement `migrate` applies names the cluster; each table is replicated on its path."""
    single = migrations.clickhouse_statements(file)
    clustered = _clustered(file)
    assert len(clustered) == len(single) > 0
    for statement in clustered:
        code = re.sub(r"--[^\n]*", "", statement)
        assert ON in code
        assert "non_replicated_deduplication_window" not in code
        if table := _CREATE_TABLE.match(statement):
            engine = re.search(r"\bENGINE = (\w+)\('([^']*)', '\{replica\}'", code)
            assert engine is not None, statement
            assert engine.group(1).startswith("Replicated")
            assert engine.group(2) == f"{PATH}/{table.group(1)}"


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_clickhouse_parses_every_rewritten_statement_with_its_cluster(clickhouse_server, file):
    """ClickHouse's own parser reads each rewritten statement and finds ON CLUSTER in it."""
    for statement in _clustered(file):
        [[formatted]] = clickhouse_select(
            clickhouse_server.url, f"SELECT formatQuery({sql_string(statement)})"
        )
        assert f"ON CLUSTER {CLUSTER}" in formatted, formatted


@pytest.fixture
def scratch_database_url(clickhouse_server):
    """A ClickHouse URL on a database of its own, dropped afterwards: `CREATE TABLE IF NOT
    EXISTS` of a table another test already made would succeed without checking anything."""
    database = f"cluster_ddl_{uuid.uuid4().hex[:12]}"
    admin = connect(clickhouse_server.url)
    admin.command(f"CREATE DATABASE {database}")
    try:
        yield dataclasses.replace(clickhouse_server, database=database).url
    finally:
        admin.command(f"DROP DATABASE {database}")
        admin.close()


_TABLES = [
    pytest.param(statement, id=f"{file.name}:{match.group(1)}")
    for file in FILES
    for statement in _clustered(file)
    if (match := _CREATE_TABLE.match(statement))
]


@pytest.mark.parametrize("statement", _TABLES)
def test_clickhouse_accepts_every_replicated_table_up_to_zookeeper(scratch_database_url, statement):
    """The engine takes each replicated table (engine, arguments, settings, keys) as far as it can
    go without ZooKeeper, which is the only thing it then misses."""
    # Run on this server alone, with the macros a cluster host would define, so the engine
    # checks the table itself rather than stopping at the missing cluster or macros. (A server
    # configured with ZooKeeper would create the table instead; the suite's servers have none.)
    local = statement.replace(f" {ON}", "").replace("{shard}", "01").replace("{replica}", "r1")
    transport = connect(scratch_database_url)
    try:
        with pytest.raises(PipelineError, match=r"Code: 225\..*without ZooKeeper"):
            transport.command(local)
    finally:
        transport.close()


def test_quorum_settings_are_none_when_off_and_sequential_when_on():
    """Quorum 0 adds no setting; 2 or auto add a sequential quorum and consistent selects."""
    assert quorum_insert_settings(0) == quorum_select_settings(0) == {}
    for quorum in (2, "auto"):
        assert quorum_insert_settings(quorum) == {
            "insert_quorum": str(quorum),
            "insert_quorum_parallel": "0",
        }
        assert quorum_select_settings(quorum) == {"select_sequential_consistency": "1"}


def test_http_transport_sends_quorum_settings_the_engine_accepts(clickhouse_faults):
    """With a quorum, inserts carry insert_quorum and insert_quorum_parallel=0 and selects
    select_sequential_consistency=1, all taken by the real engine; without one, neither."""
    table = f"quorum_probe_{uuid.uuid4().hex[:12]}"
    plain = HttpTransport(clickhouse_faults.url)
    quorum = HttpTransport(clickhouse_faults.url, insert_quorum=2)
    plain.command(f"CREATE TABLE {table} (x UInt8) ENGINE = MergeTree ORDER BY x")
    try:
        quorum.insert(table, [b'{"x":1}'], columns=["x"], query_id=f"{table}-1", settings={})
        sent = clickhouse_faults.stats()["last_request"]["settings"]
        assert (sent["insert_quorum"], sent["insert_quorum_parallel"]) == ("2", "0")
        assert quorum.select(f"SELECT count() FROM {table}") == [[1]]
        assert (
            clickhouse_faults.stats()["last_request"]["settings"]["select_sequential_consistency"]
            == "1"
        )
        plain.insert(table, [b'{"x":2}'], columns=["x"], query_id=f"{table}-2", settings={})
        assert "insert_quorum" not in clickhouse_faults.stats()["last_request"]["settings"]
        plain.select(f"SELECT count() FROM {table}")
        sent = clickhouse_faults.stats()["last_request"]["settings"]
        assert "select_sequential_consistency" not in sent
    finally:
        plain.command(f"DROP TABLE {table}")
        plain.close()
        quorum.close()


def test_fence_of_earlier_runs_is_sent_on_cluster(tmp_path):
    """With a cluster the fence is KILL QUERY ON CLUSTER, which the engine routes as distributed
    DDL (chDB has none and says so); without one it runs on the server itself."""
    transport = ChdbTransport(str(tmp_path / "ch"))
    try:
        migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
        ClickHouseSink(transport, source="cluster_fence").fence_earlier_runs()
        clustered = ClickHouseSink(transport, source="cluster_fence", cluster=CLUSTER)
        with pytest.raises(PipelineError, match=r"Code: 392\..*Replicated DDL"):
            clustered.fence_earlier_runs()
    finally:
        transport.close()


def test_presence_lookup_on_a_cluster_reads_every_shard(clickhouse_server):
    """On a cluster the backfill's presence check and verify read event_log and the dead-letter
    table of every shard (the cluster() table function), as ClickHouse parses it; on one server,
    the local tables."""
    event_id = str(uuid.uuid4())
    clustered = stored_counts_sql([event_id], cluster=CLUSTER)
    [[formatted]] = clickhouse_select(
        clickhouse_server.url, f"SELECT formatQuery({sql_string(clustered)})"
    )
    for table in ("event_log", "event_log_dead_letter"):
        assert f"cluster('{CLUSTER}', currentDatabase(), {table})" in formatted, formatted
    assert "cluster(" not in stored_counts_sql([event_id])
