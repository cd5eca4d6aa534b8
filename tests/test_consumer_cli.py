"""The consumer's command line, as an operator meets it: bad configuration, `status` and the
ClickHouse DDL printed for review."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cdc_consumer import migrations, provisioning


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_consumer", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _clean_env(**values: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "PYTHONPATH"}}
    return {**keep, **values}


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CLICKHOUSE_URL": "http://ch:8123/default"}, "DATABASE_URL is required"),
        ({"DATABASE_URL": "postgresql://x@y/z"}, "CLICKHOUSE_URL is required"),
        (
            {"DATABASE_URL": "postgresql://x@y/z", "CLICKHOUSE_URL": "ftp://ch/default"},
            "CLICKHOUSE_URL",
        ),
        (
            {"DATABASE_URL": "mysql://x@y/z", "CLICKHOUSE_URL": "http://ch:8123/default"},
            "DATABASE_URL",
        ),
        (
            {
                "DATABASE_URL": "postgresql://x@y/z",
                "CLICKHOUSE_URL": "http://ch:8123/default",
                "CDC_BATCH_MAX_ROWS": "lots",
            },
            "CDC_BATCH_MAX_ROWS",
        ),
        (
            {
                "DATABASE_URL": "postgresql://x@y/z",
                "CLICKHOUSE_URL": "http://ch:8123/default",
                "CDC_SLOT": "Robert'); DROP TABLE",
            },
            "CDC_SLOT",
        ),
        (
            {
                "DATABASE_URL": "postgresql://x@y/z",
                "CLICKHOUSE_URL": "http://ch:8123/default",
                "CDC_SOURCE": "orders-db",  # a '-' would let one source's fence match another's
            },
            "CDC_SOURCE",
        ),
        (
            {
                "DATABASE_URL": "postgresql://x@y/z",
                "CLICKHOUSE_URL": "http://ch:8123/default",
                "CDC_BATCH_MAX_BYTES": str(512 * 1024 * 1024),
            },
            "CDC_BATCH_MAX_BYTES",
        ),
    ],
)
def test_bad_configuration_refuses_to_start_with_one_line(env, needle):
    """A missing or malformed variable stops the process with one line naming it."""
    result = _run("run", env=_clean_env(**env))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("configuration error: ")
    assert needle in lines[0]
    assert "secret" not in result.stderr


def test_configuration_error_never_echoes_the_password():
    """The line naming a bad URL does not print the credentials in it."""
    env = _clean_env(
        DATABASE_URL="postgresql://u:hunter2@db/x", CLICKHOUSE_URL="ftp://u:hunter2@ch/"
    )
    result = _run("migrate", env=env)
    assert result.returncode != 0
    assert "CLICKHOUSE_URL" in result.stderr
    assert "hunter2" not in result.stderr


def test_status_reports_the_slot_as_json(make_consumer, clickhouse_server):
    """`status --json` prints the slot's state and lag for machines; exit 1 before migrate."""
    consumer = make_consumer(clickhouse_server.url)
    before = consumer.cli("status", "--json")
    assert before.returncode == 1
    assert json.loads(before.stdout)["exists"] is False
    consumer.migrate()
    after = consumer.cli("status", "--json")
    assert after.returncode == 0, after.stderr
    report = json.loads(after.stdout)
    assert report["slot"] == consumer.slot
    assert report["exists"] is True
    assert report["active"] is False
    assert report["wal_status"] == "reserved"
    assert report["lag_bytes"] >= 0


# Hosts that do not resolve: the printing command must connect to neither database.
_UNREACHABLE = {
    "DATABASE_URL": "postgresql://u@db.invalid/x",
    "CLICKHOUSE_URL": "http://u@ch.invalid:8123/default",
}


def test_print_clickhouse_ddl_shows_the_cluster_schema_and_connects_to_nothing():
    """`migrate --print-clickhouse-ddl` prints the DDL for CLICKHOUSE_CLUSTER and applies none."""
    env = _clean_env(**_UNREACHABLE, CLICKHOUSE_CLUSTER="events")
    result = _run("migrate", "--print-clickhouse-ddl", env=env)
    assert result.returncode == 0, result.stderr
    root = migrations.SQL_ROOT / "clickhouse"
    assert result.stdout == provisioning.clickhouse_ddl(cluster="events", fsync=False)
    assert result.stdout.startswith(migrations.clickhouse_ddl(root, cluster="events"))
    statements = migrations.split_statements(result.stdout)
    single = migrations.split_statements(provisioning.clickhouse_ddl(cluster=None, fsync=False))
    assert len(statements) == len(single)
    assert all("ON CLUSTER 'events'" in statement for statement in statements)


def test_print_clickhouse_ddl_without_a_cluster_is_the_single_server_schema():
    """Without CLICKHOUSE_CLUSTER it prints the files' statements as written, no ON CLUSTER."""
    result = _run("migrate", "--print-clickhouse-ddl", env=_clean_env(**_UNREACHABLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(migrations.clickhouse_ddl(migrations.SQL_ROOT / "clickhouse"))
    assert "ON CLUSTER" not in result.stdout


def test_print_clickhouse_ddl_ends_with_the_fsync_settings_migrate_sets():
    """The fsync settings are DDL too: with CLICKHOUSE_FSYNC_AFTER_INSERT on, the printout ends
    with the ALTERs that set them."""
    on = _run(
        "migrate",
        "--print-clickhouse-ddl",
        env=_clean_env(**_UNREACHABLE, CLICKHOUSE_FSYNC_AFTER_INSERT="true"),
    )
    assert on.returncode == 0, on.stderr
    alters = "\n\n".join(f"{s};" for s in provisioning.fsync_statements(enabled=True))
    assert on.stdout.endswith(f"-- CLICKHOUSE_FSYNC_AFTER_INSERT=true\n{alters}\n")


def test_print_clickhouse_ddl_belongs_to_migrate():
    """The flag with another command is a usage error, not silently ignored."""
    result = _run("status", "--print-clickhouse-ddl", env=_clean_env(**_UNREACHABLE))
    assert result.returncode == 2
    assert "--print-clickhouse-ddl goes with migrate" in result.stderr


def test_embedded_engine_missing_from_the_installation_is_a_configuration_error(tmp_path):
    """CLICKHOUSE_URL=chdb:// where chDB is not installed (the production image): exit 2 with a
    hint, not a traceback. chDB's absence is what Python sees for a package that is not there."""
    absent = (
        "import sys; sys.modules['chdb'] = None; sys.modules['chdb.session'] = None;"
        " from cdc_consumer.__main__ import main; sys.exit(main(['migrate']))"
    )
    env = _clean_env(
        DATABASE_URL="postgresql://x@127.0.0.1:1/unused", CLICKHOUSE_URL=f"chdb://{tmp_path}/ch"
    )
    result = subprocess.run(
        [sys.executable, "-c", absent],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "embedded engine" in result.stderr
    assert "uv sync --group embedded" in result.stderr
