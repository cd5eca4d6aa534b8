"""Least-privilege roles (cdc_consumer/roles.py, deploy/postgres/roles.sql): the pipeline runs end
to end with each process on its own role, every role is refused what it must not do, and the
commands that use the schema refuse an unmigrated one instead of migrating it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from demo.postgres import bin_dir
from tests.support.fix_clickhouse import clickhouse_select
from tests.support.fix_consumer import Consumer, create_partitioned_outbox, current_wal_lsn

pytestmark = [pytest.mark.e2e]

ROLES_SQL = Path(__file__).resolve().parents[1] / "deploy" / "postgres" / "roles.sql"
LOGINS = {
    "migrator": "pipeline_migrator",
    "web": "pipeline_web",
    "worker": "pipeline_worker",
    "consumer": "pipeline_consumer",
}


def _as(url: str, role: str) -> str:
    parts = urlsplit(url)
    netloc = f"{role}:{role}-secret@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc).geturl()


@pytest.fixture
def roles_database(make_database: Callable[..., str]) -> dict[str, str]:
    """A new database set up by deploy/postgres/roles.sql, as a DBA would: each login's URL."""
    url = make_database()
    passwords = [f"-v{kind}_password={role}-secret" for kind, role in LOGINS.items()]
    psql = [str(bin_dir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    subprocess.run(
        [*psql, *passwords, "-f", str(ROLES_SQL), url],
        check=True,
        capture_output=True,
    )
    return {kind: _as(url, role) for kind, role in LOGINS.items()}


def _refused(url: str, statement: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


_PUBLISH = textwrap.dedent(
    """
    import django
    django.setup()
    from web.accounts.services import user_create
    for n in range({count}):
        user_create(email=f"{tag}-{{n}}@example.test", first_name="Least", last_name="Privilege")
    """
)


def _django(database_url: str, script: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in a Django process of the web app connecting as `database_url`."""
    env = {
        **extra,
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": "web.settings",
        "DJANGO_SECRET_KEY": "test-only-secret-key-not-for-production",
        "ENVIRONMENT": "test",
        "LOG_LEVEL": "warning",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )


def _manage(database_url: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return _django(
        database_url,
        "from django.core.management import execute_from_command_line;"
        f" execute_from_command_line(['manage.py', *{list(args)!r}])",
        **extra,
    )


def _migrate_as_the_migrator(urls: dict[str, str], consumer: Consumer) -> None:
    """As compose's migrate job: Django's tables, then sql/, the publication, the slot and the
    grants."""
    migrated = _manage(urls["migrator"], "migrate", "--noinput")
    assert migrated.returncode == 0, migrated.stderr
    consumer.migrate()


def test_the_pipeline_runs_end_to_end_with_each_process_on_its_own_role(
    roles_database: dict[str, str], make_consumer: Callable[..., Consumer], clickhouse_server: Any
) -> None:
    # GIVEN the schema migrated by the migrator
    consumer = make_consumer(clickhouse_server.url, database_url=roles_database["migrator"])
    _migrate_as_the_migrator(roles_database, consumer)
    # WHEN the web app publishes as pipeline_web and the consumer streams as pipeline_consumer
    consumer.point_at(roles_database["consumer"])
    consumer.start()
    tag = f"roles-{uuid.uuid4().hex[:8]}"
    published = _django(roles_database["web"], _PUBLISH.format(count=5, tag=tag))
    assert published.returncode == 0, published.stderr
    with psycopg.connect(roles_database["migrator"], autocommit=True) as conn:
        consumer.wait_confirmed(current_wal_lsn(conn))
    # THEN every event arrives once (no FINAL: a duplicate would show)
    rows = clickhouse_select(
        clickhouse_server.url,
        "SELECT count(), uniqExact(event_id) FROM event_log"
        f" WHERE event_context.email::String LIKE '{tag}-%'",
    )
    assert rows == [[5, 5]]
    assert consumer.stop() == 0
    # AND the worker's role prunes and checks the slot (the Celery tasks' commands)
    for command in ("outbox_prune", "outbox_slot_check"):
        done = _manage(roles_database["worker"], command, CDC_SLOT=consumer.slot)
        assert done.returncode == 0, done.stderr


def test_each_role_is_refused_what_it_must_not_do(
    roles_database: dict[str, str], make_consumer: Callable[..., Consumer], clickhouse_server: Any
) -> None:
    consumer = make_consumer(clickhouse_server.url, database_url=roles_database["migrator"])
    _migrate_as_the_migrator(roles_database, consumer)
    event = (
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version) VALUES"
        " (gen_random_uuid(), 'probe', now(), 'test', '{}', 1)"
    )
    progress = "UPDATE cdc_progress SET updated_at = now()"
    refused = {
        "web": [
            "SELECT * FROM event_outbox",
            "DELETE FROM event_outbox",
            "UPDATE event_outbox SET environment = 'x'",
            progress,
            "CREATE TABLE web_table (a int)",
            "SELECT * FROM cdc_schema_migrations",
        ],
        "worker": [event, "UPDATE event_outbox SET environment = 'x'", progress],
        "consumer": [
            event,
            "DELETE FROM event_outbox",
            "TRUNCATE event_outbox",
            "DELETE FROM cdc_progress",
            "CREATE TABLE consumer_table (a int)",
            "DROP TABLE cdc_progress",
            "SELECT * FROM auth_user",
        ],
    }
    allowed = {
        "web": [event, "SELECT count(*) FROM cdc_progress", "SELECT count(*) FROM auth_user"],
        "worker": ["SELECT count(*) FROM event_outbox", "DELETE FROM event_outbox WHERE false"],
        "consumer": ["SELECT count(*) FROM event_outbox", progress],
    }
    for kind, statements in refused.items():
        for statement in statements:
            assert _refused(roles_database[kind], statement), f"{kind} may: {statement}"
    for kind, statements in allowed.items():
        for statement in statements:
            assert not _refused(roles_database[kind], statement), f"{kind} may not: {statement}"
    # The consumer may open a replication connection; the web app and the worker may not.
    psycopg.connect(roles_database["consumer"], replication="database").close()
    for kind in ("web", "worker"):
        with pytest.raises(psycopg.OperationalError, match="REPLICATION attribute"):
            psycopg.connect(roles_database[kind], replication="database").close()


def test_run_refuses_an_unmigrated_schema_instead_of_migrating_it(
    roles_database: dict[str, str],
    make_consumer: Callable[..., Consumer],
    clickhouse_server: Any,
    pg_conn: psycopg.Connection[Any],
) -> None:
    """Before: `run` migrated, so it needed the migrator's privileges (and had them)."""
    consumer = make_consumer(clickhouse_server.url, database_url=roles_database["consumer"])
    result = consumer.cli("run")
    assert result.returncode == 2
    assert "the schema is not migrated" in result.stderr
    assert "python -m cdc_consumer migrate" in result.stderr
    with psycopg.connect(roles_database["migrator"], autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('event_outbox')").fetchone() == (None,)
        slots = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (consumer.slot,)
        ).fetchone()
    assert slots == (0,)


def test_the_web_role_reaches_a_partitioned_outbox_only_to_insert(
    roles_database: dict[str, str], make_consumer: Callable[..., Consumer], clickhouse_server: Any
) -> None:
    """Its partitions are outbox rows too: before, the web role got DML on them as on any
    table that is not ours."""
    with psycopg.connect(roles_database["migrator"], autocommit=True) as conn:
        create_partitioned_outbox(
            conn, {"event_outbox_now": "FOR VALUES FROM (MINVALUE) TO (MAXVALUE)"}
        )
    consumer = make_consumer(clickhouse_server.url, database_url=roles_database["migrator"])
    _migrate_as_the_migrator(roles_database, consumer)
    web = roles_database["web"]
    assert not _refused(
        web,
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version) VALUES"
        " (gen_random_uuid(), 'probe', now(), 'test', '{}', 1)",
    )
    for statement in (
        "SELECT * FROM event_outbox_now",
        "DELETE FROM event_outbox_now",
        "UPDATE event_outbox_now SET environment = 'x'",
    ):
        assert _refused(web, statement), f"web may: {statement}"


def test_run_refuses_a_clickhouse_migrated_for_another_topology(
    make_consumer: Callable[..., Consumer], clickhouse_server: Any
) -> None:
    """Before, `run` migrated, which refused this; checking instead, it must refuse it too: its
    fence would reach one host of what it takes for a cluster, or miss the others'."""
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    result = consumer.cli("run", env={**consumer.env, "CLICKHOUSE_CLUSTER": "events"}, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "migrated for one server" in result.stderr
