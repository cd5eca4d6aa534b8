"""web.outbox.publish: one call, in the caller's transaction; bad input refused before SQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
import sentry_sdk
from django.contrib.auth.models import User
from django.db import connection, connections, transaction

from web.outbox.events import Event
from web.outbox.models import EventOutbox
from web.outbox.publish import (
    COPY_THRESHOLD,
    EventPublishError,
    event_context_serialize,
    event_publish,
    event_publish_many,
    publish,
    publish_many,
)


class Note(Event):
    text: str


class Anything(Event):
    value: Any


class Payment(Event):
    metadata_version = 3
    payment_id: uuid.UUID
    amount: Decimal
    paid_at: datetime
    tags: set[str]
    receipt: bytes
    ratio: float = 0.5


class _Opaque:
    pass


def _stored(event_id: uuid.UUID) -> dict[str, Any]:
    """The outbox row as PostgreSQL holds it, the context parsed from its jsonb text."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT event_type, metadata_version, environment, event_date_time,"
            " event_context::text, trace_id FROM event_outbox WHERE event_id = %s",
            [event_id],
        )
        row = cursor.fetchone()
    assert row is not None, f"event {event_id} is not in the outbox"
    names = ("event_type", "metadata_version", "environment", "event_date_time", "context")
    return {**dict(zip(names, row[:5], strict=True)), "trace_id": row[5]} | {
        "context": orjson.loads(row[4])
    }


def _outbox_count() -> int:
    return EventOutbox.objects.count()


# --- one call ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_publish_is_one_insert(django_assert_num_queries):
    """One publish is exactly one SQL statement and returns the new event's id."""
    with django_assert_num_queries(1):
        event_id = publish(Note(text="hello"))
    assert isinstance(event_id, uuid.UUID)
    assert EventOutbox.objects.filter(event_id=event_id).count() == 1


@pytest.mark.django_db
def test_positional_and_keyword_calls_are_the_same_function():
    """`publish(event)` and `event_publish(event=...)` are one function; so are the many forms."""
    assert publish is event_publish
    assert publish_many is event_publish_many
    assert _stored(event_publish(event=Note(text="kw")))["context"] == {"text": "kw"}


@pytest.mark.django_db
def test_outbox_row_fields(settings):
    """The row carries type, version, environment, the UTC publish time and a UUIDv7 id."""
    settings.ENVIRONMENT = "staging"
    event = Payment(
        payment_id=uuid.UUID(int=7),
        amount=Decimal("9.90"),
        paid_at=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        tags={"b"},
        receipt=b"r-1",
    )
    before = datetime.now(UTC)
    event_id = publish(event)
    after = datetime.now(UTC)

    stored = _stored(event_id)
    assert event_id.version == 7
    assert (stored["event_type"], stored["metadata_version"]) == ("payment", 3)
    assert stored["environment"] == "staging"
    assert before <= stored["event_date_time"] <= after
    assert stored["event_date_time"].tzinfo is not None
    assert stored["trace_id"] is None  # tracing is off
    assert stored["context"] == {
        "payment_id": "00000000-0000-0000-0000-000000000007",
        "amount": "9.90",
        "paid_at": "2025-01-02T03:04:05.678901Z",
        "tags": ["b"],  # declared as a set: the schema says a list
        "receipt": "r-1",  # declared as bytes: the schema says UTF-8 text
        "ratio": 0.5,
    }


