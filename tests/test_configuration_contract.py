"""`.env.example` and the settings classes cannot drift apart: every variable a process reads is
documented there with its default, nothing there is read by no one, and a misspelled variable
in the environment is reported instead of silently leaving its setting at the default."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from cdc_consumer.settings import ConsumerSettings, unknown_variables
from web.config import WebSettings

ROOT = Path(__file__).resolve().parent.parent
_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
_CLASSES: tuple[type[BaseSettings], ...] = (ConsumerSettings, WebSettings)
# What each class needs to be built at all (the values of required variables are examples).
_REQUIRED = {
    "DATABASE_URL": "postgresql://consumer@db.internal:5432/app",
    "CLICKHOUSE_URL": "http://consumer@ch.internal:8123/events",
    "DJANGO_DEBUG": "true",
}


def _documented() -> dict[str, tuple[bool, str]]:
    """Each variable of .env.example: (commented out, its value)."""
    found = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = _LINE.match(line.strip())
        if match:
            found[match.group(2)] = (match.group(1) is not None, match.group(3))
    return found


def _read_by_settings() -> set[str]:
    return {name.upper() for cls in _CLASSES for name in cls.model_fields}


def _read_by_compose() -> set[str]:
    # `$${NAME}` is the container's own variable, escaped from compose's substitution.
    text = (ROOT / "docker-compose.yml").read_text()
    return set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", text))


def _read_by_tests() -> set[str]:
    support = "\n".join(p.read_text() for p in (ROOT / "tests" / "support").glob("*.py"))
    return set(re.findall(r"\"(TEST_[A-Z0-9_]+)\"", support))


def test_every_setting_is_documented_and_nothing_else_is():
    """The variables of .env.example are exactly those the settings, compose and the test
    plugins read."""
    documented = set(_documented())
    read = _read_by_settings() | _read_by_compose() | _read_by_tests()
    assert sorted(read - documented) == [], "read but not in .env.example"
    assert sorted(documented - read) == [], "in .env.example but read by nothing"


def _parsed(cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    for name in _documented():
        monkeypatch.delenv(name, raising=False)
    for name, value in {**_REQUIRED, **env}.items():
        monkeypatch.setenv(name, value)
    return cls()


@pytest.mark.parametrize("cls", _CLASSES, ids=lambda cls: cls.__name__)
def test_every_value_in_env_example_is_the_default(cls, monkeypatch):
    """A variable set (not commented out) in .env.example holds its setting's default, read as
    the process reads it; required variables and secrets hold examples."""
    defaults = _parsed(cls, monkeypatch)
    differing = []
    for name, (commented, value) in _documented().items():
        field = name.lower()
        if commented or name in _REQUIRED or field not in cls.model_fields:
            continue
        default = getattr(defaults, field)
        if default is None or "secret" in type(default).__name__.lower():
            continue  # no default to match: the value is an example (a URL, a key)
        if getattr(_parsed(cls, monkeypatch, **{name: value}), field) != default:
            differing.append(f"{name}={value} (default {default!r})")
    assert differing == []


@pytest.mark.parametrize(
    ("cls", "variable", "nearest"),
    [
        (ConsumerSettings, "CDC_BATCH_MAX_ROW", "CDC_BATCH_MAX_ROWS"),
        (WebSettings, "OUTBOX_RETENTON", "OUTBOX_RETENTION"),
    ],
)
def test_misspelled_variable_is_reported_with_the_nearest_setting(cls, variable, nearest):
    """A variable of a process's prefix that it does not read is named, with what was meant."""
    environ = {variable: "5", nearest: "x", "CDC_SLOT": "s", "PATH": "/usr/bin"}
    prefix = variable.split("_", 1)[0] + "_"
    lines = unknown_variables(prefix, cls, environ)
    assert lines == [
        f"configuration warning: {variable} is not a setting, ignored (did you mean {nearest}?)"
    ]


def test_consumer_reports_a_misspelled_variable_when_it_starts(tmp_path):
    """The warning reaches the operator: the consumer prints it before anything else."""
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": "postgresql://x@127.0.0.1:1/unused",
        "CLICKHOUSE_URL": "http://x@127.0.0.1:1/default",
        "CDC_BATCH_MAX_ROW": "5",
    }
    result = subprocess.run(
        [sys.executable, "-m", "cdc_consumer", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "configuration warning: CDC_BATCH_MAX_ROW is not a setting" in result.stderr
    assert "did you mean CDC_BATCH_MAX_ROWS?" in result.stderr
