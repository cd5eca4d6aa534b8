"""web.config: the environment read once into WebSettings, or one line naming what is wrong."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "loud"),
        ("OUTBOX_MAX_CONTEXT_BYTES", "0"),
        ("DJANGO_DEBUG", "maybe"),
        ("SENTRY_TRACES_SAMPLE_RATE", "2"),
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
