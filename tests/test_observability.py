"""cdc_consumer.observability: one logging and Sentry configuration for every process; no line
carries an event's context or a secret."""

from __future__ import annotations

import io
import logging
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
