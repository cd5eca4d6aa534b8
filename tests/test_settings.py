"""cdc_consumer.settings: variables with rules of their own, read once from the environment."""

from __future__ import annotations

import pytest

from cdc_consumer.settings import load_settings

_REQUIRED = {
    "DATABASE_URL": "postgresql://consumer@db.internal:5432/app",
    "CLICKHOUSE_URL": "http://consumer@ch.internal:8123/events",
}


@pytest.fixture
def env(monkeypatch):
    """The required variables and no cluster ones; tests set what they need."""
    for name in (
        "CLICKHOUSE_CLUSTER",
        "CLICKHOUSE_INSERT_QUORUM",
        "CLICKHOUSE_FSYNC_AFTER_INSERT",
        "CDC_IGNORED_TABLES",
        "CDC_SLOT_FAILOVER",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in _REQUIRED.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def _refusal(env: pytest.MonkeyPatch, **variables: str) -> str:
    """The line `load_settings` exits with once `variables` are set."""
    for name, value in variables.items():
        env.setenv(name, value)
    with pytest.raises(SystemExit) as caught:
        load_settings()
    return str(caught.value.code)


def test_one_server_by_default(env):
    """Unset, the consumer targets one server: no cluster and no quorum."""
    settings = load_settings()
    assert (settings.clickhouse_cluster, settings.clickhouse_insert_quorum) == (None, 0)


def test_empty_variables_mean_unset(env):
    """Empty cluster and quorum variables, as .env files write them, mean unset."""
    env.setenv("CLICKHOUSE_CLUSTER", "")
    env.setenv("CLICKHOUSE_INSERT_QUORUM", "")
    settings = load_settings()
    assert (settings.clickhouse_cluster, settings.clickhouse_insert_quorum) == (None, 0)


@pytest.mark.parametrize(
    ("cluster", "quorum", "expected"),
    [
        ("events", "0", ("events", 0)),
        ("events-eu.2", "2", ("events-eu.2", 2)),
        ("{cluster}", "3", ("{cluster}", 3)),
        ("events", "auto", ("events", "auto")),
    ],
)
def test_cluster_and_quorum_are_read(env, cluster, quorum, expected):
    """A cluster name or macro, and a quorum of 0, 2 or more, or auto, are taken as given."""
    env.setenv("CLICKHOUSE_CLUSTER", cluster)
    env.setenv("CLICKHOUSE_INSERT_QUORUM", quorum)
    settings = load_settings()
    assert (settings.clickhouse_cluster, settings.clickhouse_insert_quorum) == expected


@pytest.mark.parametrize("cluster", ["it's", "two words", "{a}{b}", "-leading"])
def test_cluster_name_that_is_not_a_name_is_refused(env, cluster):
    """A cluster name that could break out of its SQL literal stops the process, naming it."""
    assert _refusal(env, CLICKHOUSE_CLUSTER=cluster) == (
        "configuration error: CLICKHOUSE_CLUSTER must be a cluster name (letters, digits, _ . -)"
        " or a macro like {cluster}"
    )


@pytest.mark.parametrize("quorum", ["1", "-2", "many", "AUTO", "2.5"])
def test_quorum_that_clickhouse_would_not_enforce_is_refused(env, quorum):
    """A quorum of 1 (ClickHouse ignores it), a negative or a word other than auto is refused."""
    assert _refusal(env, CLICKHOUSE_CLUSTER="events", CLICKHOUSE_INSERT_QUORUM=quorum) == (
        "configuration error: CLICKHOUSE_INSERT_QUORUM must be 0 (off), 2 or more, or auto"
        " (ClickHouse ignores a quorum of 1)"
    )


def test_quorum_without_a_cluster_is_refused(env):
    """A quorum on tables that are not replicated would be ignored, so it needs a cluster."""
    assert _refusal(env, CLICKHOUSE_INSERT_QUORUM="2") == (
        "configuration error: CLICKHOUSE_INSERT_QUORUM needs CLICKHOUSE_CLUSTER: only replicated"
        " tables have a quorum"
    )


def test_cluster_with_the_embedded_engine_is_refused(env):
    """chdb:// is one engine in one process, never a cluster."""
    refusal = _refusal(env, CLICKHOUSE_URL="chdb:///var/lib/event_log", CLICKHOUSE_CLUSTER="events")
    assert refusal == (
        "configuration error: CLICKHOUSE_CLUSTER needs an http(s) CLICKHOUSE_URL: the embedded"
        " chdb:// engine is one server"
    )


def test_bad_cluster_is_reported_once_even_with_a_quorum(env):
    """A malformed cluster beside a quorum gives one line, for the cluster, not two."""
    refusal = _refusal(env, CLICKHOUSE_CLUSTER="it's", CLICKHOUSE_INSERT_QUORUM="2")
    assert "\n" not in refusal
    assert refusal.startswith("configuration error: CLICKHOUSE_CLUSTER ")


def test_ignored_tables_are_read_as_schema_and_table(env):
    """CDC_IGNORED_TABLES: comma-separated schema.table names, spaces allowed around commas."""
    env.setenv("CDC_IGNORED_TABLES", "public.audit_trail, billing.invoice_lines")
    assert load_settings().ignored_tables == {
        ("public", "audit_trail"),
        ("billing", "invoice_lines"),
    }


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("audit_trail", "'audit_trail' is not a lowercase schema.table name"),
        ("public.event_outbox", "public.event_outbox is the outbox"),
    ],
)
def test_ignored_table_that_is_unqualified_or_the_outbox_is_refused(env, value, reason):
    """A name without its schema, or the outbox itself (its rows would vanish), is refused."""
    message = _refusal(env, CDC_IGNORED_TABLES=value)
    assert "CDC_IGNORED_TABLES" in message
    assert reason in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("", False), ("false", False), ("true", True), ("1", True)],
)
def test_fsync_after_insert_is_off_unless_asked_for(env, value, expected):
    """Unset or empty, ClickHouse is not asked to fsync parts; true or 1 asks for it."""
    if value is not None:
        env.setenv("CLICKHOUSE_FSYNC_AFTER_INSERT", value)
    assert load_settings().clickhouse_fsync_after_insert is expected