@pytest.mark.django_db
def test_event_ids_are_time_ordered():
    """Successive publishes get increasing UUIDv7 ids, so the primary key grows at its end."""
    ids = [publish(Note(text=str(n))) for n in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5


@pytest.mark.django_db
def test_trace_id_is_the_active_sentry_trace(sentry_events):
    """Inside a traced request the row records its trace id; with no transaction, none."""
    with sentry_sdk.start_transaction(op="http.server", name="POST /api/users/") as trace:
        traced = publish(Note(text="traced"))
        [many] = publish_many([Note(text="traced many")])
    untraced = publish(Note(text="untraced"))
    assert _stored(traced)["trace_id"] == trace.trace_id
    assert _stored(many)["trace_id"] == trace.trace_id
    assert _stored(untraced)["trace_id"] is None
    [sent] = [e for e in sentry_events if e.get("type") == "transaction"]
    assert {"outbox.publish", "outbox.publish_many"} <= {span["op"] for span in sent["spans"]}


# --- publish_many ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_publish_many_small_list_is_one_insert(django_assert_num_queries):
    """A short list is one multi-row INSERT; ids come back in the order of the events."""
    events = [Note(text=f"n{n}") for n in range(3)]
    with django_assert_num_queries(1):
        ids = publish_many(events)
    assert [_stored(event_id)["context"]["text"] for event_id in ids] == ["n0", "n1", "n2"]
    assert ids == sorted(ids)


@pytest.mark.django_db
def test_publish_many_large_list_goes_by_copy():
    """A list longer than COPY_THRESHOLD arrives whole and exact through COPY."""
    count = COPY_THRESHOLD * 5 + 1
    ids = publish_many(Anything(value={"n": n, "s": '\u00e9\U0001f600\\"\t'}) for n in range(count))
    assert len(ids) == count
    rows = EventOutbox.objects.filter(event_id__in=ids).order_by("event_id")
    assert [row.event_context["value"]["n"] for row in rows] == list(range(count))
    assert rows[0].event_context["value"]["s"] == '\u00e9\U0001f600\\"\t'


@pytest.mark.django_db
def test_publish_many_of_nothing_runs_no_sql(django_assert_num_queries):
    """An empty list publishes nothing and touches nothing."""
    with django_assert_num_queries(0):
        assert publish_many([]) == []


@pytest.mark.parametrize("count", [3, COPY_THRESHOLD + 1], ids=["insert", "copy"])
@pytest.mark.django_db
def test_publish_many_refuses_all_when_one_is_bad(count, django_assert_num_queries):
    """One bad event in the list: EventPublishError naming it, and none of the list written."""
    events: list[Event] = [Note(text="ok") for _ in range(count)]
    events[-1] = Anything(value=float("inf"))
    with django_assert_num_queries(0), pytest.raises(EventPublishError, match="'anything'"):
        publish_many(events)
    assert _outbox_count() == 0


# --- transactions (committed for real, observed from another connection) ----------------------


def _visible(pg_conn, *event_ids: uuid.UUID) -> list[bool]:
    return [
        pg_conn.execute("SELECT 1 FROM event_outbox WHERE event_id = %s", (i,)).fetchone()
        is not None
        for i in event_ids
    ]


def _user_visible(pg_conn, username: str) -> bool:
    row = pg_conn.execute("SELECT 1 FROM auth_user WHERE username = %s", (username,)).fetchone()
    return row is not None


@pytest.mark.django_db(transaction=True)
def test_publish_commits_with_the_business_row(committed_outbox, pg_conn):
    """Inside atomic(), the events and the business row become visible together at commit."""
    with transaction.atomic():
        User.objects.create(username="committed@example.com")
        one = publish(Note(text="with user"))
        many = publish_many([Note(text="a"), Note(text="b")])
        assert _visible(pg_conn, one, *many) == [False] * 3
        assert not _user_visible(pg_conn, "committed@example.com")
    assert _visible(pg_conn, one, *many) == [True] * 3
    assert _user_visible(pg_conn, "committed@example.com")


@pytest.mark.django_db(transaction=True)
def test_rollback_leaves_no_trace(committed_outbox, pg_conn):
    """When the caller's transaction rolls back, neither the events nor the business row exist."""
    published: list[uuid.UUID] = []

    def business_step_that_fails() -> None:
        with transaction.atomic():
            User.objects.create(username="rolled-back@example.com")
            published.append(publish(Note(text="never")))
            published.extend(publish_many([Note(text=str(n)) for n in range(COPY_THRESHOLD + 1)]))
            raise RuntimeError("business step failed")

    with pytest.raises(RuntimeError, match="business step failed"):
        business_step_that_fails()
    assert not any(_visible(pg_conn, *published))
    assert not _user_visible(pg_conn, "rolled-back@example.com")


@pytest.mark.django_db(transaction=True)
def test_rolled_back_savepoint_drops_only_its_events(committed_outbox, pg_conn):
    """An event published in a rolled-back savepoint disappears; the outer one survives."""
    inner: list[uuid.UUID] = []

    def inner_step_that_fails() -> None:
        with transaction.atomic():
            inner.append(publish(Note(text="inner")))
            inner.extend(publish_many([Note(text="inner many")] * 2))
            raise RuntimeError("inner step failed")

    with transaction.atomic():
        outer = publish(Note(text="outer"))
        with pytest.raises(RuntimeError, match="inner step failed"):
            inner_step_that_fails()
        after = publish(Note(text="after the savepoint"))
    assert _visible(pg_conn, outer, after) == [True, True]
    assert _visible(pg_conn, *inner) == [False, False, False]


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_each_call_commits_on_its_own(committed_outbox, pg_conn):
    """Without atomic(), Django autocommits: the single statement is visible at once."""
    one = publish(Note(text="autocommit"))
    assert _visible(pg_conn, one) == [True]
    many = publish_many([Note(text=str(n)) for n in range(COPY_THRESHOLD + 1)])
    assert all(_visible(pg_conn, *many))


@pytest.mark.django_db(transaction=True)
def test_rejected_event_leaves_the_transaction_usable(
    committed_outbox, pg_conn, django_assert_num_queries
):
    """A rejected event runs no SQL; the caller's transaction goes on and commits normally."""
    with transaction.atomic():
        User.objects.create(username="survivor@example.com")
        with django_assert_num_queries(0), pytest.raises(EventPublishError):
            publish(Anything(value=float("nan")))
        event_id = publish(Note(text="after the rejection"))
    assert _visible(pg_conn, event_id) == [True]
    assert _user_visible(pg_conn, "survivor@example.com")


@pytest.fixture
def named_alias(django_db_blocker: Any, django_db_setup: None) -> Iterator[str]:
    """A second database alias, `audit`, on the same server (as a project's named DB would be)."""
    connections.settings["audit"] = dict(connections.settings["default"])
    with django_db_blocker.unblock():
        yield "audit"
        connections["audit"].close()
    del connections["audit"]
    del connections.settings["audit"]


def test_named_alias_joins_that_connections_transaction(named_alias, committed_outbox, pg_conn):
    """`using=` publishes on the named connection: its atomic block decides, not default's."""
    ids: dict[str, uuid.UUID] = {}

    def audit_savepoint_that_fails() -> None:
        with transaction.atomic(using=named_alias):
            ids["dropped"] = publish(Note(text="rolled back on audit"), using=named_alias)
            raise RuntimeError("audit savepoint fails")

    def default_transaction_that_fails() -> None:
        with transaction.atomic():
            with transaction.atomic(using=named_alias):
                ids["kept"] = publish(Note(text="on audit"), using=named_alias)
                [ids["kept_many"]] = publish_many([Note(text="many")], using=named_alias)
                with pytest.raises(RuntimeError, match="audit savepoint"):
                    audit_savepoint_that_fails()
            raise RuntimeError("default transaction fails")

    with pytest.raises(RuntimeError, match="default transaction"):
        default_transaction_that_fails()
    kept, kept_many, dropped = ids["kept"], ids["kept_many"], ids["dropped"]
    assert _visible(pg_conn, kept, kept_many, dropped) == [True, True, False]


# --- bad input: refused at the call site, before any SQL ---------------------------------------


def test_context_that_fails_its_schema_names_type_and_field():
    """Building an event with a wrong value raises EventPublishError naming type and field."""
    with pytest.raises(EventPublishError) as caught:
        Payment(
            payment_id="not-a-uuid",  # type: ignore[arg-type]
            amount=Decimal(1),
            paid_at=datetime.now(UTC),
            tags=set(),
            receipt=b"",
        )
    assert (caught.value.event_type, caught.value.field) == ("payment", "payment_id")
    assert "cannot publish 'payment' (field 'payment_id')" in str(caught.value)


@pytest.mark.django_db
def test_context_that_bypassed_validation_is_refused(django_assert_num_queries):
    """An event built without validation (model_construct) whose values misfit is refused."""
    event = Note.model_construct(text=12)
    with django_assert_num_queries(0), pytest.raises(EventPublishError, match="'note'"):
        publish(event)


@pytest.mark.parametrize(
    ("value", "field", "message"),
    [
        (_Opaque(), "value", "_Opaque has no JSON form"),
        ({"ids": {3}}, "value.ids", "set has no JSON form"),
        ([1, b"raw"], "value.1", "bytes has no JSON form"),
        ({1: "int key"}, "value", "key 1 is not a string"),
        (2**64, "value", "beyond 64 bits"),
        (float("nan"), "value", "NaN or Infinity"),
        ({"nested": [1.0, float("-inf")]}, "value.nested.1", "NaN or Infinity"),
        ("a\x00b", "value", "NUL"),
        ({"k": ["ok", "\x00"]}, "value.k.1", "NUL"),
        ({"k\x00": 1}, "value.k\x00", "NUL"),
    ],
    ids=[
        "object",
        "set",
        "bytes",
        "int-key",
        "int-beyond-64-bits",
        "nan",
        "nested-infinity",
        "nul",
        "nested-nul",
        "nul-key",
    ],
)
@pytest.mark.django_db
def test_unstorable_value_is_refused_naming_its_field(
    value, field, message, django_assert_num_queries
):
    """Values JSON or jsonb cannot carry, in an untyped field, are refused naming the field."""
    with django_assert_num_queries(0), pytest.raises(EventPublishError, match=message) as caught:
        publish(Anything(value=value))
    assert (caught.value.event_type, caught.value.field) == ("anything", field)


def test_non_finite_float_in_a_declared_field_is_refused():
    """A declared float accepts NaN (pydantic does); publishing refuses it, naming the field."""
    event = Payment(
        payment_id=uuid.uuid4(),
        amount=Decimal(1),
        paid_at=datetime.now(UTC),
        tags=set(),
        receipt=b"",
        ratio=float("nan"),
    )
    with pytest.raises(EventPublishError, match="NaN") as caught:
        event_context_serialize(event=event, max_bytes=1000)
    assert caught.value.field == "ratio"


def test_nesting_deeper_than_json_carries_is_refused():
    """A context nested beyond orjson's 254 levels is refused, not a crash in the INSERT."""
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(EventPublishError, match="does not serialise"):
        event_context_serialize(event=Anything(value=deep), max_bytes=10_000)


@pytest.mark.django_db
def test_oversize_context_is_refused_before_sql(settings, django_assert_num_queries):
    """A context larger than OUTBOX_MAX_CONTEXT_BYTES is refused, naming size and limit."""
    settings.OUTBOX_MAX_CONTEXT_BYTES = 100
    with (
        django_assert_num_queries(0),
        pytest.raises(EventPublishError, match="over OUTBOX_MAX_CONTEXT_BYTES=100"),
    ):
        publish(Note(text="x" * 100))


def test_size_limit_is_inclusive():
    """A context of exactly the limit passes; one byte more does not."""
    event = Note(text="x" * 89)  # {"text":"…"} is 11 bytes of JSON around the text
    assert len(event_context_serialize(event=event, max_bytes=100)) == 100
    with pytest.raises(EventPublishError):
        event_context_serialize(event=event, max_bytes=99)


@pytest.mark.parametrize("event", [Event(), {"text": "a dict"}], ids=["base", "dict"])
def test_only_event_subclasses_are_published(event):
    """The Event base itself, or anything not an Event, is refused before any SQL."""
    with pytest.raises(EventPublishError, match="not a registered event class"):
        publish(event)


@pytest.mark.django_db
def test_class_whose_type_changed_after_registration_is_refused(monkeypatch):
    """A class no longer registered under its (type, version) is refused (ambiguous rows)."""
    monkeypatch.setattr(Note, "event_type", "renamed_note")
    with pytest.raises(EventPublishError, match=r"'renamed_note'.*not a registered"):
        publish(Note(text="x"))
    assert _outbox_count() == 0
