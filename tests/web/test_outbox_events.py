"""web.outbox.events: the Event base, its derived type and its checks at class definition."""

from __future__ import annotations

import pydantic
import pytest

from web.accounts.events import UserCreated
from web.outbox.events import Event, snake_case


class HTTPRequestFailed(Event):
    url: str


class PlacedOrderV2(Event):
    event_type = "order_placed"
    metadata_version = 2
    order_id: str


class RefundedPlacedOrder(PlacedOrderV2):
    pass


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("UserCreated", "user_created"),
        ("HTTPRequestFailed", "http_request_failed"),
        ("UserV2Created", "user_v2_created"),
        ("Ping", "ping"),
    ],
)
def test_snake_case(name, expected):
    """Class names become snake_case event types, acronyms kept as one word."""
    assert snake_case(name) == expected


def test_event_type_defaults_to_snake_case_class_name():
    """A subclass without event_type gets its class name in snake_case, version 1."""
    assert UserCreated.event_type == "user_created"
    assert UserCreated.metadata_version == 1
    assert HTTPRequestFailed.event_type == "http_request_failed"


def test_explicit_event_type_and_version_are_kept():
    """A subclass may name its type and version explicitly (e.g. a new schema version)."""
    assert (PlacedOrderV2.event_type, PlacedOrderV2.metadata_version) == ("order_placed", 2)


def test_subclass_derives_its_own_type_but_inherits_version():
    """A subclass of a concrete event does not silently reuse its parent's event_type."""
    assert RefundedPlacedOrder.event_type == "refunded_placed_order"
    assert RefundedPlacedOrder.metadata_version == 2


def test_type_and_version_are_not_context():
    """event_type and metadata_version are class attributes, not fields of the context."""
    event = PlacedOrderV2(order_id="o-1")
    assert event.model_dump() == {"order_id": "o-1"}


@pytest.mark.parametrize("event_type", ["UserCreated", "user-created", "", "1st_event"])
def test_malformed_event_type_fails_at_class_definition(event_type):
    """An explicit event_type that is not snake_case is refused when the class is defined."""
    with pytest.raises(TypeError, match="must be snake_case"):
        type("Bad", (Event,), {"event_type": event_type, "__module__": __name__})


@pytest.mark.parametrize("version", [-1, True, "1", 1.0])
def test_malformed_metadata_version_fails_at_class_definition(version):
    """metadata_version must be a non-negative int (the table has a CHECK for it)."""
    with pytest.raises(TypeError, match="metadata_version"):
        type("Bad", (Event,), {"metadata_version": version, "__module__": __name__})


def test_events_are_frozen_and_closed():
    """An event cannot be changed after creation, and unknown fields are errors."""
    event = UserCreated(email="a@example.com", first_name="A", last_name="B")
    with pytest.raises(pydantic.ValidationError):
        event.email = "b@example.com"
    with pytest.raises(pydantic.ValidationError, match="extra"):
        UserCreated(email="a@example.com", first_name="A", last_name="B", age=3)  # type: ignore[call-arg]
