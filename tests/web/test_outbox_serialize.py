"""Property: any JSON-like context either serialises to text that parses back to itself, or is
refused naming the exact path of a value JSON or jsonb cannot carry (NaN, Infinity, NUL)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from web.outbox.errors import EventPublishError
from web.outbox.events import Event
from web.outbox.publish import event_context_serialize


class Loose(Event):
    event_type = "loose_serialise_test"
    value: Any


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
)
# Keys without dots: the field path in an error is dotted, for people, not parsed back.
_KEYS = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="."), max_size=6)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=4),
    max_leaves=20,
)


def _unstorable(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_unstorable(item) for item in value)
    if isinstance(value, dict):
        return any("\x00" in key or _unstorable(item) for key, item in value.items())
    return False


def _at(document: Any, path: str) -> Any:
    """The value at a dotted path as EventPublishError names it ("value.a.0")."""
    for part in path.split("."):
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


@settings(max_examples=500)
@given(_JSON)
def test_context_round_trips_or_is_refused_at_the_offending_path(value):
    """Storable contexts parse back equal; others are refused naming a path to a bad value."""
    event = Loose(value=value)
    if not _unstorable(value):
        text = event_context_serialize(event=event, max_bytes=1 << 20)
        assert json.loads(text) == {"value": value}
        return
    with pytest.raises(EventPublishError) as caught:
        event_context_serialize(event=event, max_bytes=1 << 20)
    field = caught.value.field
    assert field is not None
    assert field.split(".")[0] == "value"
    if "(in a key)" in str(caught.value):
        assert "\x00" in field.rsplit(".", 1)[-1]
    else:
        assert _unstorable(_at({"value": value}, field))
