"""CLICKHOUSE_FSYNC_AFTER_INSERT: `migrate` sets the delivery tables' fsync settings, both ways."""

from __future__ import annotations

import pytest

from cdc_consumer.provisioning import (
    FSYNC_SETTINGS,
    FSYNC_TABLES,
    fsync_statements,
    tables_off_fsync_target,
)
from tests.support.fix_clickhouse import clickhouse_command, clickhouse_select
from tests.support.fix_consumer import current_wal_lsn, publish_probes

pytestmark = pytest.mark.e2e


def _table_fsync(clickhouse_url: str) -> dict[str, tuple[bool, ...]]:
    """Per delivery table: whether its DDL sets each of the fsync settings to 1."""
    names = ", ".join(f"'{table}'" for table in FSYNC_TABLES)
    rows = clickhouse_select(
        clickhouse_url,
        "SELECT name, create_table_query FROM system.tables"
        f" WHERE database = currentDatabase() AND name IN ({names})",
    )
    return {
        str(name): tuple(f"{setting} = 1" in ddl for setting in FSYNC_SETTINGS)
        for name, ddl in rows
    }


@pytest.fixture
def fsync_reset(clickhouse_server):
    """The session's tables without the fsync settings after the test, whatever it left."""
    yield clickhouse_server
    for statement in fsync_statements(enabled=False):
        clickhouse_command(clickhouse_server.url, statement)


def test_migrate_sets_fsync_on_the_delivery_tables_and_resets_it(
    fsync_reset, make_consumer, pg_conn
):
    """On, both tables carry fsync_after_insert, fsync_part_directory and
    min_rows_to_fsync_after_merge, and inserts still land; a migrate with it off resets them to
    the server's default."""
    # GIVEN a consumer configured to have ClickHouse fsync every part
    url = fsync_reset.url
    consumer = make_consumer(url, CLICKHOUSE_FSYNC_AFTER_INSERT="true")
    # WHEN it migrates and ships events
    consumer.migrate()
    assert _table_fsync(url) == dict.fromkeys(FSYNC_TABLES, (True, True, True))
    consumer.start()
    ids = publish_probes(pg_conn, 10, "fsync-on")
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN the events landed under the setting
    quoted = ",".join(f"'{event_id}'" for event_id in ids)
    [[rows]] = clickhouse_select(url, f"SELECT count() FROM event_log WHERE event_id IN ({quoted})")
    assert int(rows) == 10
    # AND a migrate with the variable unset takes the settings off again
    off = make_consumer(url)
    off.migrate()
    assert _table_fsync(url) == dict.fromkeys(FSYNC_TABLES, (False, False, False))


def test_fsync_statements_on_a_cluster_alter_every_host():
    """On a cluster the ALTERs run ON CLUSTER, so no replica keeps the other setting."""
    statements = fsync_statements(enabled=True, cluster="events")
    assert statements == [
        f"ALTER TABLE {table} ON CLUSTER 'events' MODIFY SETTING fsync_after_insert = 1,"
        " fsync_part_directory = 1, min_rows_to_fsync_after_merge = 1"
        for table in FSYNC_TABLES
    ]
    assert fsync_statements(enabled=False) == [
        f"ALTER TABLE {table} RESET SETTING fsync_after_insert, fsync_part_directory,"
        " min_rows_to_fsync_after_merge"
        for table in FSYNC_TABLES
    ]


_PLAIN = (
    "CREATE TABLE default.event_log (`a` UInt8) ENGINE = MergeTree ORDER BY a"
    " SETTINGS index_granularity = 8192"
)
_SYNCED = (
    f"{_PLAIN}, fsync_after_insert = 1, fsync_part_directory = 1, min_rows_to_fsync_after_merge = 1"
)


@pytest.mark.parametrize(
    ("ddl", "enabled", "altered"),
    [
        (_PLAIN, False, False),  # the default deployment: no ALTER, so no ALTER grant needed
        (_PLAIN, True, True),
        (_SYNCED, True, False),
        (_SYNCED, False, True),
        (f"{_PLAIN}, fsync_after_insert = 1", True, True),  # partly set: completed
        (f"{_PLAIN}, fsync_part_directory = 0", False, True),  # set to 0 by hand: reset
    ],
)
def test_only_tables_off_target_are_altered(ddl, enabled, altered):
    """migrate alters a table only when its settings differ from CLICKHOUSE_FSYNC_AFTER_INSERT."""
    ddl_by_table = dict.fromkeys(FSYNC_TABLES, ddl)
    expected = list(FSYNC_TABLES) if altered else []
    assert tables_off_fsync_target(ddl_by_table, enabled=enabled) == expected
