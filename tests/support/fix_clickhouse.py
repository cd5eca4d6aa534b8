"""pytest plugin: one ClickHouse HTTP endpoint for the whole test session.

By default it is `tests.support.clickhouse_http` (the real engine, chDB, behind ClickHouse's HTTP
interface) in its own process on a temporary data directory: chDB opens one data path per
process, so it must never be imported into the pytest process. `TEST_CLICKHOUSE_URL`
(`http(s)://user:password@host:port/database`) names a real server instead; tests that need the
fault hooks then skip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.error import HTTPError
from urllib.parse import quote, urlencode, urlsplit
from urllib.request import ProxyHandler, Request, build_opener

import pytest

from tests.support import engines

# A second user with a password, so a test can prove the client sends credentials.
PASSWORD_USER = ("outbox_test", "outbox-test-password")
_READY_TIMEOUT = 60.0
_READY_LINE = re.compile(rb"listening ([0-9.]+):(\d+)")
_NO_PROXY = build_opener(ProxyHandler({}))


@dataclass
class ClickHouseServer:
    """Where the session's ClickHouse listens, how to reach it, and (embedded only) fault hooks."""

    host: str
    port: int
    username: str
    password: str
    database: str
    secure: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def embedded(self) -> bool:
        """True for the chDB test server, which has the fault hooks and `PASSWORD_USER`."""
        return self.process is not None

    @property
    def url(self) -> str:
        """`http://user:password@host:port/database`, the form CLICKHOUSE_URL takes."""
        scheme = "https" if self.secure else "http"
        auth = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}"
        return f"{scheme}://{auth}@{self.host}:{self.port}/{self.database}"

    def client(self, **kwargs: Any) -> Any:
        """A clickhouse-connect client with its defaults; keyword arguments override them."""
        import clickhouse_connect

        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "database": self.database,
            "secure": self.secure,
        }
        options.update(kwargs)
        return clickhouse_connect.get_client(**options)

    def hold_inserts(self, *, executing: bool = False, after: int | None = None) -> None:
        """From now on (or once `after` more have run) every data INSERT waits until
        `release_inserts()`: before it executes (KILL QUERY cancels it), or with `executing`
        as if executing (KILL QUERY SYNC waits for it to land)."""
        query = "stage=executing" if executing else "stage=before"
        if after is not None:
            query += f"&after={after}"
        self._hook("POST", f"hold_inserts?{query}")

    def release_inserts(self) -> None:
        """Let held and future INSERTs run."""
        self._hook("POST", "release_inserts")

    def fail_inserts(
        self, count: int, code: int = 1002, *, status: int = 500, message: str = "", table: str = ""
    ) -> None:
        """The next `count` INSERTs (into `table`, if given) fail without executing: with
        ClickHouse error `code` and `message`, or, with code 0, as a proxy refuses a request
        (HTTP `status` and an HTML body, no ClickHouse code)."""
        query = urlencode(
            {"count": count, "code": code, "status": status, "message": message, "table": table}
        )
        self._hook("POST", f"fail_inserts?{query}")

    def fail_inserts_over(
        self, size: int, code: int = 1002, *, status: int = 500, message: str = "", table: str = ""
    ) -> None:
        """Until `reset()`, every INSERT (into `table`, if given) whose request body exceeds
        `size` bytes fails without executing, answered as `fail_inserts` describes: a body
        limit of a proxy (code 0, status 413) or a server limit an insert can fit under."""
        query = urlencode(
            {"bytes": size, "code": code, "status": status, "message": message, "table": table}
        )
        self._hook("POST", f"fail_inserts_over?{query}")

    def set_profile(self, **settings: str) -> None:
        """Settings under every query's own until `reset()`, as a user profile's."""
        query = "&".join(f"{name}={value}" for name, value in settings.items())
        self._hook("POST", f"profile?{query}")

    def drop_answers(self, count: int) -> None:
        """The next `count` data inserts land, then their connection closes unanswered."""
        self._hook("POST", f"drop_answers?count={count}")

    def lose_answers(self, count: int) -> None:
        """The next `count` INSERTs land, then answer with an error (the answer was lost)."""
        self._hook("POST", f"lose_answers?count={count}")

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: queries, inserts, rows_inserted, failed_inserts,
        held_inserts (waiting right now), pending_failures (left of `fail_inserts`),
        failing_inserts_over_bytes (the `fail_inserts_over` limit, or None), holding, and
        last_request (the settings and encodings of the last query)."""
        return self._hook("GET", "stats")

    def reset(self) -> None:
        """Zero the counters, drop pending and size-triggered failures, release held inserts."""
        self._hook("POST", "reset")

    def wait_for_held_inserts(self, count: int = 1, timeout: float = 10.0) -> dict[str, Any]:
        """Block until `count` INSERTs are being held; fails the test after `timeout` seconds."""
        return self._hook("GET", f"wait_held?count={count}&timeout={timeout}", timeout + 5)

    def _hook(self, method: str, path: str, timeout: float = 10.0) -> dict[str, Any]:
        if not self.embedded:
            pytest.skip("needs the chDB test server's fault hooks (a real server is in use)")
        request = Request(f"http://{self.host}:{self.port}/_test/{path}", method=method)
        try:
            with _NO_PROXY.open(request, timeout=timeout) as response:
                payload: dict[str, Any] = json.load(response)
        except HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            exc.close()
            pytest.fail(f"test server hook {path} answered {exc.code}: {detail}")
        return payload

    def stop(self) -> None:
        """Terminate the server process: SIGTERM, then SIGKILL if it lingers."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_test_server(data_dir: Path) -> ClickHouseServer:
    """Start `tests.support.clickhouse_http` on `data_dir` and wait for its `listening` line."""
    log_path = data_dir.parent / f"{data_dir.name}.log"
    user, password = PASSWORD_USER
    command = [sys.executable, "-m", "tests.support.clickhouse_http", "--path", str(data_dir)]
    command += ["--user", f"{user}:{password}"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            bufsize=0,
            cwd=Path(__file__).resolve().parents[2],
        )
    server = ClickHouseServer("", 0, "default", "", "default", process=process)
    try:
        server.host, server.port = _await_ready_line(process, log_path)
    except BaseException:
        server.stop()
        raise
    return server


