"""The ClickHouse HTTP test server (tests/support/clickhouse_http.py), through clickhouse-connect.

Everything but the fault hooks also holds against a real server (TEST_CLICKHOUSE_URL).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from tests.support.fix_clickhouse import PASSWORD_USER, ClickHouseServer

TIMESTAMPTZ_TEXT = "2026-11-25 07:49:31.12345+00"  # as pgoutput sends timestamptz


@pytest.fixture
def client(clickhouse_server: ClickHouseServer) -> Iterator[Any]:
    with clickhouse_server.client() as client:
        yield client


@pytest.fixture
def table(client: Any) -> Iterator[str]:
    """A fresh MergeTree table (id, context JSON, at DateTime64(6, 'UTC')), dropped afterwards."""
    name = f"http_probe_{uuid.uuid4().hex[:12]}"
    client.command(
        f"CREATE TABLE {name} (id UInt64, context JSON, at DateTime64(6, 'UTC'))"
        " ENGINE = MergeTree ORDER BY id"
    )
    yield name
    client.command(f"DROP TABLE IF EXISTS {name}")


def _row(row_id: int, at: str = "2026-01-01 00:00:00") -> bytes:
    return f'{{"id": {row_id}, "context": {{"n": {row_id}}}, "at": "{at}"}}\n'.encode()


def test_connect_and_select(client: Any) -> None:
    """clickhouse-connect connects (version, timezone, settings probes) and reads Native rows."""
    assert client.server_version
    assert client.query("SELECT 1 AS one, 'x' AS s").result_rows == [(1, "x")]
    assert client.command("SELECT 40 + 2") == 42


def test_raw_insert_json_each_row_round_trips_a_json_column(client: Any, table: str) -> None:
    """raw_insert of JSONEachRow lands in a MergeTree table and a JSON column reads back."""
    body = b'{"id": 1, "context": {"user": {"id": 7}, "tags": ["a"]}, "at": "2026-01-01"}\n'

    summary = client.raw_insert(table, insert_block=body, fmt="JSONEachRow")

    assert summary.written_rows == 1
    rows = client.query(f"SELECT id, context FROM {table}").result_rows
    assert rows == [(1, {"user": {"id": 7}, "tags": ["a"]})]


def test_a_setting_sent_by_the_client_is_applied(clickhouse_server: ClickHouseServer) -> None:
    """The same insert fails with date_time_input_format=basic and succeeds with best_effort."""
    with clickhouse_server.client(settings={"date_time_input_format": "basic"}) as client:
        name = f"http_probe_{uuid.uuid4().hex[:12]}"
        client.command(
            f"CREATE TABLE {name} (at DateTime64(6, 'UTC')) ENGINE = MergeTree ORDER BY at"
        )
        body = f'{{"at": "{TIMESTAMPTZ_TEXT}"}}\n'.encode()
        try:
            with pytest.raises(DatabaseError, match="Cannot parse"):
                client.raw_insert(name, insert_block=body, fmt="JSONEachRow")

            client.raw_insert(
                name,
                insert_block=body,
                settings={"date_time_input_format": "best_effort"},
                fmt="JSONEachRow",
            )

            rows = client.query(f"SELECT toString(at) FROM {name}").result_rows
            assert rows == [("2026-11-25 07:49:31.123450",)]
        finally:
            client.command(f"DROP TABLE IF EXISTS {name}")


def test_an_unknown_setting_fails_the_query(client: Any) -> None:
    """A setting ClickHouse does not know fails with UNKNOWN_SETTING instead of being dropped."""
    with pytest.raises(DatabaseError, match="no_such_setting_xyz") as failure:
        client.query("SELECT 1", settings={"no_such_setting_xyz": "1"})

    assert failure.value.code == 115


def test_an_unknown_setting_fails_an_insert(client: Any, table: str) -> None:
    """An INSERT's settings are checked too: an unknown one fails it and nothing lands."""
    with pytest.raises(DatabaseError, match="no_such_setting_xyz"):
        client.raw_insert(
            table, insert_block=_row(1), settings={"no_such_setting_xyz": "1"}, fmt="JSONEachRow"
        )

    assert client.command(f"SELECT count() FROM {table}") == 0


