"""web.observability: every log line, Django's included, is rendered by structlog; a request's
and a task's lines carry their context; Sentry reports crons and never an event's context."""

from __future__ import annotations

import logging
import math
import sys
import uuid
from typing import Any

import orjson
import pytest
import sentry_sdk
import structlog
from celery import Celery
from celery.beat import Scheduler, Service
from celery.signals import beat_init
from pydantic import SecretStr
from sentry_sdk.integrations.celery import CeleryIntegration

from cdc_consumer.observability import configure_sentry, sentry_options
from tests.support.fix_consumer import wait_for
from tests.web.conftest import CapturingTransport
from web.accounts.services import user_create
from web.observability import logging_dict_config, sentry_integrations
from web.outbox.errors import EventPublishError
from web.outbox.events import Event
from web.outbox.publish import publish


@pytest.fixture
def rendered(caplog):
    """The JSON lines written while the test runs (every thread's), rendered by the configured
    formatter. Not capture_logs: a logger cached before a test reconfigured structlog (the
    consumer CLI's in-process tests) keeps the chain it was built with."""
    caplog.set_level(logging.INFO)
    handler = _structlog_handler()

    def lines() -> list[dict[str, Any]]:
        return [orjson.loads(handler.format(record)) for record in caplog.records]

    return lines


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

    assert configure_sentry(dsn=None, environment="test", traces_sample_rate=0.0) is False
    assert not sentry_sdk.get_client().is_active()


class ObservabilityProbe(Event):
    """An event whose context the tests look for in every Sentry payload."""

    note: str
    ratio: float


@pytest.mark.django_db
def test_a_request_s_lines_share_one_request_id(client, rendered, caplog):
    """Every line of one request (middleware, service) carries the same request_id, and the
    next request gets another."""
    body = {"email": f"{uuid.uuid4().hex[:8]}@example.com", "first_name": "A", "last_name": "L"}
    assert client.post("/api/users/", body, content_type="application/json").status_code == 201
    first = rendered()
    caplog.clear()
    client.get("/health/")
    second = rendered()
    events = [entry["event"] for entry in first]
    assert events[0] == "request_started"
    assert "user created" in events
    assert events[-1] == "request_finished"
    ids = {entry.get("request_id") for entry in first}
    assert len(ids) == 1
    assert None not in ids
    assert {entry.get("request_id") for entry in second}.isdisjoint(ids)
    assert all("ip" not in entry for entry in first)  # personal data, not logged


@pytest.mark.django_db
def test_login_binds_the_user_id_for_the_rest_of_the_request(
    client, fast_passwords, rendered, caplog
):
    """Once login succeeds, the request's remaining lines carry the user's id."""
    user = user_create(
        email=f"{uuid.uuid4().hex[:8]}@example.com", first_name="A", last_name="L", password="pw"
    )
    body = {"username": user.email, "password": "pw"}
    caplog.clear()
    assert client.post("/api/login/", body, content_type="application/json").status_code == 200
    entries = rendered()
    [finished] = [entry for entry in entries if entry["event"] == "request_finished"]
    assert finished["user_id"] == user.pk
    assert "password" not in str(entries)


@pytest.mark.django_db(transaction=True)
def test_task_lines_carry_the_request_id_that_enqueued_it(celery_worker, settings, rendered):
    """A task sent while a request's context is bound runs on the real worker with that
    request_id, its own task_id and its task_name on every line it writes."""
    from web.outbox.tasks import outbox_slot_check_task

    settings.CDC_SLOT = "no_such_slot"  # critical: a line at once, no consumer needed
    request_id = f"req-{uuid.uuid4().hex}"
    # What RequestMiddleware binds for a request that sends a task.
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        result = outbox_slot_check_task.delay()
    assert result.get(timeout=60)["severity"] == "critical"

    def finished() -> list[dict[str, Any]] | None:
        lines = rendered()
        return lines if any(e["event"] == "task_succeeded" for e in lines) else None

    entries = wait_for(finished, what="task_succeeded")
    in_task = [e for e in entries if e.get("task_id") == result.id]
    assert {e["event"] for e in in_task} >= {
        "task_started",
        "replication slot critical",
        "task_succeeded",
    }
    for entry in in_task:
        assert entry["request_id"] == request_id
        assert entry["task_name"] == "web.outbox.tasks.outbox_slot_check_task"


