"""The pure pieces of cdc_consumer/clickhouse.py: what a failed request means."""

from __future__ import annotations

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from cdc_consumer.clickhouse import sink_failure
from cdc_consumer.errors import Policy, policy_for

_SERVER = "Received ClickHouse exception, code: {code}, server response: Code: {code}."
_NGINX_413 = (
    "HTTP driver received HTTP status 413, server response: <html>\r\n"
    "<head><title>413 Request Entity Too Large</title></head>\r\n"
)


def _server_error(code: int, message: str) -> DatabaseError:
    """A ClickHouse error as clickhouse-connect raises it (first line: code and message)."""
    return DatabaseError(f"{_SERVER.format(code=code)} DB::Exception: {message}\nstack trace")


_CASES = {
    # limits an insert fits under by being smaller: halve the batch, never retry the same bytes
    "proxy-413": (DatabaseError(_NGINX_413), Policy.SPLIT),
    "query-too-large": (_server_error(229, "Query is too large (300000 bytes)"), Policy.SPLIT),
    "query-memory": (
        _server_error(241, "Query memory limit exceeded: would use 4 MiB"),
        Policy.SPLIT,
    ),
    "query-memory-before-26": (
        _server_error(241, "Memory limit (for query) exceeded: would use 9.32 GiB"),
        Policy.SPLIT,
    ),
    "partitions": (
        _server_error(252, "Too many partitions for single INSERT block (more than 100)"),
        Policy.SPLIT,
    ),
    # the same codes for the whole server's load: ridden out by retrying, halving adds inserts
    "total-memory": (
        _server_error(241, "(total) memory limit exceeded: would use 28 GiB"),
        Policy.RETRY,
    ),
    "user-memory": (
        _server_error(241, "User memory limit exceeded: would use 8 MiB"),
        Policy.RETRY,
    ),
    "too-many-parts": (_server_error(252, "Too many parts (3001) in table"), Policy.RETRY),
    "proxy-502": (
        DatabaseError("HTTP driver received HTTP status 502, server response: "),
        Policy.RETRY,
    ),
    "unreachable": (OperationalError("HTTPConnectionPool: Max retries exceeded"), Policy.RETRY),
    # rejected rows, and recursion that one row's nesting causes: isolate the row
    "duplicate-path": (_server_error(117, "Duplicate path found: a.b"), Policy.DEAD_LETTER),
    "too-deep-recursion": (_server_error(306, "Stack size too large"), Policy.DEAD_LETTER),
}


@pytest.mark.parametrize(("failure", "policy"), _CASES.values(), ids=_CASES.keys())
def test_each_clickhouse_failure_gets_the_policy_that_can_end_it(
    failure: Exception, policy: Policy
) -> None:
    """Too large splits, load on the whole server retries, rejected rows are dead-lettered."""
    assert policy_for(sink_failure(failure)) is policy
