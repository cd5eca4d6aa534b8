"""Web configuration, read once from the environment (12-factor) by `web.settings`.

Nothing else in `web/` reads `os.environ`: `web.settings` builds one `WebSettings` and derives
Django's settings from it. Building it has no side effects (no logging or Sentry set-up); the
entry points do that. A missing or malformed variable stops the process with one line naming it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Annotated

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import NoDecode, SettingsConfigDict

# The DATABASE_URL check and the bad-variable lines are the consumer's (which never imports
# Django), so both processes judge and report configuration the same way.
# The slot and its thresholds (SlotCheckSettings) are shared too: `python -m cdc_consumer status`
# and GET /health/outbox judge the slot by the same variables.
from cdc_consumer.observability import ObservabilitySettings
from cdc_consumer.settings import (
    Identifier,
    SlotCheckSettings,
    describe_invalid_settings,
    postgres_url,
    warn_unknown_variables,
)

# Used only when DJANGO_DEBUG is true and DJANGO_SECRET_KEY is unset, so `runserver` works on a
# laptop with nothing but DATABASE_URL. Never accepted with DEBUG off: see _secret_key below.
DEVELOPMENT_SECRET_KEY = "django-insecure-development-only-never-use-with-debug-off"  # noqa: S105


def _comma_list(value: object) -> object:
    # Operators write `a.example,b.example`; pydantic-settings would otherwise expect JSON.
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class WebSettings(SlotCheckSettings, ObservabilitySettings):
    """Everything the web process (and its Celery worker and Beat) can be told. Defaults are
    production-sane; see .env.example. Logging and Sentry variables are ObservabilitySettings',
    shared with the consumer."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    database_url: Annotated[SecretStr, AfterValidator(postgres_url)]
    # Declared before the secret key: its validator reads the already-validated debug flag.
    django_debug: bool = False
    django_secret_key: SecretStr = Field(default=SecretStr(""), validate_default=True)
    django_allowed_hosts: Annotated[list[str], NoDecode, BeforeValidator(_comma_list)] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1"]
    )
    # Upper bound on one event's serialised context. Contexts are audit facts, not documents;
    # the row also travels through the WAL and one ClickHouse batch.
    outbox_max_context_bytes: int = Field(default=65_536, gt=0, le=256 * 1024 * 1024)

    # Celery's broker (Redis). Only the worker and Beat need it; the web app never sends tasks.
    celery_broker_url: SecretStr | None = None
    # Outbox rows are kept this long (ISO 8601 duration, e.g. P7D), and then only once shipped.
    outbox_retention: timedelta = Field(default=timedelta(days=7), ge=timedelta(0))
    # Rows per DELETE: each chunk is its own short transaction, so no lock is held for long.
    outbox_prune_chunk_rows: int = Field(default=5_000, gt=0, le=1_000_000)
    # Safety margin on the shipped-commit-time rule (see web/outbox/prune.py).
    outbox_prune_commit_margin: timedelta = Field(default=timedelta(minutes=5), ge=timedelta(0))
    # Every slot that streams this outbox (comma-separated: the shards of CDC_SHARD, or a second
    # slot replacing the first): a row is pruned only once all of them shipped it, and the slot
    # check checks each. Empty: CDC_SLOT alone.
    outbox_slots: Annotated[list[Identifier], NoDecode, BeforeValidator(_comma_list)] = Field(
        default_factory=list
    )
    # Beat intervals: prune hourly, check the slot every minute. Whole minutes with SENTRY_DSN
    # set: see _cron_interval below.
    outbox_prune_interval_seconds: float = Field(default=3600.0, gt=0)
    outbox_slot_check_interval_seconds: float = Field(default=60.0, gt=0)

    @field_validator("django_secret_key")
    @classmethod
    def _secret_key(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        if value.get_secret_value():
            return value
        if info.data.get("django_debug") is True:
            return SecretStr(DEVELOPMENT_SECRET_KEY)
        raise ValueError("is required unless DJANGO_DEBUG is true")

    @field_validator("outbox_prune_interval_seconds", "outbox_slot_check_interval_seconds")
    @classmethod
    def _cron_interval(cls, value: float, info: ValidationInfo) -> float:
        # With Sentry on, each Beat entry is a Sentry cron monitor, and Sentry takes intervals of
        # whole minutes only: for any other, sentry-sdk logs a warning and sends no check-in, so
        # a prune or slot check that stopped running would never alert. Refused in every process
        # that reads these settings (they share one environment), not only in Beat, so the
        # mistake shows at the first start. (sentry_dsn is declared, so validated, before.)
        if info.data.get("sentry_dsn") is not None and (value < 60 or value % 60):
            raise ValueError(
                "must be a whole number of minutes (60, 120, ...) when SENTRY_DSN is set:"
                " Beat's entries are Sentry cron monitors, which take no other interval"
            )
        return value


# Variables that were renamed: still set, the old name would be ignored (an unknown variable
# is only warned about) and its setting left at the default, which for OUTBOX_PRUNE_SLOTS is
# pruning by CDC_SLOT alone, deleting rows other slots have not shipped.
_RENAMED = {"OUTBOX_PRUNE_SLOTS": "OUTBOX_SLOTS"}


def load_settings() -> WebSettings:
    """Build settings from the environment or exit with one line naming the bad variable."""
    for old, new in _RENAMED.items():
        if old in os.environ:
            raise SystemExit(f"configuration error: {old} is now {new}: rename it")
    warn_unknown_variables("OUTBOX_", WebSettings)
    try:
        return WebSettings()  # type: ignore[call-arg]  # fields come from the environment
    except ValidationError as exc:
        raise SystemExit(describe_invalid_settings(exc)) from None
