"""structlog and Sentry for the web process, configured once by its entry points.

Logging is installed by Django itself: `web.settings` sets `LOGGING_CONFIG` to
`configure_logging` and `LOGGING` to `logging_dict_config(...)`, and `django.setup()` calls the
former with the latter exactly once per process (manage.py, WSGI, Celery, pytest-django alike).
Importing settings therefore configures nothing. Django's own loggers lose their default
handlers and propagate to the root handler, so every line, ours or Django's, is rendered by
structlog as JSON (or console) on stderr.

Sentry is initialised by `web.wsgi` before the WSGI handler exists, so that its Django
integration wraps the middleware chain and traces requests.
"""

from __future__ import annotations

import logging.config
from typing import Any, Literal

import sentry_sdk
import structlog
from pydantic import SecretStr
from sentry_sdk.integrations.django import DjangoIntegration

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]

# Run on every line, from structlog or from the stdlib (`foreign_pre_chain`).
_SHARED_PROCESSORS: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def logging_dict_config(*, level: LogLevel, log_format: LogFormat) -> dict[str, Any]:
    """The `logging.config.dictConfig` that routes all stdlib logging through structlog."""
    # ConsoleRenderer prints exceptions itself (and warns if they arrive pre-formatted).
    render: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if log_format == "json"
        else [structlog.dev.ConsoleRenderer()]
    )
    stdlib_level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {
                "()": structlog.stdlib.ProcessorFormatter,
                "foreign_pre_chain": _SHARED_PROCESSORS,
                "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
            },
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "structlog",
            },
        },
        "root": {"handlers": ["stderr"], "level": stdlib_level},
        "loggers": {
            # Django's defaults give these their own handlers; drop them so nothing bypasses
            # structlog and nothing prints twice.
            "django": {"handlers": [], "level": stdlib_level, "propagate": True},
            "django.server": {"handlers": [], "level": stdlib_level, "propagate": True},
        },
    }


def configure_logging(config: dict[str, Any]) -> None:
    """Django's LOGGING_CONFIG hook: configure structlog, then apply the stdlib dictConfig."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED_PROCESSORS,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(config)


def configure_sentry(*, dsn: SecretStr | None, environment: str, traces_sample_rate: float) -> None:
    """Errors (and sampled request traces) reach Sentry when SENTRY_DSN is set; else a no-op."""
    if dsn is None:
        return
    sentry_sdk.init(
        dsn=dsn.get_secret_value(),
        environment=environment,
        traces_sample_rate=traces_sample_rate,
        integrations=[DjangoIntegration()],
        send_default_pii=False,
    )
