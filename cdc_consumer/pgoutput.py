"""Pure decoder for PostgreSQL's pgoutput logical replication messages (protocol version 1).

Bytes in, typed messages out: no sockets, no logging, no I/O. The input is one pgoutput message
as PostgreSQL writes it, i.e. the payload of an XLogData (`w`) frame once its 25-byte header is
stripped, or one `data` value from `pg_logical_slot_get_binary_changes(...)`. The wire format is
described in PostgreSQL's "Logical Replication Message Formats": integers are big-endian,
strings are NUL-terminated UTF-8, LSNs and timestamps are 64-bit.

Column values stay as PostgreSQL sent them (`bytes` in the text or binary output format of the
column's type), so a consumer can splice them into its output without a decode/encode round trip.
SQL NULL is `None`; a TOASTed value the server did not resend because it did not change is the
`UNCHANGED_TOAST` sentinel.

Protocol version 1 only: the streaming (`S`, `E`, `c`, `A`) and two-phase messages of later
versions, and the xid field they add to other messages, are rejected as unknown.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias


class PgoutputError(ValueError):
    """A message that is truncated, malformed or of an unknown kind."""


class UnchangedToast(enum.Enum):
    """Type of the `UNCHANGED_TOAST` sentinel (a one-member enum so `is` narrows it for mypy)."""

    UNCHANGED_TOAST = "u"

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = UnchangedToast.UNCHANGED_TOAST

ColumnValue: TypeAlias = bytes | Literal[UnchangedToast.UNCHANGED_TOAST] | None
TupleData: TypeAlias = tuple[ColumnValue, ...]

# Relation.replica_identity values (pg_class.relreplident).
REPLICA_IDENTITY_DEFAULT: Final = "d"
REPLICA_IDENTITY_NOTHING: Final = "n"
REPLICA_IDENTITY_FULL: Final = "f"
REPLICA_IDENTITY_INDEX: Final = "i"

# Truncate.options bits.
TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2

_COLUMN_FLAG_KEY: Final = 1


@dataclass(frozen=True, slots=True)
class Begin:
    """Start of a transaction; `final_lsn` is the LSN of its commit record."""

    final_lsn: int
    commit_time: int  # microseconds since 2000-01-01 00:00 UTC, as sent
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a transaction; confirming `end_lsn` is what makes the slot skip it on restart."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int  # microseconds since 2000-01-01 00:00 UTC, as sent


@dataclass(frozen=True, slots=True)
class Origin:
    """The replication origin a transaction was replayed from."""

    lsn: int  # the commit LSN on the origin server
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    """One published column of a relation."""

    flags: int
    name: str
    type_oid: int
    type_modifier: int  # atttypmod, -1 when the type has none

    @property
    def is_key(self) -> bool:
        return bool(self.flags & _COLUMN_FLAG_KEY)


@dataclass(frozen=True, slots=True)
class Relation:
    """Schema of a relation, sent before the first change to it (and again after it changes)."""

    relation_id: int
    namespace: str  # empty for pg_catalog
    name: str
    replica_identity: str  # one of the REPLICA_IDENTITY_* letters
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    """A non-builtin data type used by a relation that follows."""

    type_id: int
    namespace: str  # empty for pg_catalog
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """A new row of `relation_id`, one value per column of its Relation message."""

    relation_id: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """A changed row: `key` (replica identity changed) or `old` (identity FULL), and `new`."""

    relation_id: int
    old: TupleData | None
    key: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    """A deleted row, identified by its replica identity `key` or its whole `old` tuple."""

    relation_id: int
    old: TupleData | None
    key: TupleData | None


@dataclass(frozen=True, slots=True)
class Truncate:
    """A TRUNCATE of one or more relations; `options` holds the TRUNCATE_* bits."""

    options: int
    relation_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """A `pg_logical_emit_message()` payload; non-transactional ones arrive outside Begin/Commit."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgoutputMessage: TypeAlias = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
)

_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_INSERT_HEAD = struct.Struct(">IBH")  # relation id, 'N', number of columns
_RELATION_TAIL = struct.Struct(">BH")  # replica identity, number of columns
_COLUMN_TYPE = struct.Struct(">Ii")  # type oid, type modifier
_TRUNCATE_HEAD = struct.Struct(">IB")  # number of relations, options
_MESSAGE_HEAD = struct.Struct(">BQ")  # flags, lsn

# Reading past the end surfaces as one of these; plain ValueError carries our own reasons.
_LOW_LEVEL_ERRORS = (IndexError, struct.error, ValueError)

_NEW, _KEY, _OLD = ord("N"), ord("K"), ord("O")


