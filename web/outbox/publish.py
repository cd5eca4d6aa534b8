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

Both run plain SQL on the connection of the chosen alias rather than `Model.save()`: the ORM's
per-row compile and signals cost several times the INSERT itself, and this runs inside every
request that publishes (see docs/benchmarks.md).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypeAlias

import orjson
import sentry_sdk
import uuid6
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

from cdc_consumer.clickhouse import OUTBOX_COLUMNS
from web.outbox.errors import EventPublishError
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
_COLUMNS = OUTBOX_COLUMNS
_INSERT = f"INSERT INTO event_outbox ({', '.join(_COLUMNS)}) VALUES "
_ROW_PLACEHOLDERS = f"({', '.join(['%s'] * len(_COLUMNS))})"
_COPY = f"COPY event_outbox ({', '.join(_COLUMNS)}) FROM STDIN"
# Above this many events one COPY beats a multi-row INSERT (whose text grows with every row
# and is parsed as one statement); below it the INSERT saves COPY's extra round trip.
COPY_THRESHOLD = 100
# orjson (and so the outbox) carries integers in this range; jsonb would take more, but the
# text must be produced first.
_INT_RANGE = range(-(2**63), 2**64)
_NUL_REASON = "contains a NUL character (U+0000), which PostgreSQL text and jsonb reject"
_JSON_SCALARS = (str, int, float, bool, type(None))

# One outbox row, in OUTBOX_COLUMNS order.
OutboxRow: TypeAlias = tuple[uuid.UUID, str, datetime, str, str, int, str | None]


def event_publish(event: Event, *, using: str = DEFAULT_DB_ALIAS) -> uuid.UUID:
    """Insert `event` into the outbox on connection `using`; returns its event_id."""
    trace = sentry_sdk.get_current_span()
    if trace is None:  # tracing off: no span to open (a detached one costs ~0.1 ms)
        row = _outbox_row(event, trace_id=None)
        _insert(using, [row])
        return row[0]
    with trace.start_child(op="outbox.publish", name=event_type_of(event)):
        row = _outbox_row(event, trace_id=trace.trace_id)
        _insert(using, [row])
    return row[0]


def event_publish_many(
    events: Iterable[Event], *, using: str = DEFAULT_DB_ALIAS
) -> list[uuid.UUID]:
    """Insert all `events` in one statement on connection `using`; returns their event_ids.

    Every event is checked before anything is written. Up to COPY_THRESHOLD events go in one
    multi-row INSERT, more in one COPY; either way a single statement, so outside a
    transaction the events still commit or fail together.
    """
    trace = sentry_sdk.get_current_span()
    trace_id = trace.trace_id if trace is not None else None
    rows = [_outbox_row(event, trace_id=trace_id) for event in events]
    if not rows:
        return []
    if trace is None:
        _write_many(using, rows)
    else:
        with trace.start_child(op="outbox.publish_many", name=f"{len(rows)} events"):
            _write_many(using, rows)
    return [row[0] for row in rows]


publish = event_publish
publish_many = event_publish_many


def event_type_of(event: object) -> str:
    """The event type to name in an error, even for something that is not an Event."""
    return str(getattr(event, "event_type", type(event).__name__))


def _outbox_row(event: Event, *, trace_id: str | None) -> OutboxRow:
    cls = type(event)
    key = (getattr(cls, "event_type", ""), getattr(cls, "metadata_version", -1))
    if not isinstance(event, Event) or event_class_get(*key) is not cls:
        raise EventPublishError(
            "not a registered event class: publish instances of an Event subclass",
            event_type=event_type_of(event),
        )
    text = event_context_serialize(event=event, max_bytes=settings.OUTBOX_MAX_CONTEXT_BYTES)
    return (
        uuid6.uuid7(),
        cls.event_type,
        datetime.now(UTC),
        settings.ENVIRONMENT,
        text.decode(),
        cls.metadata_version,
        trace_id,
    )


