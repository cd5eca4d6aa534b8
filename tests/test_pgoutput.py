"""The pgoutput decoder, on messages captured from a real server (tests/fixtures/pgoutput)."""

from __future__ import annotations

import contextlib
import itertools
import json
import struct
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_consumer.pgoutput import (
    REPLICA_IDENTITY_DEFAULT,
    REPLICA_IDENTITY_FULL,
    TRUNCATE_CASCADE,
    TRUNCATE_RESTART_IDENTITY,
    UNCHANGED_TOAST,
    Begin,
    ColumnValue,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgoutputError,
    PgoutputMessage,
    Relation,
    Truncate,
    Type,
    Update,
    decode,
    lsn_to_str,
    str_to_lsn,
)

FIXTURE = Path(__file__).parent / "fixtures" / "pgoutput" / "messages.json"
ROWS: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["messages"]
RAW: list[bytes] = [bytes.fromhex(row["hex"]) for row in ROWS]

# Type OIDs from pg_type.dat, fixed across PostgreSQL versions.
INT4, INT8, TEXT, NUMERIC, TIMESTAMPTZ, UUID, JSONB = 23, 20, 25, 1700, 1184, 2950, 3802
TAG_CLASSES = {
    "B": Begin,
    "C": Commit,
    "O": Origin,
    "R": Relation,
    "Y": Type,
    "I": Insert,
    "U": Update,
    "D": Delete,
    "T": Truncate,
    "M": Message,
}


def scenario(name: str) -> list[PgoutputMessage]:
    """The decoded messages the capture script recorded for one scenario, in order."""
    messages = [decode(raw) for row, raw in zip(ROWS, RAW, strict=True) if row["scenario"] == name]
    assert messages, f"no fixture messages for scenario {name!r}"
    return messages


M = TypeVar("M", bound=PgoutputMessage)


def only(messages: list[PgoutputMessage], cls: type[M]) -> M:
    """The single message of class `cls` among `messages`."""
    found = [message for message in messages if isinstance(message, cls)]
    assert len(found) == 1, found
    return found[0]


def all_of(cls: type[M]) -> list[tuple[dict[str, Any], M]]:
    """Every captured message of class `cls`, with its fixture row, in capture order."""
    pairs = [(row, decode(raw)) for row, raw in zip(ROWS, RAW, strict=True)]
    return [(row, message) for row, message in pairs if isinstance(message, cls)]


def kinds(messages: list[PgoutputMessage]) -> list[type[PgoutputMessage]]:
    """The classes of `messages`, in order."""
    return [type(message) for message in messages]


def first_of_each_tag() -> list[bytes]:
    """One captured message per tag (the longest, so truncation covers the most fields)."""
    by_tag: dict[int, bytes] = {}
    for raw in RAW:
        if len(raw) > len(by_tag.get(raw[0], b"")):
            by_tag[raw[0]] = raw
    return [by_tag[tag] for tag in sorted(by_tag)]


def encode_insert(relation_id: int, values: tuple[ColumnValue, ...]) -> bytes:
    """Test-local encoder: an Insert message as pgoutput writes it (text format values)."""
    parts = [b"I", struct.pack(">I", relation_id), b"N", struct.pack(">H", len(values))]
    for value in values:
        if value is None:
            parts.append(b"n")
        elif value is UNCHANGED_TOAST:
            parts.append(b"u")
        else:
            parts.append(b"t" + struct.pack(">I", len(value)) + value)
    return b"".join(parts)


# --- captured messages -----------------------------------------------------------------------


def test_fixture_covers_every_message_kind():
    """The capture holds at least one message of every protocol-1 kind."""
    assert {chr(raw[0]) for raw in RAW} == set(TAG_CLASSES)


@pytest.mark.parametrize("raw", RAW, ids=[f"{i}-{row['scenario']}" for i, row in enumerate(ROWS)])
def test_every_captured_message_decodes_to_its_tag_class(raw):
    """Every captured message decodes to the dataclass its tag byte names."""
    assert type(decode(raw)) is TAG_CLASSES[chr(raw[0])]


def test_begin_and_commit_agree_on_lsn_time_and_xid():
    """Begin.final_lsn is Commit.commit_lsn; the commit time and the slot's xid match too."""
    begins, commits = all_of(Begin), all_of(Commit)
    assert len(begins) == len(commits) == 15
    for (row, begin), (_, commit) in zip(begins, commits, strict=True):
        assert begin.final_lsn == commit.commit_lsn
        assert begin.commit_time == commit.commit_time
        assert commit.end_lsn > commit.commit_lsn
        assert commit.flags == 0
        assert begin.xid == int(row["xid"])


