"""web.outbox.events: the Event base, its derived type and its checks at class definition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
from django.core.management import CommandError, call_command

from web.accounts.events import UserCreated
from web.outbox.errors import EventPublishError
from web.outbox.events import Event, snake_case
from web.outbox.registry import event_class_get, event_classes


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
    with pytest.raises(EventPublishError, match=r"field 'age'.*Extra inputs") as caught:
        UserCreated(email="a@example.com", first_name="A", last_name="B", age=3)  # type: ignore[call-arg]
    assert caught.value.event_type == "user_created"


def test_schema_error_reports_the_first_problem_and_how_many_more():
    """Several misfits: the first is named, the rest counted, none echoing the input."""
    with pytest.raises(EventPublishError, match=r"field 'email'.*\(and 1 more\)") as caught:
        UserCreated(email=1, first_name=["secret"], last_name="B")  # type: ignore[arg-type]
    assert "secret" not in str(caught.value)


def test_every_event_class_is_registered_under_its_type_and_version():
    """Defining a class registers it; the registry lists app and test events alike."""
    assert event_class_get("user_created", 1) is UserCreated
    assert event_class_get("order_placed", 2) is PlacedOrderV2
    assert event_class_get("order_placed", 1) is None
    assert {UserCreated, PlacedOrderV2, RefundedPlacedOrder} <= set(event_classes())


def test_two_classes_claiming_one_type_and_version_are_refused():
    """A second class for an existing (type, version) fails at definition, naming both."""
    with pytest.raises(
        TypeError,
        match=r"claims event_type 'order_placed' metadata_version 2.*"
        r"PlacedOrderV2",
    ):
        type(
            "OtherOrder",
            (Event,),
            {"event_type": "order_placed", "metadata_version": 2, "__module__": __name__},
        )
    assert event_class_get("order_placed", 2) is PlacedOrderV2


def test_a_new_version_of_a_type_is_a_new_registration():
    """The same event_type with another metadata_version is a separate schema."""
    order_v3 = type(
        "PlacedOrderV3",
        (Event,),
        {"event_type": "order_placed", "metadata_version": 3, "__module__": __name__},
    )
    assert event_class_get("order_placed", 3) is order_v3
    assert event_class_get("order_placed", 2) is PlacedOrderV2


def test_untyped_fields_are_found_at_class_definition():
    """Fields typed Any, object or a bare container are the ones publishing checks for JSON."""

    class Mixed(Event):
        event_type = "mixed_untyped_test"
        a: Any
        b: dict[str, Any] | None
        c: dict  # type: ignore[type-arg]
        d: list[int]
        e: set[str]
        f: str

    assert Mixed.untyped_fields == ("a", "b", "c")


def test_event_schemas_command_prints_each_type_and_version(capsys):
    """`manage.py event_schemas` prints the serialisation JSON Schema per (type, version)."""
    call_command("event_schemas", "--type", "order_placed")
    printed = json.loads(capsys.readouterr().out)
    keys = [(s["event_type"], s["metadata_version"]) for s in printed]
    assert ("order_placed", 2) in keys
    [v2] = [s for s in printed if s["metadata_version"] == 2]
    assert v2["class"].endswith("PlacedOrderV2")
    assert v2["schema"]["properties"] == {"order_id": {"title": "Order Id", "type": "string"}}
    assert v2["schema"]["additionalProperties"] is False


def test_event_schemas_command_refuses_an_unknown_type():
    """Asking for a type nobody registered is an error, not an empty list."""
    with pytest.raises(CommandError, match="no registered event type 'nope'"):
        call_command("event_schemas", "--type", "nope")


def test_app_event_modules_are_imported_at_startup(postgres_url):
    """A fresh process knows every app's event types without importing them itself."""
    result = subprocess.run(
        [sys.executable, "manage.py", "event_schemas", "--type", "login_failed", "--skip-checks"],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "DATABASE_URL": postgres_url, "DJANGO_DEBUG": "true"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [s["class"] for s in json.loads(result.stdout)] == ["web.accounts.events.LoginFailed"]
