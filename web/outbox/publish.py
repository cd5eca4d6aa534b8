"""`event_publish`: one event, one INSERT into `event_outbox`, in the caller's transaction.

    with transaction.atomic():
        order = order_create(...)
        event_publish(event=OrderPlaced(order_id=str(order.pk), total="9.90"))

Inside `transaction.atomic()` the row commits or rolls back with the business rows, which is
the point of the outbox. Outside one, Django autocommits, so the single INSERT commits on its
own: fine for an event that records nothing else, wrong for one that must match other writes.

Everything that can be wrong with the context (not JSON-serialisable, NaN or Infinity, a NUL
character, too large) is found while serialising, before any SQL: `EventPublishError` is raised
and the caller's transaction has not been touched.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
import sentry_sdk
import uuid6
from django.conf import settings

from web.outbox.events import Event
from web.outbox.models import EventOutbox

__all__ = ["EventPublishError", "event_context_serialize", "event_publish", "publish"]

_NUL_REASON = "contains a NUL character (U+0000), which PostgreSQL jsonb rejects"


class EventPublishError(ValueError):
    """The event cannot be published as given; nothing was written."""

    def __init__(self, reason: str, *, event_type: str, field: str | None = None) -> None:
        where = f" (field {field!r})" if field else ""
        super().__init__(f"cannot publish {event_type!r}{where}: {reason}")
        self.event_type = event_type
        self.field = field


def event_publish(*, event: Event, using: str = "default") -> EventOutbox:
    """Insert `event` into the outbox on connection `using`; returns the saved row."""
    if not isinstance(event, Event) or type(event) is Event:
        raise EventPublishError(
            "expected an instance of an Event subclass",
            event_type=getattr(event, "event_type", type(event).__name__),
        )
    with sentry_sdk.start_span(op="outbox.publish", name=event.event_type):
        document, text = event_context_serialize(
            event=event, max_bytes=settings.OUTBOX_MAX_CONTEXT_BYTES
        )
        row = EventOutbox(
            event_id=uuid6.uuid7(),
            event_type=event.event_type,
            event_date_time=datetime.now(UTC),
            environment=settings.ENVIRONMENT,
            # The checked text itself, not the dict: see OrjsonEncoder. One encode, one INSERT
            # (... RETURNING created_at), and the bytes PostgreSQL parses are the bytes we sized.
            event_context=orjson.Fragment(text),
            metadata_version=event.metadata_version,
        )
        row.save(using=using, force_insert=True)
    row.event_context = document
    return row


publish = event_publish


def event_context_serialize(*, event: Event, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """The context as a JSON-mode document and as the UTF-8 JSON text to store.

    Declared field types serialise by pydantic's JSON rules (datetime -> ISO 8601, UUID and
    Decimal -> string, set -> list, bytes -> UTF-8 text). Raises EventPublishError for anything
    that has no faithful JSON form or that jsonb refuses.
    """
    event_type = event.event_type
    try:
        document = event.model_dump(mode="json")
    # PydanticSerializationError (an unknown type) and UnicodeDecodeError (bytes that are not
    # UTF-8) are both ValueErrors.
    except ValueError as exc:
        raise EventPublishError(
            f"context is not JSON-serialisable: {exc}", event_type=event_type
        ) from exc
    problem = _first_unstorable(document)
    if problem is not None:
        field, reason = problem
        raise EventPublishError(reason, event_type=event_type, field=field)
    try:
        text = orjson.dumps(document)
    except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits, nesting > 254
        raise EventPublishError(
            f"context is not JSON-serialisable: {exc}", event_type=event_type
        ) from exc
    if len(text) > max_bytes:
        raise EventPublishError(
            f"context is {len(text)} bytes, over OUTBOX_MAX_CONTEXT_BYTES={max_bytes}",
            event_type=event_type,
        )
    return document, text


def _first_unstorable(document: Any) -> tuple[str, str] | None:
    """The first value of a JSON-mode document that jsonb would refuse or orjson would alter.

    orjson writes NaN and Infinity as null (silent data change) and PostgreSQL rejects the
    `\\u0000` escape in jsonb (an error inside the caller's transaction), so both are caught here.
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
    return None


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in path)
