"""web.outbox.publish: one event, one INSERT, in the caller's transaction; bad input before SQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from django.contrib.auth.models import User
from django.db import connection, transaction

from web.outbox.events import Event
from web.outbox.models import EventOutbox
from web.outbox.publish import EventPublishError, event_context_serialize, event_publish, publish


class Note(Event):
    text: str


class Anything(Event):
    value: Any


class Payment(Event):
    metadata_version = 3
    payment_id: uuid.UUID
    amount: Decimal
    paid_at: datetime
    tags: list[str]


class _Opaque:
    pass


def _stored_context(event_id: uuid.UUID) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT event_context::text FROM event_outbox WHERE event_id = %s", [event_id]
        )
        (text,) = cursor.fetchone()
    return orjson.loads(text)


# --- the happy path -------------------------------------------------------------------------


@pytest.mark.django_db
def test_publish_writes_one_row_in_one_query(django_assert_num_queries):
    """One publish is exactly one SQL statement (INSERT ... RETURNING created_at)."""
    with django_assert_num_queries(1):
        row = event_publish(event=Note(text="hello"))
    assert row.created_at is not None
    assert EventOutbox.objects.filter(event_id=row.event_id).count() == 1


@pytest.mark.django_db
def test_outbox_row_fields(settings):
    """The row carries the type, version, settings' environment, UTC time and a UUIDv7 id."""
    settings.ENVIRONMENT = "staging"
    paid_at = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    event = Payment(
        payment_id=uuid.UUID(int=7), amount=Decimal("9.90"), paid_at=paid_at, tags=["a"]
    )
    before = datetime.now(UTC)
    row = event_publish(event=event)
    after = datetime.now(UTC)

    stored = EventOutbox.objects.get(event_id=row.event_id)
    assert stored.event_type == "payment"
    assert stored.metadata_version == 3
    assert stored.environment == "staging"
    assert stored.event_id.version == 7
    assert stored.event_date_time.utcoffset() == timedelta(0)
    assert before <= stored.event_date_time <= after
    assert stored.event_date_time == row.event_date_time  # microseconds survive the round trip
    expected = {
        "payment_id": "00000000-0000-0000-0000-000000000007",
        "amount": "9.90",
        "paid_at": "2025-01-02T03:04:05.678901Z",
        "tags": ["a"],
    }
    assert stored.event_context == expected
    assert row.event_context == expected
    assert _stored_context(row.event_id) == expected


