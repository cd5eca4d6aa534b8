"""tests/support/engines.py: which servers a run uses, and how a container is configured."""

from __future__ import annotations

import socket
import threading

from tests.support import engines


def test_container_postgres_gets_postgres_conf_as_server_flags():
    """An image's server runs with the repository's postgres.conf, as the embedded one does."""
    flags = engines.postgres_server_flags()
    settings = set(flags[1::2])
    assert flags[0::2] == ["-c"] * (len(flags) // 2)
    assert {"wal_level=logical", "track_commit_timestamp=on"} <= settings
    assert "max_slot_wal_keep_size=10GB" in settings


def test_containers_are_not_used_without_a_docker_engine(monkeypatch):
    """A Docker client with no engine behind it (this build machine) means the embedded engines:
    the check answers no, quickly, rather than failing the run."""
    monkeypatch.delenv("TEST_ENGINES", raising=False)
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")  # nothing listens there
    assert engines.containers_wanted() is False


def test_embedded_engines_can_be_asked_for(monkeypatch):
    """TEST_ENGINES=embedded keeps the embedded engines even where Docker runs (the fault tests
    need the chDB test server's hooks and a PostgreSQL they can restart)."""
    monkeypatch.setenv("TEST_ENGINES", "embedded")
    assert engines.containers_wanted() is False
    monkeypatch.setenv("TEST_CLICKHOUSE_URL", "http://default@ch.internal:8123/default")
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    described = engines.describe()
    assert "clickhouse=external (TEST_CLICKHOUSE_URL)" in described
    assert "postgresql=embedded" in described


def test_a_docker_engine_is_recognised_by_its_ping(monkeypatch):
    """What answers GET /_ping with 200 on DOCKER_HOST is taken for an engine; what refuses
    the connection or answers otherwise is not."""

    def engine_answering(status: bytes) -> bool:
        with socket.create_server(("127.0.0.1", 0)) as server:
            monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{server.getsockname()[1]}")

            def answer() -> None:
                client, _ = server.accept()
                with client:
                    client.recv(256)
                    client.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nOK")

            thread = threading.Thread(target=answer)
            thread.start()
            answered = engines.docker_engine_answers()
            thread.join()
        return answered

    assert engine_answering(b"200 OK") is True
    assert engine_answering(b"404 Not Found") is False