def _error(kind: str, offset: int, exc: Exception) -> PgoutputError:
    if isinstance(exc, UnicodeDecodeError):
        reason = "invalid UTF-8 in a string"
    elif isinstance(exc, IndexError | struct.error):
        reason = "truncated"
    else:
        reason = str(exc)
    return PgoutputError(f"malformed {kind} message at offset {offset}: {reason}")


def _check_end(buf: bytes, end: int) -> None:
    """Require the message to end exactly at `end`."""
    if end > len(buf):
        raise ValueError(f"truncated: needs {end} bytes, has {len(buf)}")
    if end < len(buf):
        raise ValueError(f"{len(buf) - end} unexpected trailing bytes")


def _trailing_error(kind: str, buf: bytes, pos: int) -> PgoutputError:
    return PgoutputError(
        f"malformed {kind} message at offset {pos}: {len(buf) - pos} unexpected trailing bytes"
    )


def _read_string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(0, pos)
    if end < 0:
        raise ValueError("string is not NUL-terminated")
    return buf[pos:end].decode(), end + 1


def _read_tuple(buf: bytes, pos: int, kind: str) -> tuple[TupleData, int]:
    """Read TupleData (Int16 column count, then the columns) at `pos`."""
    try:
        (count,) = _U16.unpack_from(buf, pos)
    except struct.error as exc:
        raise _error(kind, pos, exc) from exc
    return _read_columns(buf, pos + 2, count, kind)


def _read_columns(buf: bytes, pos: int, count: int, kind: str) -> tuple[TupleData, int]:
    """Read `count` TupleData columns at `pos`: the hot path of every Insert, one tight loop."""
    size = len(buf)
    values: list[ColumnValue] = []
    append = values.append
    unpack_length = _U32.unpack_from
    try:
        for _ in range(count):
            # Literal byte values, not module constants: no global lookup per column.
            column_kind = buf[pos]
            if column_kind in (116, 98):  # 't' text or 'b' binary: Int32 length, then bytes
                (length,) = unpack_length(buf, pos + 1)
                pos += 5
                end = pos + length
                if end > size:
                    raise ValueError(f"column value of {length} bytes runs past the end")
                append(buf[pos:end])
                pos = end
            elif column_kind == 110:  # 'n' NULL
                append(None)
                pos += 1
            elif column_kind == 117:  # 'u' unchanged TOASTed value
                append(UNCHANGED_TOAST)
                pos += 1
            else:
                raise ValueError(f"unknown column kind {chr(column_kind)!r}")
    except _LOW_LEVEL_ERRORS as exc:
        raise _error(kind, pos, exc) from exc
    return tuple(values), pos


def _decode_begin(buf: bytes) -> Begin:
    try:
        _check_end(buf, 1 + _BEGIN.size)
        final_lsn, commit_time, xid = _BEGIN.unpack_from(buf, 1)
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Begin", 1, exc) from exc
    return Begin(final_lsn, commit_time, xid)


def _decode_commit(buf: bytes) -> Commit:
    try:
        _check_end(buf, 1 + _COMMIT.size)
        flags, commit_lsn, end_lsn, commit_time = _COMMIT.unpack_from(buf, 1)
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Commit", 1, exc) from exc
    return Commit(flags, commit_lsn, end_lsn, commit_time)


def _decode_origin(buf: bytes) -> Origin:
    pos = 1
    try:
        (lsn,) = _U64.unpack_from(buf, pos)
        pos += 8
        name, pos = _read_string(buf, pos)
        _check_end(buf, pos)
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Origin", pos, exc) from exc
    return Origin(lsn, name)


def _decode_relation(buf: bytes) -> Relation:
    pos = 1
    try:
        (relation_id,) = _U32.unpack_from(buf, pos)
        pos += 4
        namespace, pos = _read_string(buf, pos)
        name, pos = _read_string(buf, pos)
        replica_identity, count = _RELATION_TAIL.unpack_from(buf, pos)
        pos += 3
        columns = []
        for _ in range(count):
            flags = buf[pos]
            column_name, pos = _read_string(buf, pos + 1)
            type_oid, type_modifier = _COLUMN_TYPE.unpack_from(buf, pos)
            pos += 8
            columns.append(Column(flags, column_name, type_oid, type_modifier))
        _check_end(buf, pos)
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Relation", pos, exc) from exc
    return Relation(relation_id, namespace, name, chr(replica_identity), tuple(columns))


def _decode_type(buf: bytes) -> Type:
    pos = 1
    try:
        (type_id,) = _U32.unpack_from(buf, pos)
        pos += 4
        namespace, pos = _read_string(buf, pos)
        name, pos = _read_string(buf, pos)
        _check_end(buf, pos)
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Type", pos, exc) from exc
    return Type(type_id, namespace, name)


