"""The sql/ runner against the real PostgreSQL and the real ClickHouse engine."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from cdc_consumer import migrations
from cdc_consumer.clickhouse import ChdbTransport
from cdc_consumer.errors import ErrorKind, PipelineError


def _write(directory: Path, name: str, sql: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(sql)


@pytest.fixture
def scratch_schema(pg_conn):
    """A schema of its own, so this test's migration table does not meet the real one."""
    pg_conn.execute("DROP SCHEMA IF EXISTS migrations_test CASCADE")
    pg_conn.execute("CREATE SCHEMA migrations_test")
    pg_conn.execute("SET search_path TO migrations_test")
    yield pg_conn
    pg_conn.execute("DROP SCHEMA migrations_test CASCADE")


def test_postgres_applies_in_order_once(scratch_schema, tmp_path):
    """New files apply in name order; a second run applies nothing."""
    _write(tmp_path, "0002_b.sql", "INSERT INTO t VALUES (2);")
    _write(tmp_path, "0001_a.sql", "CREATE TABLE t (x int);\nINSERT INTO t VALUES (1);")
    assert migrations.migrate_postgres(scratch_schema, tmp_path) == ["0001_a.sql", "0002_b.sql"]
    assert migrations.migrate_postgres(scratch_schema, tmp_path) == []
    rows = scratch_schema.execute("SELECT x FROM t ORDER BY x").fetchall()
    assert rows == [(1,), (2,)]


def test_postgres_refuses_edited_migration(scratch_schema, tmp_path):
    """A file changed after it was applied stops the runner with a configuration error."""
    _write(tmp_path, "0001_a.sql", "CREATE TABLE t (x int);")
    migrations.migrate_postgres(scratch_schema, tmp_path)
    _write(tmp_path, "0001_a.sql", "CREATE TABLE t (x bigint);")
    with pytest.raises(PipelineError) as caught:
        migrations.migrate_postgres(scratch_schema, tmp_path)
    assert caught.value.kind is ErrorKind.CONFIGURATION
    assert "0001_a.sql" in str(caught.value)


def test_postgres_failed_file_leaves_no_record(scratch_schema, tmp_path):
    """A file that fails is rolled back whole and not recorded, so a fixed run applies it."""
    _write(tmp_path, "0001_a.sql", "CREATE TABLE t (x int);\nSELECT no_such_function();")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        migrations.migrate_postgres(scratch_schema, tmp_path)
    assert scratch_schema.execute("SELECT to_regclass('t')").fetchone() == (None,)


def test_split_statements_ignores_comments():
    """ClickHouse gets one statement per query; comment-only chunks are dropped."""
    sql = "-- header\nCREATE TABLE a (x UInt8) ENGINE = Memory; -- trailing\n\nSELECT 1;\n-- end\n"
    assert migrations.split_statements(sql) == [
        "-- header\nCREATE TABLE a (x UInt8) ENGINE = Memory",
        "SELECT 1",
    ]


def test_clickhouse_real_files_apply_once_and_refuse_edits(tmp_path):
    """The repository's ClickHouse migrations apply on the real engine, once; edits are refused."""
    transport = ChdbTransport(str(tmp_path / "ch"))
    try:
        applied = migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
        assert applied == [
            f.name for f in migrations.migration_files(migrations.SQL_ROOT / "clickhouse")
        ]
        assert migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse") == []
        columns = {
            row[0]
            for row in transport.select("SELECT name FROM system.columns WHERE table = 'event_log'")
        }
        assert {"event_id", "event_context", "event_context_raw", "source_lsn"} <= columns
        edited = tmp_path / "edited"
        for file in migrations.migration_files(migrations.SQL_ROOT / "clickhouse"):
            _write(edited, file.name, file.sql + "\n-- edited\n")
        with pytest.raises(PipelineError, match="edited after it was applied"):
            migrations.migrate_clickhouse(transport, edited)
    finally:
        transport.close()


def test_clickhouse_cluster_migration_sends_the_rewritten_ddl(tmp_path):
    """With a cluster the runner applies ON CLUSTER DDL: chDB, a single server, knows no cluster
    and refuses its very first statement, so nothing is created."""
    transport = ChdbTransport(str(tmp_path / "ch"))
    try:
        with pytest.raises(PipelineError, match=r"Code: 701\..*cluster 'events' not found"):
            migrations.migrate_clickhouse(
                transport, migrations.SQL_ROOT / "clickhouse", cluster="events"
            )
        assert transport.select("EXISTS TABLE cdc_schema_migrations") == [[0]]
    finally:
        transport.close()


def test_clickhouse_cluster_refuses_a_file_it_cannot_rewrite_before_running_any(tmp_path):
    """A file the cluster rewrite refuses stops the runner, naming the file, before any DDL runs."""
    _write(
        tmp_path / "sql", "0001_a.sql", "CREATE TABLE a (x UInt8) ENGINE = MergeTree ORDER BY x;"
    )
    _write(tmp_path / "sql", "0002_b.sql", "INSERT INTO a VALUES (1);")
    transport = ChdbTransport(str(tmp_path / "ch"))
    try:
        with pytest.raises(PipelineError) as caught:
            migrations.migrate_clickhouse(transport, tmp_path / "sql", cluster="events")
        assert caught.value.kind is ErrorKind.CONFIGURATION
        assert str(caught.value).startswith("0002_b.sql: cannot apply on a ClickHouse cluster")
        assert transport.select("EXISTS TABLE cdc_schema_migrations") == [[0]]
    finally:
        transport.close()


def test_clickhouse_refuses_a_cluster_on_a_database_migrated_for_one_server(tmp_path):
    """Setting CLICKHOUSE_CLUSTER on a database first migrated for one server is refused."""
    transport = ChdbTransport(str(tmp_path / "ch"))
    try:
        migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
        with pytest.raises(PipelineError) as caught:
            migrations.migrate_clickhouse(
                transport, migrations.SQL_ROOT / "clickhouse", cluster="events"
            )
        assert caught.value.kind is ErrorKind.CONFIGURATION
        assert "migrated for one server" in str(caught.value)
    finally:
        transport.close()