@pytest.mark.django_db
def test_event_ids_are_time_ordered():
    """Successive publishes get increasing UUIDv7 ids, so the primary key grows at its end."""
    ids = [event_publish(event=Note(text=str(n))).event_id for n in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5


@pytest.mark.django_db
def test_publish_alias_is_event_publish():
    """`publish` is the same function as `event_publish`."""
    assert publish is event_publish


@pytest.mark.django_db
def test_sets_serialise_as_lists():
    """Declared and Any values follow pydantic's JSON rules: a set is stored as a list."""
    row = event_publish(event=Anything(value={"ids": {3}}))
    assert _stored_context(row.event_id) == {"value": {"ids": [3]}}


# --- transactions (committed for real, observed from another connection) ----------------------


def _visible_elsewhere(pg_conn, *, event_id: uuid.UUID, username: str) -> tuple[bool, bool]:
    outbox = pg_conn.execute("SELECT 1 FROM event_outbox WHERE event_id = %s", (event_id,))
    user = pg_conn.execute("SELECT 1 FROM auth_user WHERE username = %s", (username,))
    return outbox.fetchone() is not None, user.fetchone() is not None


@pytest.mark.django_db(transaction=True)
def test_publish_commits_with_the_business_row(committed_outbox, pg_conn):
    """Inside atomic(), the event and the business row become visible together at commit."""
    with transaction.atomic():
        User.objects.create(username="committed@example.com")
        row = event_publish(event=Note(text="with user"))
        seen = _visible_elsewhere(pg_conn, event_id=row.event_id, username="committed@example.com")
        assert seen == (False, False)
    seen = _visible_elsewhere(pg_conn, event_id=row.event_id, username="committed@example.com")
    assert seen == (True, True)


@pytest.mark.django_db(transaction=True)
def test_rollback_leaves_neither(committed_outbox, pg_conn):
    """When the caller's transaction rolls back, neither the event nor the business row exist."""
    published: list[EventOutbox] = []

    def business_step_that_fails() -> None:
        with transaction.atomic():
            User.objects.create(username="rolled-back@example.com")
            published.append(event_publish(event=Note(text="never")))
            raise RuntimeError("business step failed")

    with pytest.raises(RuntimeError, match="business step failed"):
        business_step_that_fails()
    seen = _visible_elsewhere(
        pg_conn, event_id=published[0].event_id, username="rolled-back@example.com"
    )
    assert seen == (False, False)


@pytest.mark.django_db(transaction=True)
def test_rejected_event_leaves_the_transaction_usable(
    committed_outbox, pg_conn, django_assert_num_queries
):
    """A rejected event runs no SQL; the caller's transaction goes on and commits normally."""
    with transaction.atomic():
        User.objects.create(username="survivor@example.com")
        with django_assert_num_queries(0), pytest.raises(EventPublishError):
            event_publish(event=Anything(value=float("nan")))
        row = event_publish(event=Note(text="after the rejection"))
    seen = _visible_elsewhere(pg_conn, event_id=row.event_id, username="survivor@example.com")
    assert seen == (True, True)


# --- bad input: refused before any SQL --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (_Opaque(), "not JSON-serialisable"),
        (b"\xff\xfe", "not JSON-serialisable"),
        (2**64, "not JSON-serialisable"),
        (float("nan"), "NaN or Infinity"),
        ({"nested": [1.0, float("-inf")]}, "NaN or Infinity"),
    ],
    ids=["object", "non-utf8-bytes", "int-beyond-64-bits", "nan", "nested-infinity"],
)
@pytest.mark.django_db
def test_unserialisable_context_is_refused_before_sql(value, message, django_assert_num_queries):
    """A context with no faithful JSON form raises EventPublishError and runs no query."""
    with django_assert_num_queries(0), pytest.raises(EventPublishError, match=message) as caught:
        event_publish(event=Anything(value=value))
    assert caught.value.event_type == "anything"
    assert "'anything'" in str(caught.value)


def test_non_finite_float_names_its_field():
    """The error names the field path of the offending value."""
    event = Anything(value={"nested": [1.0, float("-inf")]})
    with pytest.raises(EventPublishError) as caught:
        event_context_serialize(event=event, max_bytes=1000)
    assert caught.value.field == "value.nested.1"
    assert "(field 'value.nested.1')" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "field"),
    [("a\x00b", "value"), ({"k": ["ok", "\x00"]}, "value.k.1"), ({"k\x00": 1}, "value.k\x00")],
    ids=["value", "nested-value", "key"],
)
@pytest.mark.django_db
def test_nul_character_is_refused_before_sql(value, field, django_assert_num_queries):
    """A NUL character, which jsonb rejects, is refused in values and keys, naming the field."""
    with django_assert_num_queries(0), pytest.raises(EventPublishError, match="NUL") as caught:
        event_publish(event=Anything(value=value))
    assert caught.value.field == field


@pytest.mark.django_db
def test_oversize_context_is_refused_before_sql(settings, django_assert_num_queries):
    """A context larger than OUTBOX_MAX_CONTEXT_BYTES is refused, naming size and limit."""
    settings.OUTBOX_MAX_CONTEXT_BYTES = 100
    with (
        django_assert_num_queries(0),
        pytest.raises(EventPublishError, match="over OUTBOX_MAX_CONTEXT_BYTES=100"),
    ):
        event_publish(event=Note(text="x" * 100))


def test_size_limit_is_inclusive():
    """A context of exactly the limit passes; one byte more does not."""
    event = Note(text="x" * 89)  # {"text":"…"} is 11 bytes of JSON around the text
    document, text = event_context_serialize(event=event, max_bytes=100)
    assert len(text) == 100
    assert document == {"text": "x" * 89}
    with pytest.raises(EventPublishError):
        event_context_serialize(event=event, max_bytes=99)


@pytest.mark.parametrize("event", [Event(), {"text": "a dict"}], ids=["base", "dict"])
def test_only_event_subclasses_are_published(event):
    """The Event base itself, or anything not an Event, is refused before any SQL."""
    with pytest.raises(EventPublishError, match="Event subclass"):
        event_publish(event=event)