def _decode_insert(buf: bytes) -> Insert:
    try:
        relation_id, marker, count = _INSERT_HEAD.unpack_from(buf, 1)
        if marker != _NEW:
            raise ValueError(f"expected 'N' before the new tuple, got {chr(marker)!r}")
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Insert", 1, exc) from exc
    new, pos = _read_columns(buf, 8, count, "Insert")
    if pos != len(buf):
        raise _trailing_error("Insert", buf, pos)
    return Insert(relation_id, new)


def _decode_update(buf: bytes) -> Update:
    pos = 1
    old: TupleData | None = None
    key: TupleData | None = None
    try:
        (relation_id,) = _U32.unpack_from(buf, pos)
        pos += 4
        marker = buf[pos]
        if marker == _KEY:
            key, pos = _read_tuple(buf, pos + 1, "Update")
            marker = buf[pos]
        elif marker == _OLD:
            old, pos = _read_tuple(buf, pos + 1, "Update")
            marker = buf[pos]
        if marker != _NEW:
            raise ValueError(f"expected 'K', 'O' or 'N' before a tuple, got {chr(marker)!r}")
    except PgoutputError:
        raise
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Update", pos, exc) from exc
    new, pos = _read_tuple(buf, pos + 1, "Update")
    if pos != len(buf):
        raise _trailing_error("Update", buf, pos)
    return Update(relation_id, old, key, new)


def _decode_delete(buf: bytes) -> Delete:
    pos = 1
    try:
        (relation_id,) = _U32.unpack_from(buf, pos)
        pos += 4
        marker = buf[pos]
        if marker != _KEY and marker != _OLD:  # noqa: PLR1714  (reads as the protocol does)
            raise ValueError(f"expected 'K' or 'O' before the old tuple, got {chr(marker)!r}")
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Delete", pos, exc) from exc
    values, pos = _read_tuple(buf, pos + 1, "Delete")
    if pos != len(buf):
        raise _trailing_error("Delete", buf, pos)
    if marker == _KEY:
        return Delete(relation_id, None, values)
    return Delete(relation_id, values, None)


def _decode_truncate(buf: bytes) -> Truncate:
    pos = 1
    try:
        count, options = _TRUNCATE_HEAD.unpack_from(buf, pos)
        pos += 5
        _check_end(buf, pos + 4 * count)
        relation_ids = struct.unpack_from(f">{count}I", buf, pos)
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Truncate", pos, exc) from exc
    return Truncate(options, relation_ids)


def _decode_message(buf: bytes) -> Message:
    pos = 1
    try:
        flags, lsn = _MESSAGE_HEAD.unpack_from(buf, pos)
        pos += 9
        prefix, pos = _read_string(buf, pos)
        (length,) = _U32.unpack_from(buf, pos)
        pos += 4
        _check_end(buf, pos + length)
    except _LOW_LEVEL_ERRORS as exc:
        raise _error("Message", pos, exc) from exc
    return Message(bool(flags & 1), lsn, prefix, buf[pos:])


_DECODERS: Final[dict[int, Callable[[bytes], PgoutputMessage]]] = {
    ord("I"): _decode_insert,
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("R"): _decode_relation,
    ord("U"): _decode_update,
    ord("D"): _decode_delete,
    ord("T"): _decode_truncate,
    ord("Y"): _decode_type,
    ord("O"): _decode_origin,
    ord("M"): _decode_message,
}


# Streaming (protocol 2) and two-phase (protocol 3) tags, named in the error to point at the cause.
_LATER_TAGS: Final = frozenset("SEcAbPKrp")


def decode(data: bytes | bytearray | memoryview) -> PgoutputMessage:
    """Decode one pgoutput message; raise PgoutputError if it is not a well-formed v1 message."""
    buf = data if type(data) is bytes else bytes(data)
    try:
        tag = buf[0]
    except IndexError:
        raise PgoutputError("empty message: no tag byte at offset 0") from None
    if tag == 73:  # 'I': the hot path skips the table lookup
        return _decode_insert(buf)
    decoder = _DECODERS.get(tag)
    if decoder is None:
        letter = chr(tag)
        hint = " (a streaming or two-phase message: only protocol version 1 is supported)"
        raise PgoutputError(
            f"unknown message tag {letter!r} at offset 0{hint if letter in _LATER_TAGS else ''}"
        )
    return decoder(buf)


_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_MAX_LSN: Final = 0xFFFF_FFFF_FFFF_FFFF


def lsn_to_str(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints pg_lsn values, e.g. '16/B374D848'."""
    if not 0 <= lsn <= _MAX_LSN:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFF_FFFF:X}"


def str_to_lsn(text: str) -> int:
    """Parse PostgreSQL's pg_lsn text ('16/B374D848') into an integer."""
    match = _LSN_TEXT.fullmatch(text)
    if match is None:
        raise ValueError(f"not an LSN: {text!r}")
    return int(match[1], 16) << 32 | int(match[2], 16)
