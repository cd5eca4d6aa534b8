"""ClickHouse's least-privilege roles (cdc_consumer/roles.py, deploy/clickhouse/users.sh): the
consumer delivers as a user holding only `outbox_writer`, which may not change the schema, and
an analyst holding `outbox_analyst` reads and writes nothing else.

The chDB engine behind the embedded test server has no writable access storage (it refuses
CREATE ROLE), so the grants are enforced only where a real server runs: CI's service container
or testcontainers. Here they are parsed by the engine, and `migrate` is shown to carry on with a
warning where it may not create them."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from cdc_consumer.errors import PipelineError
from cdc_consumer.roles import ANALYST_ROLE, WRITER_ROLE, clickhouse_role_statements
from tests.support.fix_clickhouse import ClickHouseServer, clickhouse_command, clickhouse_select
from tests.support.fix_consumer import Consumer, current_wal_lsn, publish_probes

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("cluster", [None, "{cluster}"])
def test_the_role_statements_are_valid_clickhouse(
    clickhouse_server: ClickHouseServer, cluster: str | None
) -> None:
    for statement in clickhouse_role_statements("default", cluster=cluster):
        assert clickhouse_select(clickhouse_server.url, f"EXPLAIN AST {statement}"), statement


def test_migrate_carries_on_where_the_engine_keeps_no_roles(
    make_consumer: Callable[..., Consumer], clickhouse_server: ClickHouseServer
) -> None:
    if not clickhouse_server.embedded:
        pytest.skip("a real server keeps roles")
    consumer = make_consumer(clickhouse_server.url)
    result = consumer.cli("migrate")
    assert result.returncode == 0, result.stderr
    assert '"clickhouse roles skipped"' in result.stderr
    assert '"level": "warning"' not in result.stderr


@pytest.fixture
def role_users(clickhouse_server: ClickHouseServer) -> Any:
    """Users holding only the writer's or the analyst's role; dropped afterwards."""
    if clickhouse_server.embedded:
        pytest.skip("the chDB engine enforces no grants: a real ClickHouse server is needed")
    made: list[str] = []

    def make(role: str) -> ClickHouseServer:
        name = f"t_{role}_{uuid.uuid4().hex[:8]}"
        password = uuid.uuid4().hex
        for statement in (
            f"CREATE USER {name} IDENTIFIED WITH sha256_password BY '{password}'",
            f"GRANT {role} TO {name}",
            f"SET DEFAULT ROLE ALL TO {name}",
        ):
            clickhouse_command(clickhouse_server.url, statement)
        made.append(name)
        return dataclasses.replace(clickhouse_server, username=name, password=password)

    yield make
    for name in made:
        clickhouse_command(clickhouse_server.url, f"DROP USER IF EXISTS {name}")


def _refused(url: str, statement: str) -> bool:
    try:
        clickhouse_command(url, statement)
    except PipelineError as exc:
        return "ACCESS_DENIED" in str(exc) or "Not enough privileges" in str(exc)
    return False


def test_the_consumer_delivers_as_the_writer_which_may_not_change_the_schema(
    make_consumer: Callable[..., Consumer],
    clickhouse_server: ClickHouseServer,
    role_users: Any,
    pg_conn: psycopg.Connection[Any],
) -> None:
    # GIVEN the schema migrated by the admin, and a writer and an analyst
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    writer, analyst = role_users(WRITER_ROLE), role_users(ANALYST_ROLE)
    # WHEN the consumer runs as the writer
    consumer.env["CLICKHOUSE_URL"] = writer.url
    consumer.start()
    tag = f"writer-{uuid.uuid4().hex[:8]}"
    publish_probes(pg_conn, 5, tag)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN every event arrived once, which the analyst can read
    rows = clickhouse_select(
        analyst.url,
        f"SELECT count(), uniqExact(event_id) FROM event_log WHERE environment = '{tag}'",
    )
    assert rows == [[5, 5]]
    # AND neither may change the schema or what is stored, nor read beyond its tables
    for url in (writer.url, analyst.url):
        assert _refused(url, "DROP TABLE event_log")
        assert _refused(url, "ALTER TABLE event_log DELETE WHERE 1")
        assert _refused(url, "CREATE TABLE t_roles (a UInt8) ENGINE = Memory")
        assert _refused(url, "TRUNCATE TABLE event_log_dead_letter")
    assert _refused(analyst.url, f"INSERT INTO event_log (environment) VALUES ('{tag}')")
    assert _refused(analyst.url, "SELECT count() FROM cdc_runs")


def test_the_writer_may_read_every_shard_on_a_cluster() -> None:
    """On a cluster the writer holds REMOTE, which the cluster() reads of the presence check
    and verify need; on one server it holds neither CLUSTER nor REMOTE."""
    on_cluster = " ".join(clickhouse_role_statements("default", cluster="events"))
    alone = " ".join(clickhouse_role_statements("default"))
    assert f"CLUSTER, REMOTE ON *.* TO {WRITER_ROLE}" in on_cluster
    assert "REMOTE" not in alone