def test_fsync_after_insert_that_is_not_a_boolean_is_refused(env):
    """A value that is not a boolean stops the process with one line naming the variable."""
    refusal = _refusal(env, CLICKHOUSE_FSYNC_AFTER_INSERT="sometimes")
    assert "\n" not in refusal
    assert refusal.startswith("configuration error: CLICKHOUSE_FSYNC_AFTER_INSERT ")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("", False), ("false", False), ("0", False), ("true", True), ("on", True)],
)
def test_slot_failover_is_a_boolean_off_by_default(env, value, expected):
    """CDC_SLOT_FAILOVER is off unless set; empty (as .env files write unset) is off."""
    if value is not None:
        env.setenv("CDC_SLOT_FAILOVER", value)
    assert load_settings().cdc_slot_failover is expected


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_slot_failover_that_is_not_a_boolean_is_refused(env, value):
    """A value that is not a boolean stops the process with one line naming the variable."""
    assert _refusal(env, CDC_SLOT_FAILOVER=value) == (
        "configuration error: CDC_SLOT_FAILOVER must be true or false"
    )


def test_metrics_are_off_unless_a_port_is_set(env):
    """CDC_METRICS_PORT unset or empty serves no metrics; a port is taken as a number."""
    env.delenv("CDC_METRICS_PORT", raising=False)
    assert load_settings().cdc_metrics_port is None
    env.setenv("CDC_METRICS_PORT", "")
    assert load_settings().cdc_metrics_port is None
    env.setenv("CDC_METRICS_PORT", " 9187 ")
    assert load_settings().cdc_metrics_port == 9187


@pytest.mark.parametrize("port", ["0", "65536", "-1", "http", "91.5"])
def test_metrics_port_out_of_range_is_named(env, port):
    """A CDC_METRICS_PORT that is not 1..65535 stops the process with one line naming it."""
    assert _refusal(env, CDC_METRICS_PORT=port) == (
        "configuration error: CDC_METRICS_PORT must be a TCP port, 1 to 65535"
        " (unset or empty: no metrics endpoint)"
    )