def _await_ready_line(process: subprocess.Popen[bytes], log_path: Path) -> tuple[str, int]:
    assert process.stdout is not None
    deadline = time.monotonic() + _READY_TIMEOUT
    output = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _startup_failed("did not print its listening line in time", log_path)
            if not selector.select(remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                _startup_failed(f"exited with {process.wait()}", log_path)
            output += chunk
    match = _READY_LINE.match(output)
    if match is None:
        _startup_failed(f"printed {output!r}", log_path)
    return match.group(1).decode(), int(match.group(2))


def _startup_failed(why: str, log_path: Path) -> NoReturn:
    log = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
    pytest.fail(f"ClickHouse test server {why}; its log:\n{log}", pytrace=False)


def server_from_url(url: str) -> ClickHouseServer:
    """A real server named by `http(s)://user:password@host:port/database`."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    return ClickHouseServer(
        host=parts.hostname or "localhost",
        port=parts.port or (8443 if secure else 8123),
        username=parts.username or "default",
        password=parts.password or "",
        database=parts.path.strip("/") or "default",
        secure=secure,
    )


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    """The session's ClickHouse (tests/support/engines.py): `TEST_CLICKHOUSE_URL`, a container
    where a Docker engine answers, or the chDB HTTP test server."""
    url = os.environ.get("TEST_CLICKHOUSE_URL")
    container = None
    if not url and engines.containers_wanted():
        container, url = engines.start_clickhouse_container()
    if url:
        # A fresh database per session: event_log's watermark is per source server, and the
        # disposable PostgreSQL of an earlier run had other WAL positions.
        server = dataclasses.replace(server_from_url(url), database="default")
        database = f"test_{uuid.uuid4().hex[:12]}"
        server.client().command(f"CREATE DATABASE {database}")
        try:
            yield dataclasses.replace(server, database=database)
        finally:
            server.client().command(f"DROP DATABASE IF EXISTS {database}")
            if container is not None:
                container.stop()
        return
    server = start_test_server(tmp_path_factory.mktemp("clickhouse") / "data")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clickhouse_faults(clickhouse_server: ClickHouseServer) -> Iterator[ClickHouseServer]:
    """The session's server with zeroed stats and no faults, cleared again afterwards (so a
    failing test cannot leave inserts held); skips against a real server."""
    clickhouse_server.reset()
    yield clickhouse_server
    clickhouse_server.reset()


def clickhouse_select(clickhouse_url: str, sql: str) -> list[list[Any]]:
    """Run one SELECT through the consumer's own transport (HTTP or chDB) and close it."""
    from cdc_consumer.clickhouse import connect

    transport = connect(clickhouse_url)
    try:
        return transport.select(sql)
    finally:
        transport.close()


def clickhouse_command(clickhouse_url: str, sql: str) -> None:
    """Run one statement through the consumer's own transport and close it."""
    from cdc_consumer.clickhouse import connect

    transport = connect(clickhouse_url)
    try:
        transport.command(sql)
    finally:
        transport.close()


@pytest.fixture
def clickhouse_migrated(clickhouse_server: ClickHouseServer) -> ClickHouseServer:
    """The session's ClickHouse with the schema of sql/clickhouse applied, whichever test ran
    first on this worker."""
    from cdc_consumer import migrations
    from cdc_consumer.clickhouse import connect

    transport = connect(clickhouse_server.url)
    try:
        migrations.migrate_clickhouse(transport, migrations.SQL_ROOT / "clickhouse")
    finally:
        transport.close()
    return clickhouse_server


@pytest.fixture
def merges_stopped(clickhouse_migrated: ClickHouseServer) -> Iterator[ClickHouseServer]:
    """event_log does not merge during the test, so a ReplacingMergeTree cannot fold a
    duplicate away before `count()` sees it. Without merges every insert adds a part, and past
    `parts_to_delay_insert` ClickHouse would slow each insert down: the thresholds are lifted
    for the test (a test of a thousand inserts would otherwise measure the throttle)."""
    clickhouse_server = clickhouse_migrated
    url = clickhouse_server.url
    clickhouse_command(url, "SYSTEM STOP MERGES event_log")
    clickhouse_command(
        url,
        "ALTER TABLE event_log MODIFY SETTING parts_to_delay_insert = 1000000,"
        " parts_to_throw_insert = 1000000",
    )
    try:
        yield clickhouse_server
    finally:
        clickhouse_command(
            url, "ALTER TABLE event_log RESET SETTING parts_to_delay_insert, parts_to_throw_insert"
        )
        clickhouse_command(url, "SYSTEM START MERGES event_log")


_GRANULES = re.compile(r"Parts: \d+ \| Granules: (\d+)")


def granules_read(plan: list[list[Any]], table: str = "event_log") -> int:
    """Granules of `table` an `EXPLAIN indexes = 1` plan reads once every index is applied."""
    lines = [str(row[0]) for row in plan]
    for n, line in enumerate(lines):
        if "ReadFromMergeTree" in line and f"{table})" in line:
            for following in lines[n : n + 4]:
                match = _GRANULES.search(following)
                if match:
                    return int(match.group(1))
    pytest.fail(f"the plan reads no {table}:\n" + "\n".join(lines))
