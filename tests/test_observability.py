"""cdc_consumer.observability: one logging and Sentry configuration for every process; the
consumer's batch lines carry the batch's context and never an event's context or a secret."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import uuid
from typing import Any

import orjson
import pytest
import structlog
from pydantic import SecretStr

from cdc_consumer.observability import (
    REDACTED,
    SHARED_PROCESSORS,
    ObservabilitySettings,
    configure_logging,
    logging_dict_config,
    sentry_options,
)
from cdc_consumer.pgoutput import str_to_lsn
from tests.support.fix_consumer import current_wal_lsn, publish_probes


def _rendered(emit) -> Any:
    """The JSON line `emit` writes through the configured root handler's formatter."""
    [configured] = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h.formatter, structlog.stdlib.ProcessorFormatter)
    ]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(configured.formatter)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        emit()
    finally:
        root.removeHandler(handler)
    return orjson.loads(stream.getvalue().splitlines()[-1])


def test_web_and_consumer_share_one_configuration(settings):
    """Django's LOGGING_CONFIG is the consumer's configure_logging, and web's formatter runs
    the same processors: a line reads the same from either process."""
    assert f"{configure_logging.__module__}.configure_logging" == settings.LOGGING_CONFIG
    web_chain = settings.LOGGING["formatters"]["structlog"]["foreign_pre_chain"]
    consumer_chain = logging_dict_config(level="info", log_format="json")["formatters"][
        "structlog"
    ]["foreign_pre_chain"]
    assert web_chain is consumer_chain is SHARED_PROCESSORS


def test_event_context_password_and_dsn_are_redacted():
    """Whoever logs them, the values of event_context, password and dsn keys never reach the
    rendered line; the key stays, redacted, so the line shows something tried."""
    secrets = {
        "event_context": {"email": "ada@example.com"},
        "password": "hunter2-xyz",
        "dsn": "https://key@sentry.example/1",
    }

    line = _rendered(
        lambda: structlog.get_logger("tests.redact").warning("probe", slot="s", **secrets)
    )
    assert line["event"] == "probe"
    text = orjson.dumps(line).decode()
    for value in ("ada@example.com", "hunter2-xyz", "sentry.example"):
        assert value not in text
    assert line["password"] == REDACTED
    assert line["slot"] == "s"


def test_empty_sentry_dsn_is_off_and_the_sample_rate_is_bounded(monkeypatch):
    """SENTRY_DSN= (as .env.example has it) means no Sentry; a sample rate outside 0..1 is
    refused, by the settings and by the options every process initialises Sentry with."""
    monkeypatch.setenv("SENTRY_DSN", "")
    monkeypatch.setenv("SENTRY_TRACES_SAMPLE_RATE", "0.25")
    observed = ObservabilitySettings()
    assert observed.sentry_dsn is None
    assert observed.sentry_traces_sample_rate == 0.25
    monkeypatch.setenv("SENTRY_TRACES_SAMPLE_RATE", "1.5")
    with pytest.raises(ValueError, match="sentry_traces_sample_rate"):
        ObservabilitySettings()
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        sentry_options(
            dsn=SecretStr("https://k@s.invalid/1"), environment="t", traces_sample_rate=2
        )


@pytest.mark.e2e
def test_batch_lines_carry_slot_batch_and_positions(make_consumer, clickhouse_server, pg_conn):
    """The consumer's JSON lines for each batch written carry slot, batch_id, lsn_from, lsn_to
    and rows; consecutive batches chain their positions; no line holds an event's context or
    the ClickHouse URL."""
    # GIVEN a streaming consumer
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    environment = f"obs-{uuid.uuid4().hex[:8]}"
    marker = f"context-{uuid.uuid4().hex}"
    # WHEN two transactions ship one after the other, the first with a recognisable context
    pg_conn.execute(
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version) SELECT gen_random_uuid(), 'probe', clock_timestamp(),"
        " %s, jsonb_build_object('secret', %s::text, 'n', g), 1 FROM generate_series(1, 2) g",
        (environment, marker),
    )
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    publish_probes(pg_conn, 3, environment)
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN each written batch says which it was and where in the WAL it lies
    written = [e for e in consumer.log_events() if e.get("event") == "batch written"]
    assert [e["rows"] for e in written] == [2, 3]
    first, second = written
    for entry in written:
        assert entry["slot"] == consumer.slot
        assert entry["logger"] == "cdc_consumer.delivery"
        assert str_to_lsn(entry["lsn_to"]) <= consumer.confirmed_lsn()
    assert first["batch_id"] != second["batch_id"]
    assert first["batch_id"].split("-")[0] == second["batch_id"].split("-")[0]  # one run
    assert str_to_lsn(second["lsn_from"]) >= str_to_lsn(first["lsn_to"])
    assert str_to_lsn(second["lsn_to"]) > str_to_lsn(second["lsn_from"])
    text = consumer.log_text()
    assert marker not in text
    assert clickhouse_server.url not in text


@pytest.mark.e2e
def test_a_rejected_row_s_context_stays_out_of_the_log(make_consumer, clickhouse_server, pg_conn):
    """ClickHouse quotes the row it refuses; the consumer's lines about it (batch rejected,
    event dead-lettered) keep the error's head, never the quoted context."""
    # GIVEN a streaming consumer
    consumer = make_consumer(clickhouse_server.url)
    consumer.migrate()
    consumer.start()
    marker = f"m{uuid.uuid4().hex}"
    # WHEN a row ClickHouse's JSON type refuses ("Duplicate path found ...: <key>") ships
    pg_conn.execute(
        "INSERT INTO event_outbox (event_id, event_type, event_date_time, environment,"
        " event_context, metadata_version) VALUES (gen_random_uuid(), 'probe', now(), 'obs',"
        " jsonb_build_object(%s::text || '.b', 1, %s::text, jsonb_build_object('b', 2)), 1)",
        (marker, marker),
    )
    consumer.wait_confirmed(current_wal_lsn(pg_conn))
    assert consumer.stop() == 0
    # THEN it is dead-lettered and logged with the error's head, without the context's keys
    [dead] = [e for e in consumer.log_events() if e.get("event") == "event dead-lettered"]
    assert "DB::Exception: " in dead["error"]
    assert dead["error"].endswith(REDACTED)
    assert marker not in consumer.log_text()


def test_consumer_sentry_loads_only_the_integrations_it_lists():
    """Sentry in the consumer does not enable (and import) integrations for libraries it finds
    installed: Django's, Celery's and Redis's cost its process ~55 MB for nothing it runs. (The
    SDK's spotlight module still imports part of Django if it is installed, ~10 MB.)"""
    script = (
        "import sys\n"
        "from pydantic import SecretStr\n"
        "import sentry_sdk\n"
        "from cdc_consumer.observability import configure_sentry\n"
        "configure_sentry(dsn=SecretStr('http://key@127.0.0.1:9/1'), environment='test',"
        " traces_sample_rate=0.0)\n"
        "loaded = [m for m in ('celery', 'kombu', 'redis') if m in sys.modules]\n"
        "print(orjson.dumps([loaded, sorted(sentry_sdk.get_client().integrations)]).decode())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", f"import orjson\n{script}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded, integrations = orjson.loads(result.stdout)
    assert loaded == []
    assert not {"django", "celery", "redis", "clickhouse_driver"} & set(integrations)