def test_settings_on_ddl_apply_to_the_query_not_the_table(client: Any, table: str) -> None:
    """The client's settings on CREATE TABLE do not end up as the table's own SETTINGS."""
    ddl = client.command(f"SHOW CREATE TABLE {table}")

    assert "date_time_input_format" not in str(ddl)


def test_statements_without_a_settings_clause_still_reject_unknown_settings(client: Any) -> None:
    """SYSTEM has no SETTINGS clause, yet an unknown setting sent with it fails."""
    client.command("SYSTEM FLUSH LOGS")

    with pytest.raises(DatabaseError, match="no_such_setting_xyz"):
        client.command("SYSTEM FLUSH LOGS", settings={"no_such_setting_xyz": "1"})


def test_wrong_password_is_rejected(clickhouse_server: ClickHouseServer) -> None:
    """A wrong password fails the connection with AUTHENTICATION_FAILED (516)."""
    with pytest.raises(DatabaseError) as failure:
        clickhouse_server.client(password="not-the-password")

    assert failure.value.code == 516


def test_the_password_is_sent(clickhouse_server: ClickHouseServer) -> None:
    """A user with a password connects only when the client sends that password."""
    if not clickhouse_server.embedded:
        pytest.skip("PASSWORD_USER exists only on the chDB test server")
    user, password = PASSWORD_USER

    with clickhouse_server.client(username=user, password=password) as client:
        assert client.command("SELECT 1") == 1
    with pytest.raises(DatabaseError, match="AUTHENTICATION_FAILED"):
        clickhouse_server.client(username=user, password="")


def test_held_insert_waits_until_released(
    clickhouse_faults: ClickHouseServer, client: Any, table: str
) -> None:
    """hold_inserts blocks an INSERT in flight while other queries run; release lets it land."""
    # GIVEN inserts are held and an insert is sent from another thread
    clickhouse_faults.hold_inserts()
    errors: list[BaseException] = []

    def insert() -> None:
        try:
            with clickhouse_faults.client() as writer:
                writer.raw_insert(table, insert_block=_row(1), fmt="JSONEachRow")
        except BaseException as exc:
            errors.append(exc)

    writer_thread = threading.Thread(target=insert)
    writer_thread.start()
    try:
        # WHEN the server reports the insert as held
        clickhouse_faults.wait_for_held_inserts(1)

        # THEN it has not executed, and other queries still run
        assert writer_thread.is_alive()
        assert client.command(f"SELECT count() FROM {table}") == 0
    finally:
        clickhouse_faults.release_inserts()
        writer_thread.join(timeout=30)

    # AND once released it lands
    assert not writer_thread.is_alive()
    assert errors == []
    assert client.command(f"SELECT count() FROM {table}") == 1