def test_commit_end_lsn_is_the_lsn_the_slot_reports_for_it():
    """The slot lists each Commit at its end LSN, formatted as lsn_to_str formats it."""
    for row, commit in all_of(Commit):
        assert lsn_to_str(commit.end_lsn) == row["lsn"]


def test_transactions_follow_each_other_in_lsn_order():
    """Each transaction commits after the previous one ended."""
    commits = [commit for _, commit in all_of(Commit)]
    for earlier, later in itertools.pairwise(commits):
        assert later.commit_lsn >= earlier.end_lsn


def test_relation_carries_names_types_modifiers_and_key_flags():
    """A Relation lists each column's name, type OID, typmod and key flag in table order."""
    relation = only(scenario("insert ascii"), Relation)
    assert (relation.namespace, relation.name) == ("public", "sample")
    assert relation.replica_identity == REPLICA_IDENTITY_DEFAULT
    assert [(c.name, c.type_oid, c.is_key) for c in relation.columns] == [
        ("id", INT8, True),
        ("label", TEXT, False),
        ("doc", JSONB, False),
        ("small", INT4, False),
        ("amount", NUMERIC, False),
        ("note", TEXT, False),
        ("big", TEXT, False),
    ]
    typmods = {c.name: c.type_modifier for c in relation.columns}
    assert typmods["amount"] == (12 << 16 | 2) + 4  # numeric(12, 2): VARHDRSZ + precision/scale
    assert typmods["label"] == -1


def test_relation_with_replica_identity_full_marks_every_column_as_key():
    """Under REPLICA IDENTITY FULL the Relation flags every column as part of the key."""
    relation = only(scenario("insert identity full"), Relation)
    assert relation.name == "audited"
    assert relation.replica_identity == REPLICA_IDENTITY_FULL
    assert all(column.is_key for column in relation.columns)


def test_insert_values_are_the_text_output_of_each_type():
    """An Insert carries each value as its type's text output, as bytes."""
    messages = scenario("insert ascii")
    relation, insert = only(messages, Relation), only(messages, Insert)
    assert insert.relation_id == relation.relation_id
    assert insert.new == (
        b"1",
        b"plain ascii",
        b'{"a": 1, "nested": {"b": [1, 2.5, null]}}',
        b"42",
        b"12345.67",
        b"a note",
        None,
    )


def test_insert_keeps_sql_null_and_multibyte_utf8_including_astral_characters():
    """NULL decodes to None and 2-, 3- and 4-byte UTF-8 (emoji outside the BMP) survive intact."""
    insert = only(scenario("insert nulls and multi-byte utf-8"), Insert)
    row_id, label, doc, small, amount, note, big = insert.new
    assert label is not None
    assert label is not UNCHANGED_TOAST
    assert label.decode() == "héllo wörld 🌍 𝄞 ✓"
    assert doc is not None
    assert doc is not UNCHANGED_TOAST
    assert json.loads(doc) == {"emoji": "🎉", "k": None}
    assert (row_id, small, amount, note, big) == (b"2", b"-7", b"-0.50", None, None)


def test_insert_of_a_toasted_value_sends_it_in_full():
    """An Insert carries a TOASTed value whole, not a pointer."""
    insert = only(scenario("insert toasted"), Insert)
    assert insert.new[-1] == b"toast-" * 500


def test_update_leaving_a_toasted_column_alone_marks_it_unchanged():
    """An Update that does not touch a TOASTed column sends the UNCHANGED_TOAST marker for it."""
    update = only(scenario("update leaving toast unchanged"), Update)
    assert update.old is None
    assert update.key is None
    assert update.new == (b"3", b"toasted, relabelled", b"{}", b"0", b"0.00", None, UNCHANGED_TOAST)


def test_update_changing_the_key_sends_the_old_key_tuple():
    """An Update of the primary key sends a 'K' tuple: old key values, NULL for the rest."""
    update = only(scenario("update changing key"), Update)
    assert update.old is None
    assert update.key == (b"2", None, None, None, None, None, None)
    assert update.new[:2] == (b"20", "héllo wörld 🌍 𝄞 ✓".encode())


def test_delete_under_default_identity_sends_only_the_key():
    """A Delete under the default replica identity sends the key tuple, not the old row."""
    delete = only(scenario("delete by key"), Delete)
    assert delete.old is None
    assert delete.key == (b"1", None, None, None, None, None, None)


def test_update_and_delete_under_identity_full_send_the_old_row():
    """Under REPLICA IDENTITY FULL, Update and Delete carry the whole old row ('O')."""
    update = only(scenario("update identity full"), Update)
    assert update.key is None
    assert update.old == (b"1", b"ada", b"3.14")
    assert update.new == (b"1", b"ada", b"2.71")
    delete = only(scenario("delete identity full"), Delete)
    assert delete.key is None
    assert delete.old == (b"2", b"bob", None)