@pytest.fixture
def sentry_transport(sentry_restored):
    """Sentry set up as every process sets it up, with a transport that keeps envelopes."""
    transport = CapturingTransport()
    options = sentry_options(
        dsn=SecretStr("https://public@sentry.invalid/1"),
        environment="test",
        traces_sample_rate=1.0,
        integrations=sentry_integrations(),
    )
    sentry_sdk.init(**options, transport=transport)
    return transport


def _start_worker(celery_app: Celery) -> None:
    # What `celery worker` does first: building the worker sends worker_init (it is not run).
    celery_app.WorkController(pool_cls="solo", concurrency=1)


def _start_beat(celery_app: Celery) -> None:
    # What `celery beat` sends as its service starts, before its first tick.
    beat_init.send(sender=Service(app=celery_app))


@pytest.mark.parametrize("start", [_start_worker, _start_beat], ids=["worker", "beat"])
def test_worker_and_beat_start_sentry_with_beat_entries_as_crons(
    celery_app, settings, sentry_restored, start
):
    """With SENTRY_DSN set, the worker's and Beat's start signals initialise Sentry with the
    Celery integration monitoring Beat's entries (what makes them cron monitors)."""
    # GIVEN SENTRY_DSN in the settings and Sentry not yet initialised
    settings.SENTRY_DSN = SecretStr("https://public@sentry.invalid/1")
    assert not sentry_sdk.get_client().is_active()
    # WHEN the process starts
    start(celery_app)
    # THEN Sentry is on, with Celery's integration and monitor_beat_tasks
    client = sentry_sdk.get_client()
    assert client.is_active()
    [celery] = [i for i in client.integrations.values() if isinstance(i, CeleryIntegration)]
    assert celery.monitor_beat_tasks is True


def _check_ins(transport: CapturingTransport) -> list[Any]:
    return [
        item.payload.json
        for envelope in transport.envelopes
        for item in envelope.items
        if item.headers.get("type") == "check_in"
    ]


@pytest.mark.django_db(transaction=True)
def test_beat_entry_checks_in_to_a_sentry_cron_monitor(
    celery_app, celery_worker, settings, sentry_transport
):
    """Beat sending the slot check opens a check-in of monitor `outbox-slot-check` (every
    minute), and the worker closes it ok when the task ends: Sentry can alert on a missed run."""
    settings.CDC_SLOT = "no_such_slot"
    transport = sentry_transport
    celery_app.loader.import_default_modules()
    scheduler = Scheduler(app=celery_app, lazy=True)
    scheduler.setup_schedule()
    entry = scheduler.schedule["outbox-slot-check"]
    # Sentry writes its headers into the entry's options, which are app.conf.beat_schedule's.
    entry.options = dict(entry.options or {})
    scheduler.apply_entry(entry, producer=None)
    done = wait_for(
        lambda: [c for c in _check_ins(transport) if c["status"] == "ok"], what="ok check-in"
    )
    [started] = [c for c in _check_ins(transport) if c["status"] == "in_progress"]
    assert started["monitor_slug"] == "outbox-slot-check"
    assert started["monitor_config"]["schedule"] == {
        "type": "interval",
        "value": 1,
        "unit": "minute",
    }
    [ok] = done
    assert ok["check_in_id"] == started["check_in_id"]
    # The breach the task found is an event of its own.
    assert any("no_such_slot critical" in (e.get("message") or "") for e in transport.events)


@pytest.mark.django_db
def test_no_event_context_reaches_sentry(sentry_transport):
    """An error while publishing, a context or extra named event_context, an error line and a
    span's data: no envelope holds the event's context, and personal data is off."""
    marker = f"context-{uuid.uuid4().hex}"
    try:
        publish(ObservabilityProbe(note=marker, ratio=math.nan))
    except EventPublishError as exc:
        sentry_sdk.capture_exception(exc)
    else:
        pytest.fail("NaN was published")
    sentry_sdk.set_context("outbox", {"event_context": {"note": marker}})
    sentry_sdk.set_extra("event_context", marker)
    structlog.get_logger("tests.observability").error("publish failed", event_context=marker)
    with sentry_sdk.start_transaction(name="probe"), sentry_sdk.start_span(op="probe") as span:
        span.set_data("event_context", marker)
    client = sentry_sdk.get_client()
    assert client.should_send_default_pii() is False
    assert client.options["data_collection"]["user_info"] is False
    assert len(sentry_transport.envelopes) >= 3
    for envelope in sentry_transport.envelopes:
        assert marker.encode() not in envelope.serialize()