def test_kill_query_sync_cancels_a_held_insert_by_query_id(
    clickhouse_faults: ClickHouseServer, client: Any, table: str
) -> None:
    """KILL QUERY WHERE <cond on query_id> SYNC cancels matching held inserts, and only those."""
    # GIVEN two inserts held in flight, with query ids of different prefixes
    clickhouse_faults.hold_inserts()
    outcomes: dict[str, BaseException | None] = {}

    def insert(query_id: str, row_id: int) -> None:
        try:
            with clickhouse_faults.client() as writer:
                writer.raw_insert(
                    table,
                    insert_block=_row(row_id),
                    settings={"query_id": query_id},
                    fmt="JSONEachRow",
                )
            outcomes[query_id] = None
        except BaseException as exc:
            outcomes[query_id] = exc

    threads = [
        threading.Thread(target=insert, args=("cdc-old-1", 1)),
        threading.Thread(target=insert, args=("other-1", 2)),
    ]
    for thread in threads:
        thread.start()
    try:
        clickhouse_faults.wait_for_held_inserts(2)
        # WHEN one prefix is killed; TEST mode names it without killing it first
        listed = client.command("KILL QUERY WHERE startsWith(query_id, 'cdc-old-') TEST")
        client.command("KILL QUERY WHERE startsWith(query_id, 'cdc-old-') SYNC")
        # THEN the killed insert has ended by the time KILL returned; the other is still held
        stats = clickhouse_faults.stats()
        assert (stats["killed_queries"], stats["held_inserts"]) == (1, 1)
    finally:
        clickhouse_faults.release_inserts()
        for thread in threads:
            thread.join(timeout=30)
    assert "cdc-old-1" in str(listed)
    killed = outcomes["cdc-old-1"]
    assert isinstance(killed, DatabaseError)
    assert "QUERY_WAS_CANCELLED" in str(killed)
    assert outcomes["other-1"] is None
    assert client.command(f"SELECT groupArray(id) FROM {table}") == "[2]"
    assert clickhouse_faults.stats()["killed_queries"] == 1


def test_fail_inserts_fails_the_next_inserts_without_executing_them(
    clickhouse_faults: ClickHouseServer, client: Any, table: str
) -> None:
    """fail_inserts(1) makes one INSERT raise a ClickHouse error; the next one succeeds."""
    clickhouse_faults.fail_inserts(1, code=999)

    with pytest.raises(DatabaseError, match="fail_inserts") as failure:
        client.raw_insert(table, insert_block=_row(1), fmt="JSONEachRow")
    client.raw_insert(table, insert_block=_row(2), fmt="JSONEachRow")

    assert failure.value.code == 999
    assert client.command(f"SELECT groupArray(id) FROM {table}") == "[2]"
    stats = clickhouse_faults.stats()
    assert (stats["inserts"], stats["failed_inserts"]) == (1, 1)


def test_stats_count_inserts_and_rows(
    clickhouse_faults: ClickHouseServer, client: Any, table: str
) -> None:
    """stats() counts executed INSERT queries and the rows they wrote."""
    client.raw_insert(table, insert_block=_row(1) + _row(2) + _row(3), fmt="JSONEachRow")
    client.raw_insert(table, insert_block=_row(4), fmt="JSONEachRow")

    stats = clickhouse_faults.stats()

    assert (stats["inserts"], stats["rows_inserted"], stats["failed_inserts"]) == (2, 4, 0)


def test_what_clickhouse_connect_sends_by_default(
    clickhouse_faults: ClickHouseServer, client: Any, table: str
) -> None:
    """Defaults: best_effort dates, gzip replies, raw_insert uncompressed, insert() lz4 chunked."""
    client.query("SELECT 1")
    query = clickhouse_faults.stats()["last_request"]
    client.raw_insert(table, insert_block=_row(1), fmt="JSONEachRow")
    raw_insert = clickhouse_faults.stats()["last_request"]
    client.insert(
        table, [[2, {"n": 2}, "2026-01-01 00:00:00"]], column_names=["id", "context", "at"]
    )
    native_insert = clickhouse_faults.stats()["last_request"]

    assert query["settings"]["date_time_input_format"] == "best_effort"
    assert query["settings"]["cast_string_to_dynamic_use_inference"] == "1"
    assert query["response_encoding"] == "gzip"  # a real server also prefers gzip over lz4
    assert raw_insert["settings"]["date_time_input_format"] == "best_effort"
    assert raw_insert["content_encoding"] is None
    assert native_insert["content_encoding"] == "lz4"
    assert native_insert["transfer_encoding"] == "chunked"
    assert client.command(f"SELECT count() FROM {table}") == 2


