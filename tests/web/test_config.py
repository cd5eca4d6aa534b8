"""web.config: the environment read once into WebSettings, or one line naming what is wrong."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cdc_consumer.status import SlotThresholds
from web.config import DEVELOPMENT_SECRET_KEY, WebSettings, load_settings

_VARIABLES = [
    "DATABASE_URL",
    "ENVIRONMENT",
    "DJANGO_SECRET_KEY",
    "DJANGO_DEBUG",
    "DJANGO_ALLOWED_HOSTS",
    "SENTRY_DSN",
    "SENTRY_TRACES_SAMPLE_RATE",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "OUTBOX_MAX_CONTEXT_BYTES",
    "CELERY_BROKER_URL",
    "CDC_SLOT",
    "CDC_LAG_WARNING_BYTES",
    "CDC_LAG_CRITICAL_BYTES",
    "CDC_STALL_WARNING_SECONDS",
    "CDC_STALL_CRITICAL_SECONDS",
    "OUTBOX_RETENTION",
    "OUTBOX_PRUNE_CHUNK_ROWS",
    "OUTBOX_PRUNE_COMMIT_MARGIN",
    "OUTBOX_PRUNE_INTERVAL_SECONDS",
    "OUTBOX_SLOT_CHECK_INTERVAL_SECONDS",
]
_URL = "postgresql://app:secret@db.internal:5432/app"


@pytest.fixture
def env(monkeypatch):
    """An environment holding none of the web variables; tests set what they need."""
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _exit_message(capture: pytest.ExceptionInfo[SystemExit]) -> str:
    return str(capture.value.code)


def test_defaults(env):
    """With only the required variables set, every other setting has its documented default."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    settings = load_settings()
    assert settings.database_url.get_secret_value() == _URL
    assert settings.environment == "development"
    assert settings.django_debug is False
    assert settings.django_allowed_hosts == ["localhost", "127.0.0.1"]
    assert settings.sentry_dsn is None
    assert settings.sentry_traces_sample_rate == 0.0
    assert (settings.log_level, settings.log_format) == ("info", "json")
    assert settings.outbox_max_context_bytes == 65_536


def test_missing_database_url_exits_naming_it(env):
    """No DATABASE_URL stops the process with one line naming the variable."""
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    with pytest.raises(SystemExit) as caught:
        load_settings()
    assert _exit_message(caught) == "configuration error: DATABASE_URL is required"


def test_database_url_must_be_postgres(env):
    """A DATABASE_URL that is not a PostgreSQL URL is refused with the expected shape."""
    env.setenv("DATABASE_URL", "mysql://app@db/app")
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    with pytest.raises(SystemExit) as caught:
        load_settings()
    assert _exit_message(caught) == (
        "configuration error: DATABASE_URL must be postgresql://user:pass@host:port/db"
    )


def test_secret_key_required_without_debug(env):
    """Without DJANGO_DEBUG, a missing DJANGO_SECRET_KEY is a configuration error."""
    env.setenv("DATABASE_URL", _URL)
    with pytest.raises(SystemExit) as caught:
        load_settings()
    assert _exit_message(caught) == (
        "configuration error: DJANGO_SECRET_KEY is required unless DJANGO_DEBUG is true"
    )


def test_debug_gets_development_secret_key(env):
    """With DJANGO_DEBUG=true and no DJANGO_SECRET_KEY, the development key is used."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_DEBUG", "true")
    settings = load_settings()
    assert settings.django_debug is True
    assert settings.django_secret_key.get_secret_value() == DEVELOPMENT_SECRET_KEY


def test_allowed_hosts_is_a_comma_list(env):
    """DJANGO_ALLOWED_HOSTS is split on commas, blanks dropped."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    env.setenv("DJANGO_ALLOWED_HOSTS", " api.example.com, .example.org ,")
    assert load_settings().django_allowed_hosts == ["api.example.com", ".example.org"]