def test_type_message_precedes_a_relation_using_a_user_defined_type():
    """A column of a CREATE TYPE type is announced by a Type message before its Relation."""
    messages = scenario("insert user-defined type")
    assert kinds(messages) == [Begin, Type, Relation, Insert, Commit]
    type_message = only(messages, Type)
    relation, insert = only(messages, Relation), only(messages, Insert)
    assert (type_message.namespace, type_message.name) == ("public", "mood")
    assert relation.columns[1].type_oid == type_message.type_id
    assert insert.new == (b"1", b"happy")


def test_truncate_lists_relations_and_option_bits():
    """Truncate names every truncated relation and sets the CASCADE/RESTART IDENTITY bits."""
    plain = only(scenario("truncate one"), Truncate)
    assert plain.options == 0
    assert plain.relation_ids == (only(scenario("truncate one"), Relation).relation_id,)
    messages = scenario("truncate two cascade restart identity")
    both = only(messages, Truncate)
    assert both.options == TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY
    relation_ids = [m.relation_id for m in messages if isinstance(m, Relation)]
    assert list(both.relation_ids) == relation_ids
    assert len(relation_ids) == 2


def test_transactional_message_arrives_inside_its_transaction():
    """A transactional pg_logical_emit_message arrives between Begin and Commit with its text."""
    messages = scenario("transactional message")
    assert kinds(messages) == [Begin, Message, Commit]
    message = only(messages, Message)
    assert message.transactional is True
    assert message.prefix == "fixture"
    assert message.content.decode() == "transactional ✓"


def test_non_transactional_message_arrives_alone_with_binary_content():
    """A non-transactional message arrives outside any transaction, content bytes untouched."""
    messages = scenario("non-transactional message")
    assert kinds(messages) == [Message]
    message = only(messages, Message)
    assert message.transactional is False
    assert message.prefix == "fixture"
    assert message.content == b"\x00\x01\x7e\xff"
    assert message.lsn > 0


def test_origin_message_names_the_replication_origin_and_its_lsn():
    """A transaction replayed under a replication origin starts with an Origin message."""
    messages = scenario("insert with origin")
    assert kinds(messages) == [Begin, Origin, Relation, Insert, Commit]
    origin = only(messages, Origin)
    assert origin.name == "fixture_origin"
    assert origin.lsn == str_to_lsn("0/ABCDEF")


def test_outbox_insert_carries_the_contract_columns():
    """An outbox-like Insert decodes to the columns of the event_outbox contract."""
    messages = scenario("outbox insert")
    relation, insert = only(messages, Relation), only(messages, Insert)
    names = [column.name for column in relation.columns]
    values = dict(zip(names, insert.new, strict=True))
    assert [column.type_oid for column in relation.columns][:3] == [UUID, TEXT, TIMESTAMPTZ]
    assert values["event_id"] == b"0193a5c2-7d4e-7b8a-9f1c-2e3d4c5b6a79"
    assert values["event_date_time"] == b"2025-11-25 07:49:31.123456+00"
    assert values["metadata_version"] == b"1"
    context = values["event_context"]
    assert isinstance(context, bytes)
    assert json.loads(context)["order_id"] == 918273


def test_memoryview_and_bytearray_input_decode_like_bytes():
    """decode accepts a memoryview (as psycopg's copy data is) and returns bytes values."""
    raw = next(
        raw
        for row, raw in zip(ROWS, RAW, strict=True)
        if row["scenario"] == "outbox insert" and raw[:1] == b"I"
    )
    framed = memoryview(b"w" + bytes(24) + raw)[25:]  # an XLogData frame with its header skipped
    decoded = decode(framed)
    assert decoded == decode(raw)
    assert isinstance(decoded, Insert)
    assert all(type(value) is bytes for value in decoded.new)
    assert decode(bytearray(raw)) == decoded


# --- malformed input -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", first_of_each_tag(), ids=lambda raw: chr(raw[0]))
def test_every_truncation_of_every_message_kind_raises_pgoutput_error(raw):
    """Cutting a message short anywhere raises PgoutputError, never IndexError or struct.error."""
    for cut in range(len(raw)):
        with pytest.raises(PgoutputError, match=r"offset \d+"):
            decode(raw[:cut])


@pytest.mark.parametrize("raw", first_of_each_tag(), ids=lambda raw: chr(raw[0]))
def test_trailing_bytes_raise_pgoutput_error(raw):
    """Bytes after the end of a message are reported, not silently ignored."""
    with pytest.raises(PgoutputError, match="trailing bytes"):
        decode(raw + b"\x00")


