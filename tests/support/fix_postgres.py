"""pytest plugin: one disposable PostgreSQL (wal_level=logical) for the whole test session.

Started before Django reads its settings, so DATABASE_URL points at it; `TEST_DATABASE_URL`
names an external server instead (CI with service containers, a developer's own server).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from demo.postgres import DisposablePostgres
from tests.support import engines

_SERVER: DisposablePostgres | None = None
_CONTAINER: Any = None  # a testcontainers PostgresContainer, where a Docker engine answers


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Start the server (unless TEST_DATABASE_URL is set) before pytest-django sets up Django."""
    global _SERVER, _CONTAINER  # noqa: PLW0603  (one server per pytest process, this plugin's)
    url = os.environ.get("TEST_DATABASE_URL")
    if not url and _distributes_tests(early_config):
        # pytest-xdist's controller runs no test: each worker starts its own server. Django
        # (12-factor) still wants a DATABASE_URL to read its settings; this one is never used.
        url = "postgresql://xdist-controller@127.0.0.1:1/unused"
    elif not url and engines.containers_wanted():
        _CONTAINER, url = engines.start_postgres_container()
    elif not url:
        _SERVER = DisposablePostgres.create(prefix="outbox-test-pg-")
        _SERVER.start()
        url = _SERVER.url
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("ENVIRONMENT", "test")
    os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-not-for-production")
    os.environ.setdefault("LOG_LEVEL", "warning")


def _distributes_tests(config: pytest.Config) -> bool:
    """This process is pytest-xdist's controller: it hands tests to workers, running none."""
    workers = getattr(config.known_args_namespace, "numprocesses", None)
    return bool(workers) and "PYTEST_XDIST_WORKER" not in os.environ


def pytest_report_header(config: pytest.Config) -> str:
    return f"engines: {engines.describe()}"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SERVER is not None:
        _SERVER.destroy()
    if _CONTAINER is not None:
        _CONTAINER.stop()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the session's PostgreSQL (logical replication on)."""
    return os.environ["DATABASE_URL"]


class ContainerPostgres:
    """The external server of `TEST_DATABASE_URL` when it runs in the Docker container
    `TEST_POSTGRES_CONTAINER` names (CI's service container, whose host port stays bound across
    restarts): stopped and started through the docker CLI, as `DisposablePostgres` is through
    pg_ctl."""

    def __init__(self, container: str, url: str) -> None:
        self.container = container
        self.url = url

    def stop(self, mode: str = "fast") -> None:
        # PostgreSQL's own signals: SIGTERM is a fast shutdown, SIGQUIT an immediate one (a
        # crash, as far as the WAL is concerned).
        signal = {"fast": "TERM", "immediate": "QUIT"}[mode]
        self._docker("kill", "--signal", signal, self.container)
        self._docker("wait", self.container)

    def start(self) -> None:
        self._docker("start", self.container)
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    @staticmethod
    def _docker(*args: str) -> None:
        subprocess.run(["docker", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def postgres_server() -> DisposablePostgres | ContainerPostgres:
    """The server itself, for tests that stop and start it: the disposable one, or the
    container `TEST_POSTGRES_CONTAINER` names."""
    if _SERVER is not None:
        return _SERVER
    container = os.environ.get("TEST_POSTGRES_CONTAINER")
    if container and os.environ.get("TEST_DATABASE_URL"):
        return ContainerPostgres(container, os.environ["TEST_DATABASE_URL"])
    pytest.skip(
        "this server cannot be restarted by the test: set TEST_POSTGRES_CONTAINER to the"
        " container running TEST_DATABASE_URL's server"
    )


def _restart_with_commit_timestamps(
    server: DisposablePostgres | ContainerPostgres, url: str, value: str
) -> None:
    """track_commit_timestamp takes effect only at server start."""
    from django.db import connection  # here: this plugin loads before Django is set up

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET track_commit_timestamp = {value}")
    connection.close()  # Django's session would not survive the restart; it reconnects lazily
    server.stop()
    server.start()


@contextmanager
def commit_timestamps_off(
    server: DisposablePostgres | ContainerPostgres, url: str
) -> Iterator[None]:
    """Transactions committed in the block get no commit timestamp
    (`pg_xact_commit_timestamp(xmin)` reads NULL, as it does for one older than the server's
    commit-timestamp horizon). The server restarts on the way in and out: connections opened
    before either do not survive it (Django's is closed, and reconnects when next used)."""
    _restart_with_commit_timestamps(server, url, "off")
    try:
        yield
    finally:
        _restart_with_commit_timestamps(server, url, "on")


@pytest.fixture
def pg_conn(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection for checks outside Django."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_database(postgres_url: str) -> Iterator[Callable[..., str]]:
    """Create databases on the session's server (an encoding, database-level settings such as
    `ALTER DATABASE … SET datestyle`); dropped afterwards. Returns each one's URL."""
    names: list[str] = []

    def make(encoding: str = "UTF8", **settings: str) -> str:
        name = f"db_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                f"CREATE DATABASE {name} ENCODING '{encoding}' TEMPLATE template0"
                " LC_COLLATE 'C' LC_CTYPE 'C'"
            )
            if encoding == "SQL_ASCII":
                # psycopg returns SQL_ASCII text as bytes, which the consumer's SQL connections
                # (migrations, progress) do not expect; the replication connection chooses
                # its own encoding, so this changes nothing about what the WAL delivers.
                settings.setdefault("client_encoding", "UTF8")
            for setting, value in settings.items():
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                        sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)
                    )
                )
        names.append(name)
        return urlsplit(postgres_url)._replace(path=f"/{name}").geturl()

    yield make
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
