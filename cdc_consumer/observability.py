"""structlog and Sentry for every process: the consumer, the web app, its Celery worker and Beat.

The one place either is configured; each entry point calls it once (`cdc_consumer.__main__`,
and on the Django side `web.observability`, which adds only Django's and Celery's parts). It
never imports Django: the consumer must run without it.

Logs: every line, structlog's or a library's stdlib record, goes through the same processors and
is rendered as one JSON object (or a console line) on stderr. Context bound with
`structlog.contextvars` (request and task ids on the web side, the batch in the consumer's sink
worker) is merged into every line of that thread or task. Keys that would carry an event's
context or a credential are redacted whatever logged them.

Sentry, off while SENTRY_DSN is empty. What becomes a Sentry event: an uncaught exception, a
line logged at error or critical (Sentry's logging integration; lower levels only ride along as
breadcrumbs of a later event), and the messages the code sends itself (the slot check's
breaches). Transactions when SENTRY_TRACES_SAMPLE_RATE is above 0. No payload leaves with
personal data (`send_default_pii` off, no request bodies), frame locals, or an event's context.
"""

from __future__ import annotations

import functools
import logging.config
import re
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, TypeVar, cast

import sentry_sdk
import structlog
from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sentry_sdk.integrations import Integration

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]


def _empty_is_none(value: object) -> object:
    # `SENTRY_DSN=` (as .env.example spells "off") must not start Sentry with an empty DSN.
    return None if isinstance(value, str) and not value.strip() else value


class ObservabilitySettings(BaseSettings):
    """The variables logging and Sentry read, the same for every process (.env.example)."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    # Tag stored with every event (web) and Sentry's environment (every process).
    environment: str = Field(default="development", min_length=1)
    sentry_dsn: Annotated[SecretStr | None, BeforeValidator(_empty_is_none)] = None
    # Share of web requests and consumer batches traced as Sentry transactions; 0: errors only.
    sentry_traces_sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"


# Keys never written to a log line: an event's context (audit data, possibly personal) and
# credentials. Redacted rather than dropped, so a line that tried shows it.
REDACTED_KEYS = frozenset(
    {
        "event_context",
        "event_context_raw",
        "password",
        "dsn",
        "sentry_dsn",
        "database_url",
        "clickhouse_url",
        "celery_broker_url",
        "broker_url",
    }
)
REDACTED = "[redacted]"


def redact_secrets(
    _logger: Any, _method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """structlog processor: replace the value of every key in REDACTED_KEYS."""
    for key in REDACTED_KEYS.intersection(event_dict):
        event_dict[key] = REDACTED
    return event_dict


# ClickHouse quotes the input it refuses ("Cannot parse JSON object here: {...}", "Duplicate
# path found ...: a.b"), which is an event's context. A line keeps the head of the message
# (code and what failed); event_log_dead_letter keeps the whole text beside the row.
_REJECTED_DATA = "clickhouse rejected the data: "
_EXCEPTION_HEAD = re.compile(r"(DB::Exception: [^:\n]*)[^\n]*")


def redact_rejected_data(
    _logger: Any, _method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """structlog processor: cut the quoted input out of a ClickHouse data error in `error`."""
    error = event_dict.get("error")
    if isinstance(error, str) and _REJECTED_DATA in error:
        kept = _EXCEPTION_HEAD.sub(rf"\1: {REDACTED}", error)
        if kept == error:  # no ClickHouse message to keep the head of
            kept = error[: error.index(_REJECTED_DATA) + len(_REJECTED_DATA)] + REDACTED
        event_dict["error"] = kept
    return event_dict


# Run on every line, from structlog or from the stdlib (`foreign_pre_chain`).
SHARED_PROCESSORS: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    redact_secrets,
    redact_rejected_data,
]


def logging_dict_config(
    *,
    level: LogLevel,
    log_format: LogFormat,
    loggers: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `logging.config.dictConfig` that routes all stdlib logging through structlog;
    `loggers` adds per-logger entries (Django's, whose default handlers must go)."""
    # ConsoleRenderer prints exceptions itself (and warns if they arrive pre-formatted).
    render: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if log_format == "json"
        else [structlog.dev.ConsoleRenderer()]
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {
                "()": structlog.stdlib.ProcessorFormatter,
                "foreign_pre_chain": SHARED_PROCESSORS,
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
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": loggers or {},
    }