def _insert(using: str, rows: list[OutboxRow]) -> None:
    sql = _INSERT + ", ".join([_ROW_PLACEHOLDERS] * len(rows))
    with connections[using].cursor() as cursor:
        cursor.execute(sql, [value for row in rows for value in row])


def _write_many(using: str, rows: list[OutboxRow]) -> None:
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


def event_context_serialize(*, event: Event, max_bytes: int) -> bytes:
    """The context as the UTF-8 JSON text to store.

    Declared field types serialise by pydantic's JSON rules (datetime -> ISO 8601, UUID and
    Decimal -> string, set -> list, bytes -> UTF-8 text). Untyped fields (Any, dict, ...) must
    hold JSON already. Raises EventPublishError for anything that has no faithful JSON form,
    that jsonb refuses, or that makes the text longer than `max_bytes`.
    """
    event_type = event.event_type
    for name in event.untyped_fields:
        problem = _first_non_json(name, getattr(event, name))
        if problem is not None:
            raise EventPublishError(problem[1], event_type=event_type, field=problem[0])
    try:
        # warnings="error": a value that does not match its declared type (an event built with
        # model_construct, say) is refused instead of being stored as whatever it happens to be.
        document = event.model_dump(mode="json", warnings="error")
    # PydanticSerializationError and UnicodeDecodeError (bytes that are not UTF-8) are both
    # ValueErrors.
    except ValueError as exc:
        raise EventPublishError(
            f"context does not serialise to JSON: {exc}", event_type=event_type
        ) from exc
    problem = _first_unstorable(document)
    if problem is not None:
        raise EventPublishError(problem[1], event_type=event_type, field=problem[0])
    try:
        text = orjson.dumps(document)
    except orjson.JSONEncodeError as exc:  # nesting deeper than 254 levels
        raise EventPublishError(
            f"context does not serialise to JSON: {exc}", event_type=event_type
        ) from exc
    if len(text) > max_bytes:
        raise EventPublishError(
            f"context is {len(text)} bytes, over OUTBOX_MAX_CONTEXT_BYTES={max_bytes}",
            event_type=event_type,
        )
    return text


def _first_non_json(name: str, value: Any) -> tuple[str, str] | None:
    """The first value of an untyped field that is not already JSON (a set, bytes, an object).

    pydantic would convert these by guessing (a set becomes a list, bytes become text); in an
    audit log the schema, not a guess, should decide, so the field must declare its type.
    """
    stack: list[tuple[tuple[str | int, ...], Any]] = [((name,), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            for key, nested in item.items():
                if not isinstance(key, str):
                    return _dotted(path), f"key {key!r} is not a string (JSON keys are)"
                stack.append(((*path, key), nested))
        elif isinstance(item, list | tuple):
            stack.extend(((*path, index), nested) for index, nested in enumerate(item))
        elif not isinstance(item, _JSON_SCALARS):
            return _dotted(path), (
                f"a {type(item).__name__} has no JSON form; declare the field's type on the "
                "event so its schema says how to store it"
            )
    return None


def _first_unstorable(document: Any) -> tuple[str, str] | None:
    """The first value of a JSON-mode document that jsonb would refuse or orjson would alter.

    orjson writes NaN and Infinity as null (silent data change) and cannot write integers
    beyond 64 bits; PostgreSQL rejects NUL in jsonb (an error inside the caller's transaction).
    Iterative, so a deeply nested context cannot exhaust the stack.
    """
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    return _dotted((*path, key)), _NUL_REASON + " (in a key)"
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            return _dotted(path), f"{value} has no JSON form (JSON has no NaN or Infinity)"
        elif isinstance(value, str) and "\x00" in value:
            return _dotted(path), _NUL_REASON
        elif isinstance(value, int) and value not in _INT_RANGE:
            return _dotted(path), f"{value} is beyond 64 bits; store it as a string"
    return None


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in path)
