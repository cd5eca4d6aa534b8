"""The Django side of the one observability configuration (`cdc_consumer.observability`).

Logging is installed by Django itself: `web.settings` sets `LOGGING_CONFIG` to the shared
`configure_logging` and `LOGGING` to `logging_dict_config(...)`, and `django.setup()` calls the
former with the latter exactly once per process (manage.py, WSGI, Celery worker and Beat,
pytest-django alike). Importing settings therefore configures nothing. Django's own loggers lose
their default handlers and propagate to the root handler, so every line, ours or Django's, is
rendered by structlog. Request context (`request_id`, `user_id`) is bound by django-structlog's
middleware, and travels into Celery tasks in their headers (see `web.celery`).

Sentry is initialised by `web.wsgi` before the WSGI handler exists, so that its Django
integration wraps the middleware chain and traces requests, and by `web.celery` in the worker
and Beat, where the Celery integration reports every Beat entry as a Sentry cron monitor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.conf import settings

from cdc_consumer.observability import LogFormat, LogLevel, configure_sentry
from cdc_consumer.observability import logging_dict_config as shared_logging_dict_config

if TYPE_CHECKING:
    from sentry_sdk.integrations import Integration


def logging_dict_config(*, level: LogLevel, log_format: LogFormat) -> dict[str, Any]:
    """The shared dictConfig, with Django's loggers routed through it."""
    stdlib_level = level.upper()
    return shared_logging_dict_config(
        level=level,
        log_format=log_format,
        loggers={
            # Django's defaults give these their own handlers; drop them so nothing bypasses
            # structlog and nothing prints twice.
            "django": {"handlers": [], "level": stdlib_level, "propagate": True},
            "django.server": {"handlers": [], "level": stdlib_level, "propagate": True},
            # With DEBUG on it logs every query with its parameters: an outbox INSERT's
            # parameters are the event's context, which no log line carries.
            "django.db.backends": {"handlers": [], "level": "INFO", "propagate": True},
        },
    )


def sentry_integrations() -> list[Integration]:
    """Django's and Celery's Sentry integrations, with Beat's schedule as cron monitors: Beat
    checks in when it sends an entry, the worker when the task ends, and Sentry alerts when a
    check-in is missed (a prune or slot check that did not run) or reports an error."""
    # Imported here: web.settings imports this module, before Django could be set up.
    from sentry_sdk.integrations.celery import CeleryIntegration  # noqa: PLC0415
    from sentry_sdk.integrations.django import DjangoIntegration  # noqa: PLC0415

    return [DjangoIntegration(), CeleryIntegration(monitor_beat_tasks=True)]


def configure_web_sentry() -> bool:
    """Sentry for the web process, the worker or Beat, from Django's settings; False when
    SENTRY_DSN is empty."""
    return configure_sentry(
        dsn=settings.SENTRY_DSN,
        environment=settings.ENVIRONMENT,
        traces_sample_rate=settings.SENTRY_TRACES_SAMPLE_RATE,
        integrations=sentry_integrations(),
    )