def test_prune_slots_is_a_comma_list_of_slot_names(env):
    """OUTBOX_SLOTS is split on commas, blanks dropped; empty means CDC_SLOT alone."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    assert load_settings().outbox_slots == []
    env.setenv("OUTBOX_SLOTS", " blue_slot, green_slot ,")
    assert load_settings().outbox_slots == ["blue_slot", "green_slot"]


def test_the_old_name_of_outbox_slots_is_refused(env):
    """OUTBOX_PRUNE_SLOTS, the old name of OUTBOX_SLOTS, stops the process naming the new one:
    ignored, it would leave the prune following CDC_SLOT alone."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    env.setenv("OUTBOX_PRUNE_SLOTS", "blue_slot,green_slot")
    with pytest.raises(SystemExit, match="OUTBOX_PRUNE_SLOTS is now OUTBOX_SLOTS"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "loud"),
        ("OUTBOX_MAX_CONTEXT_BYTES", "0"),
        ("DJANGO_DEBUG", "maybe"),
        ("SENTRY_TRACES_SAMPLE_RATE", "2"),
        ("OUTBOX_SLOTS", "blue_slot,Green-Slot"),
    ],
)
def test_malformed_variable_is_named(env, name, value):
    """A malformed variable stops the process with a line that starts with its name."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    env.setenv(name, value)
    with pytest.raises(SystemExit) as caught:
        load_settings()
    assert _exit_message(caught).startswith(f"configuration error: {name} ")


def test_secrets_are_masked_in_repr(env):
    """The database URL, secret key and Sentry DSN never appear in the settings' repr."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "very-secret-key-value")
    env.setenv("SENTRY_DSN", "https://public@sentry.example/1")
    text = repr(WebSettings())  # type: ignore[call-arg]
    for secret in ("app:secret", "very-secret-key-value", "public@sentry.example"):
        assert secret not in text


def test_operations_defaults_and_env_forms(env):
    """Retention, margin, intervals and slot thresholds default as documented in .env.example
    and take seconds or ISO 8601 durations from the environment."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    defaults = load_settings()
    assert defaults.celery_broker_url is None
    assert defaults.outbox_retention == timedelta(days=7)
    assert defaults.outbox_prune_commit_margin == timedelta(minutes=5)
    assert defaults.outbox_prune_chunk_rows == 5_000
    assert defaults.outbox_prune_interval_seconds == 3600
    assert defaults.outbox_slot_check_interval_seconds == 60
    assert defaults.cdc_slot == "event_outbox_slot"
    assert defaults.slot_thresholds() == SlotThresholds(
        lag_warning_bytes=1024**3,
        lag_critical_bytes=5 * 1024**3,
        stall_warning_seconds=300,
        stall_critical_seconds=1800,
    )
    env.setenv("OUTBOX_RETENTION", "P2D")
    env.setenv("OUTBOX_PRUNE_COMMIT_MARGIN", "PT30S")
    env.setenv("CDC_LAG_CRITICAL_BYTES", "1")
    custom = load_settings()
    assert custom.outbox_retention == timedelta(days=2)
    assert custom.outbox_prune_commit_margin == timedelta(seconds=30)
    assert custom.slot_thresholds().lag_critical_bytes == 1


@pytest.mark.parametrize(
    "name", ["OUTBOX_PRUNE_INTERVAL_SECONDS", "OUTBOX_SLOT_CHECK_INTERVAL_SECONDS"]
)
@pytest.mark.parametrize("seconds", ["90", "30", "60.5"])
def test_beat_interval_must_be_whole_minutes_with_sentry(env, name, seconds):
    """With SENTRY_DSN set, a Beat interval Sentry's crons cannot monitor (not a whole number
    of minutes) stops the process naming it; without SENTRY_DSN it is accepted."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    env.setenv(name, seconds)
    assert getattr(load_settings(), name.lower()) == float(seconds)
    env.setenv("SENTRY_DSN", "https://public@sentry.example/1")
    with pytest.raises(SystemExit) as caught:
        load_settings()
    assert _exit_message(caught) == (
        f"configuration error: {name} must be a whole number of minutes (60, 120, ...) when"
        " SENTRY_DSN is set: Beat's entries are Sentry cron monitors, which take no other"
        " interval"
    )


def test_whole_minute_beat_intervals_are_accepted_with_sentry(env):
    """With SENTRY_DSN set, intervals of whole minutes (the defaults, or 120 s) are accepted."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    env.setenv("SENTRY_DSN", "https://public@sentry.example/1")
    assert load_settings().outbox_slot_check_interval_seconds == 60
    env.setenv("OUTBOX_SLOT_CHECK_INTERVAL_SECONDS", "120")
    env.setenv("OUTBOX_PRUNE_INTERVAL_SECONDS", "1800.0")
    settings = load_settings()
    assert settings.outbox_slot_check_interval_seconds == 120
    assert settings.outbox_prune_interval_seconds == 1800


def test_negative_retention_is_refused(env):
    """A negative OUTBOX_RETENTION stops the process with one line naming it."""
    env.setenv("DATABASE_URL", _URL)
    env.setenv("DJANGO_SECRET_KEY", "k" * 50)
    env.setenv("OUTBOX_RETENTION", "-P1D")
    with pytest.raises(SystemExit) as caught:
        load_settings()
    assert _exit_message(caught).startswith("configuration error: OUTBOX_RETENTION")