def test_binary_insert_holding_a_blank_line_arrives_whole(client: Any) -> None:
    """Native and RowBinary data with 0A 0A bytes (a UUID can hold them) lands exactly."""
    name = f"http_blank_line_{uuid.uuid4().hex[:12]}"
    client.command(f"CREATE TABLE {name} (id UUID, s String) ENGINE = MergeTree ORDER BY id")
    try:
        rows = [
            [uuid.UUID(bytes=b"\x01" * 7 + b"\n\n" + b"\x02" * 7), "two\n\nlines"],
            [uuid.UUID(bytes=b"\n\n" * 8), "\n\n"],
        ]
        client.insert(name, rows, column_names=["id", "s"])  # Native, lz4, chunked
        client.raw_insert(
            name, ["id", "s"], insert_block=b"\n\n" * 8 + b"\x04a\n\nb" + b"\x00" * 16 + b"\x00",
            fmt="RowBinary",
        )  # fmt: skip
        stored = client.query(f"SELECT id, s FROM {name} ORDER BY s").result_rows
    finally:
        client.command(f"DROP TABLE IF EXISTS {name}")
    assert sorted(map(tuple, stored)) == sorted(
        [*map(tuple, rows), (uuid.UUID(bytes=b"\n\n" * 8), "a\n\nb"), (uuid.UUID(int=0), "")]
    )


def test_fail_inserts_with_code_0_answers_as_a_proxy_with_a_bare_status(
    clickhouse_faults: ClickHouseServer, client: Any, table: str
) -> None:
    """fail_inserts(code=0, status=413) answers like a proxy: that status, no ClickHouse code."""
    clickhouse_faults.fail_inserts(1, code=0, status=413)

    with pytest.raises(DatabaseError, match="HTTP status 413") as failure:
        client.raw_insert(table, insert_block=_row(1), fmt="JSONEachRow")
    client.raw_insert(table, insert_block=_row(2), fmt="JSONEachRow")

    assert failure.value.code is None
    assert "Request Entity Too Large" in str(failure.value)
    assert "DB::Exception" not in str(failure.value)
    assert client.command(f"SELECT groupArray(id) FROM {table}") == "[2]"


def test_fail_inserts_can_carry_a_message_and_spare_other_tables(
    clickhouse_faults: ClickHouseServer, client: Any, table: str
) -> None:
    """fail_inserts(table=...) fails only INSERTs into that table, with the message given."""
    other = f"{table}_other"
    client.command(f"CREATE TABLE {other} AS {table}")
    try:
        clickhouse_faults.fail_inserts(1, code=27, message="Cannot parse input", table=other)

        client.raw_insert(table, insert_block=_row(1), fmt="JSONEachRow")
        with pytest.raises(DatabaseError, match="Cannot parse input") as failure:
            client.raw_insert(other, insert_block=_row(2), fmt="JSONEachRow")
        client.raw_insert(other, insert_block=_row(3), fmt="JSONEachRow")

        assert failure.value.code == 27
        assert client.command(f"SELECT groupArray(id) FROM {other}") == "[3]"
    finally:
        client.command(f"DROP TABLE IF EXISTS {other}")
    assert client.command(f"SELECT groupArray(id) FROM {table}") == "[1]"


def test_fail_inserts_over_fails_every_body_above_the_limit_until_reset(
    clickhouse_faults: ClickHouseServer, client: Any, table: str
) -> None:
    """fail_inserts_over(N) fails each INSERT whose body exceeds N bytes; smaller ones run."""
    small, large = _row(1), b"".join(_row(n) for n in range(2, 7))
    # clickhouse-connect sends the INSERT statement (under 100 bytes) ahead of the rows
    clickhouse_faults.fail_inserts_over(len(small) + 100, code=241, message="Query memory limit")

    client.raw_insert(table, insert_block=small, fmt="JSONEachRow")
    for _attempt in range(2):
        with pytest.raises(DatabaseError, match="Query memory limit") as failure:
            client.raw_insert(table, insert_block=large, fmt="JSONEachRow")
        assert failure.value.code == 241
    clickhouse_faults.reset()
    client.raw_insert(table, insert_block=large, fmt="JSONEachRow")

    assert client.command(f"SELECT arraySort(groupArray(id)) FROM {table}") == "[1,2,3,4,5,6]"
