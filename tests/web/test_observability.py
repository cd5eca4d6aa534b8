"""web.observability: every log line, Django's included, is rendered by structlog."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

from web.observability import configure_sentry, logging_dict_config


def _structlog_handler() -> logging.Handler:
    handlers = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter)
    ]
    assert len(handlers) == 1
    return handlers[0]


def _record(name: str, message: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, exc_info)


def test_django_loggers_propagate_to_the_structlog_handler():
    """django.setup() installed our config: Django's loggers have no handlers of their own."""
    _structlog_handler()
    for name in ("django", "django.server", "django.request"):
        logger = logging.getLogger(name)
        assert logger.handlers == []
        assert logger.propagate is True


def test_stdlib_record_renders_as_one_json_line():
    """A stdlib record (as Django logs it) becomes a JSON object with level, logger, time."""
    line = _structlog_handler().format(_record("django.request", "Not Found: /nope"))
    entry = orjson.loads(line)
    assert entry["event"] == "Not Found: /nope"
    assert entry["level"] == "warning"
    assert entry["logger"] == "django.request"
    assert entry["timestamp"].endswith("Z")


def test_exception_is_rendered_into_the_json_line():
    """A logged exception arrives as text in the JSON line, not as a Python object."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record("django.request", "failed", exc_info=sys.exc_info())
    entry = orjson.loads(_structlog_handler().format(record))
    assert "RuntimeError: boom" in entry["exception"]


def test_console_format_renders_readable_lines():
    """LOG_FORMAT=console gives structlog's console renderer, without warnings."""
    formatter_config = dict(logging_dict_config(level="info", log_format="console")["formatters"])
    options = dict(formatter_config["structlog"])
    factory = options.pop("()")
    formatter = factory(**options)
    line = formatter.format(_record("django.request", "hello console"))
    assert "hello console" in line
    assert not line.startswith("{")


def test_sentry_is_not_initialised_without_dsn():
    """Without SENTRY_DSN, configure_sentry leaves Sentry inactive."""
    import sentry_sdk

    configure_sentry(dsn=None, environment="test", traces_sample_rate=0.0)
    assert not sentry_sdk.get_client().is_active()
