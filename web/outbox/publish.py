"""`publish` and `publish_many`: events into `event_outbox`, in the caller's transaction.

    with transaction.atomic():
        order = order_create(...)
        publish(OrderPlaced(order_id=str(order.pk), total="9.90"))

Inside `transaction.atomic()` the rows commit or roll back with the business rows, which is
the point of the outbox (inside a nested atomic block, with its savepoint). Outside one,
Django autocommits, so the single statement commits on its own: fine for an event that
records nothing else, wrong for one that must match other writes.

Everything that can be wrong with an event (an unregistered class, a value that does not fit
its schema, a value JSON cannot carry, a NUL character, a context over the size limit) is found
before any SQL: EventPublishError is raised naming the event type and the field, and the
caller's transaction has not been touched. `publish_many` checks every event before writing
any, so a bad one leaves none written.

Both run plain SQL on the Django connection of the chosen alias rather than `Model.save()`:
the ORM's per-row compile and signals made the same INSERT 0.3 ms dearer than all of publish
(0.69 against 0.39 ms p50), and this runs inside every request that publishes (see
docs/benchmarks.md).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeAlias

import sentry_sdk
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from uuid_utils.compat import uuid7

from cdc_consumer.outbox import OUTBOX_COLUMNS, OUTBOX_SCHEMA, OUTBOX_TABLE
from web.outbox.errors import EventPublishError, dotted_path
from web.outbox.events import Event
from web.outbox.registry import event_class_get

__all__ = [
    "EventPublishError",
    "event_context_serialize",
    "event_publish",
    "event_publish_many",
    "publish",
    "publish_many",
]

# What publish writes is exactly what the consumer builds event_log rows from.
_OUTBOX = f"{OUTBOX_SCHEMA}.{OUTBOX_TABLE}"
_INSERT = f"INSERT INTO {_OUTBOX} ({', '.join(OUTBOX_COLUMNS)}) VALUES "
_ROW_PLACEHOLDERS = f"({', '.join(['%s'] * len(OUTBOX_COLUMNS))})"
_COPY = f"COPY {_OUTBOX} ({', '.join(OUTBOX_COLUMNS)}) FROM STDIN"
# From about 10 events one COPY is as fast as a multi-row INSERT and soon twice as fast (the
# INSERT's parameters are bound client-side into one ever longer statement); below it the
# INSERT saves COPY's extra round trip. Measured in docs/benchmarks.md.
COPY_THRESHOLD = 10
_SUSPECT = re.compile(r"\\u0000|NaN|Infinity")
_NUL_REASON = "contains a NUL character (U+0000), which PostgreSQL text and jsonb reject"
_JSON_SCALARS = (str, int, float, bool, type(None))

# One outbox row, in OUTBOX_COLUMNS order.
OutboxRow: TypeAlias = tuple[uuid.UUID, str, datetime, str, str, int, str | None]


def event_publish(event: Event, *, using: str = DEFAULT_DB_ALIAS) -> uuid.UUID:
    """Insert `event` into the outbox on connection `using`; returns its event_id."""
    [event_id] = _publish([event], using=using, op="outbox.publish")
    return event_id


def event_publish_many(
    events: Iterable[Event], *, using: str = DEFAULT_DB_ALIAS
) -> list[uuid.UUID]:
    """Insert all `events` in one statement on connection `using`; returns their event_ids.

    Every event is checked before anything is written. Up to COPY_THRESHOLD events go in one
    multi-row INSERT, more in one COPY; either way a single statement, so outside a
    transaction the events still commit or fail together.
    """
    return _publish(events, using=using, op="outbox.publish_many")


publish = event_publish
publish_many = event_publish_many


def _publish(events: Iterable[Event], *, using: str, op: str) -> list[uuid.UUID]:
    trace = sentry_sdk.get_current_span()
    # Read once per call, not per row: settings lookups add up in a 10,000-event list.
    environment, max_bytes = settings.ENVIRONMENT, settings.OUTBOX_MAX_CONTEXT_BYTES
    trace_id = None if trace is None else trace.trace_id
    rows = [_outbox_row(event, environment, max_bytes, trace_id) for event in events]
    if not rows:
        return []
    if trace is None:  # tracing off: no span to open (a detached one costs ~0.1 ms)
        _write(using, rows)
    else:
        name = rows[0][1] if len(rows) == 1 else f"{len(rows)} events"
        with trace.start_child(op=op, name=name):
            _write(using, rows)
    return [row[0] for row in rows]


def _outbox_row(event: Event, environment: str, max_bytes: int, trace_id: str | None) -> OutboxRow:
    cls = type(event)
    key = (getattr(cls, "event_type", ""), getattr(cls, "metadata_version", -1))
    if not isinstance(event, Event) or event_class_get(*key) is not cls:
        raise EventPublishError(
            "not a registered event class: publish instances of an Event subclass",
            event_type=str(key[0] or cls.__name__),
        )
    text = event_context_serialize(event=event, max_bytes=max_bytes)
    return (
        uuid7(),  # time-ordered and monotonic in this process; Rust-backed, a few µs cheaper
        cls.event_type,
        datetime.now(UTC),
        environment,
        text,
        cls.metadata_version,
        trace_id,
    )


def _insert(using: str, rows: list[OutboxRow]) -> None:
    sql = _INSERT + ", ".join([_ROW_PLACEHOLDERS] * len(rows))
    with connections[using].cursor() as cursor:
        cursor.execute(sql, [value for row in rows for value in row])


def _write(using: str, rows: list[OutboxRow]) -> None:
    if len(rows) <= COPY_THRESHOLD:
        _insert(using, rows)
        return
    connection = connections[using]
    # COPY goes through psycopg's own cursor; keep Django's checks and error translation.
    connection.validate_no_broken_transaction()
    with (
        connection.cursor() as cursor,
        connection.wrap_database_errors,
        cursor.cursor.copy(_COPY) as copy,
    ):
        for row in rows:
            copy.write_row(row)


def event_context_serialize(*, event: Event, max_bytes: int) -> str:
    """The context as the JSON text to store.

    Declared field types serialise by pydantic's JSON rules (datetime -> ISO 8601, UUID and
    Decimal -> string, set -> list, bytes -> UTF-8 text). Untyped fields (Any, dict, ...) must
    hold JSON already. Raises EventPublishError for anything that has no faithful JSON form,
    that jsonb refuses, or that makes the text longer than `max_bytes` (UTF-8 bytes).
    """
    event_type = event.event_type
    for name in event.untyped_fields:
        problem = _first_non_json(name, getattr(event, name))
        if problem is not None:
            raise EventPublishError(problem[1], event_type=event_type, field=problem[0])
    try:
        # warnings="error": a value that does not match its declared type (an event built with
        # model_construct, say) is refused instead of being stored as whatever it happens to be.
        text = event.model_dump_json(warnings="error")
    # PydanticSerializationError (e.g. nesting too deep) and UnicodeDecodeError (bytes that are
    # not UTF-8) are both ValueErrors.
    except ValueError as exc:
        raise EventPublishError(
            f"context does not serialise to JSON: {exc}", event_type=event_type
        ) from exc
    # pydantic escapes NUL as \u0000 and writes non-finite floats as NaN/Infinity tokens. A
    # string may merely contain those letters, so a hit is looked at closely (rarely needed).
    if _SUSPECT.search(text):
        problem = _first_unstorable(event.model_dump(mode="json"))
        if problem is not None:
            raise EventPublishError(problem[1], event_type=event_type, field=problem[0])
    size = len(text) if text.isascii() else len(text.encode())
    if size > max_bytes:
        raise EventPublishError(
            f"context is {size} bytes, over OUTBOX_MAX_CONTEXT_BYTES={max_bytes}",
            event_type=event_type,
        )
    return text


def _first_non_json(name: str, value: Any) -> tuple[str | None, str] | None:
    """The first value of an untyped field that is not already JSON (a set, bytes, an object).

    pydantic would convert these by guessing (a set becomes a list, bytes become text); in an
    audit log the schema, not a guess, should decide, so the field must declare its type.
    """
    for path, item in _nodes((name,), value):
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    return dotted_path(path), f"key {key!r} is not a string (JSON keys are)"
        elif not isinstance(item, (list, tuple, *_JSON_SCALARS)):
            return dotted_path(path), (
                f"a {type(item).__name__} has no JSON form; declare the field's type on the "
                "event so its schema says how to store it"
            )
    return None


def _first_unstorable(document: Any) -> tuple[str | None, str] | None:
    """The first value of a JSON-mode document that is not JSON or that jsonb refuses.

    JSON has no NaN or Infinity, and PostgreSQL rejects NUL in jsonb (an error inside the
    caller's transaction).
    """
    for path, value in _nodes((), document):
        if isinstance(value, dict):
            for key in value:
                if "\x00" in key:
                    return dotted_path((*path, key)), _NUL_REASON + " (in a key)"
        elif isinstance(value, float) and not math.isfinite(value):
            return dotted_path(path), f"{value} has no JSON form (JSON has no NaN or Infinity)"
        elif isinstance(value, str) and "\x00" in value:
            return dotted_path(path), _NUL_REASON
    return None


def _nodes(path: tuple[str | int, ...], value: Any) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every value nested in `value` with its path, a container before its items.

    Iterative, so a deeply nested context cannot exhaust the stack.
    """
    stack = [(path, value)]
    while stack:
        path, value = stack.pop()
        yield path, value
        if isinstance(value, dict):
            stack.extend(((*path, key), item) for key, item in value.items())
        elif isinstance(value, list | tuple):
            stack.extend(((*path, index), item) for index, item in enumerate(value))