def test_truncation_error_names_the_message_kind():
    """The error for a truncated message names its kind."""
    raw = next(raw for raw in RAW if raw[:1] == b"R")
    with pytest.raises(PgoutputError, match=r"^malformed Relation message at offset \d+"):
        decode(raw[:-3])


def test_unknown_tag_raises_pgoutput_error():
    """A tag byte pgoutput v1 does not send is rejected, naming the tag."""
    with pytest.raises(PgoutputError, match=r"unknown message tag 'Z' at offset 0"):
        decode(b"Z\x00\x00")


def test_streaming_tag_is_rejected_with_a_protocol_hint():
    """A protocol-2 streaming message is rejected with a hint about the protocol version."""
    with pytest.raises(PgoutputError, match="only protocol version 1"):
        decode(b"S" + bytes(8))


def test_empty_buffer_raises_pgoutput_error():
    """An empty buffer is rejected."""
    with pytest.raises(PgoutputError, match="empty message"):
        decode(b"")


def test_unknown_column_kind_raises_pgoutput_error():
    """A column marker other than n/u/t/b is rejected with its offset."""
    raw = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"x"
    with pytest.raises(PgoutputError, match=r"Insert message at offset 8: unknown column kind 'x'"):
        decode(raw)


def test_column_length_past_the_end_raises_pgoutput_error():
    """A column length larger than the remaining buffer is rejected, not silently cut."""
    raw = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"t" + struct.pack(">I", 9)
    with pytest.raises(PgoutputError, match="runs past the end"):
        decode(raw + b"abc")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"I" + struct.pack(">I", 1) + b"X" + struct.pack(">H", 0), "expected 'N'"),
        (b"U" + struct.pack(">I", 1) + b"X" + struct.pack(">H", 0), "expected 'K', 'O' or 'N'"),
        (b"D" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 0), "expected 'K' or 'O'"),
    ],
    ids=["insert", "update", "delete"],
)
def test_wrong_tuple_marker_raises_pgoutput_error(raw, expected):
    """A tuple introduced by the wrong marker byte is rejected."""
    with pytest.raises(PgoutputError, match=expected):
        decode(raw)


def test_invalid_utf8_in_a_name_raises_pgoutput_error():
    """A relation name that is not UTF-8 is rejected as malformed, not as UnicodeDecodeError."""
    raw = b"Y" + struct.pack(">I", 1) + b"public\x00\xff\xfe\x00"
    with pytest.raises(PgoutputError, match="invalid UTF-8"):
        decode(raw)


def test_string_without_terminator_raises_pgoutput_error():
    """A string that runs to the end without its NUL is rejected."""
    with pytest.raises(PgoutputError, match="not NUL-terminated"):
        decode(b"O" + bytes(8) + b"origin")


@given(st.binary(max_size=64))
def test_arbitrary_bytes_either_decode_or_raise_pgoutput_error(data):
    """No input makes decode raise anything but PgoutputError."""
    with contextlib.suppress(PgoutputError):
        decode(data)


# --- round trips -----------------------------------------------------------------------------

column_values = st.one_of(st.binary(max_size=300), st.none(), st.just(UNCHANGED_TOAST))


@given(
    relation_id=st.integers(min_value=0, max_value=2**32 - 1),
    values=st.lists(column_values, max_size=40).map(tuple),
)
def test_insert_round_trips_through_a_test_encoder(relation_id, values):
    """Any tuple of bytes/None/UNCHANGED_TOAST encoded as an Insert decodes back to itself."""
    assert decode(encode_insert(relation_id, values)) == Insert(relation_id, values)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_lsn_text_round_trips(lsn):
    """lsn_to_str and str_to_lsn are inverses over the whole 64-bit range."""
    assert str_to_lsn(lsn_to_str(lsn)) == lsn


def test_lsn_text_uses_postgres_format():
    """LSNs print as PostgreSQL prints pg_lsn: upper-case hex halves without padding."""
    assert lsn_to_str(0x16_B374D848) == "16/B374D848"
    assert lsn_to_str(0) == "0/0"
    assert str_to_lsn("16/b374d848") == 0x16_B374D848


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "G/0", "123456789/0", "1/2/3", " 1/2"])
def test_malformed_lsn_text_raises_value_error(text):
    """Text that is not an LSN is rejected."""
    with pytest.raises(ValueError, match="not an LSN"):
        str_to_lsn(text)


@pytest.mark.parametrize("lsn", [-1, 2**64])
def test_out_of_range_lsn_raises_value_error(lsn):
    """An integer outside the 64-bit range has no LSN text."""
    with pytest.raises(ValueError, match="out of range"):
        lsn_to_str(lsn)