def configure_logging(config: dict[str, Any]) -> None:
    """Configure structlog, then apply the stdlib dictConfig from `logging_dict_config`.

    Also Django's LOGGING_CONFIG hook: `django.setup()` calls it with LOGGING once per process.
    """
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *SHARED_PROCESSORS,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(config)


# Keys whose value is an outbox event's context, wherever they appear in a Sentry payload.
_PAYLOAD_KEYS = frozenset({"event_context", "event_context_raw"})


def _without_payload(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_payload(v) for k, v in value.items() if k not in _PAYLOAD_KEYS}
    if isinstance(value, list | tuple):
        return [_without_payload(item) for item in value]
    return value


def scrub_event(event: Any, _hint: Any) -> Any:
    """Sentry's before_send and before_send_transaction: the payload without event contexts
    (in contexts, extra, tags, breadcrumbs or span data alike)."""
    return _without_payload(event)


def sentry_options(
    *,
    dsn: SecretStr,
    environment: str,
    traces_sample_rate: float,
    integrations: Sequence[Integration] = (),
) -> dict[str, Any]:
    """The keyword arguments of `sentry_sdk.init`, the same for every process."""
    if not 0.0 <= traces_sample_rate <= 1.0:
        raise ValueError(f"traces_sample_rate must be within 0..1, not {traces_sample_rate}")
    return {
        "dsn": dsn.get_secret_value(),
        "environment": environment,
        "traces_sample_rate": traces_sample_rate,
        "integrations": list(integrations),
        # Only what each process lists: left on, the SDK enables (and imports) an integration
        # for every library it finds installed, Django and Celery in the consumer too (~65 MB).
        "auto_enabling_integrations": False,
        # No personal data: `send_default_pii` is left unset, which is off. Setting it at all
        # (even to False) is deprecated since sentry-sdk 2.7x in favour of `data_collection`,
        # and passing `data_collection` would switch off the SDK's denylist scrubber.
        # A frame's locals may hold an event's context or a row being shipped; request bodies
        # hold passwords and personal data. Neither is sent.
        "include_local_variables": False,
        "max_request_body_size": "never",
        "before_send": scrub_event,
        "before_send_transaction": scrub_event,
    }


def configure_sentry(
    *,
    dsn: SecretStr | None,
    environment: str,
    traces_sample_rate: float,
    integrations: Sequence[Integration] = (),
) -> bool:
    """Initialise Sentry when SENTRY_DSN is set; False (and nothing done) when it is not."""
    if dsn is None:
        return False
    sentry_sdk.init(
        **sentry_options(
            dsn=dsn,
            environment=environment,
            traces_sample_rate=traces_sample_rate,
            integrations=integrations,
        )
    )
    return True


_F = TypeVar("_F", bound=Callable[..., None])
_HOOK_LOG_EVERY_SECONDS = 60.0
_hook_logged_at: dict[str, float] = {}


def never_raises(hook: _F) -> _F:
    """For a metrics or tracing hook on the delivery path: a failure in it is logged (at most
    once a minute per hook) and swallowed. Observability must never stop, or change, what is
    delivered and confirmed."""

    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            hook(*args, **kwargs)
        except Exception as exc:
            now = time.monotonic()
            name = hook.__qualname__
            if now - _hook_logged_at.get(name, -_HOOK_LOG_EVERY_SECONDS) >= _HOOK_LOG_EVERY_SECONDS:
                _hook_logged_at[name] = now
                structlog.get_logger(__name__).warning(
                    "observability hook failed", hook=name, error=repr(exc)
                )

    return cast(_F, guarded)
