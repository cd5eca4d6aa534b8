"""The replication connection: slot checks, START_REPLICATION, the COPY BOTH stream, feedback.

Facts this module is built on (PostgreSQL's protocol docs and walsender source):
- The walsender advances a logical slot only from the *flush* field of a standby status update
  ('r'). We send flush = apply = the newest position whose events are durable in ClickHouse,
  never moving backwards.
- We report *write* equal to flush, not the newest position received. A logical walsender that
  has caught up sends an unsolicited keepalive carrying its WAL end only while the client's
  write and flush are both behind it; reporting the received position as written would silence
  those keepalives, and a slot with no outbox traffic could then only advance every
  wal_sender_timeout / 2. (Measured: with write = received, the slot trailed other tables'
  WAL for over 60 s.)
- A keepalive ('k') whose reply flag is set must be answered at once, and status must be sent
  on a timer well inside `wal_sender_timeout`, even while an insert is slow.
- `START_REPLICATION SLOT s LOGICAL 0/0` resumes at the slot's `confirmed_flush_lsn`.
- The walsender speaks only the simple-query protocol: commands carry no parameters, which is
  why slot and publication names are validated identifiers (see settings.py).
- pgoutput converts text to the connection's client_encoding, which defaults to the database's
  encoding, not UTF-8; from a SQL_ASCII database it can only validate, and fails the stream.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from cdc_consumer import postgres
from cdc_consumer.errors import ErrorKind, PipelineError
from cdc_consumer.pgoutput import lsn_to_str, str_to_lsn
from cdc_consumer.sink import SourceIdentity
from cdc_consumer.timeline import WalHistory, parse_history

log = structlog.get_logger(__name__)

# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
_PG_EPOCH_OFFSET_US = 946_684_800_000_000
_XLOG_HEADER = struct.Struct("!QQQ")  # walStart, walEnd, sendTime after the 'w' tag
_KEEPALIVE = struct.Struct("!QQB")  # walEnd, sendTime, replyRequested after the 'k' tag
_STATUS = struct.Struct("!cQQQQB")  # 'r', write, flush, apply, clock, replyRequested


@dataclass(frozen=True, slots=True)
class XLogData:
    """One chunk of WAL: a whole pgoutput message and the server's WAL end when it was sent."""

    wal_start: int
    wal_end: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    reply_requested: bool


def parse_copy_data(data: memoryview) -> XLogData | Keepalive:
    """Frame one CopyData message from the walsender."""
    tag = data[0]
    if tag == 0x77:  # 'w'
        start, end, _sent = _XLOG_HEADER.unpack_from(data, 1)
        return XLogData(start, end, data[25:])
    if tag == 0x6B:  # 'k'
        end, _sent, reply = _KEEPALIVE.unpack_from(data, 1)
        return Keepalive(end, bool(reply))
    raise PipelineError(
        ErrorKind.TRANSIENT_SOURCE,
        f"unexpected replication message tag {bytes(data[:1])!r}",
        hint="the server sent something this consumer does not understand; it reconnects",
    )


def standby_status(*, write: int, flush: int, reply: bool = False) -> bytes:
    """A standby status update ('r'): flush is what the slot may advance to."""
    now_us = time.time_ns() // 1000 - _PG_EPOCH_OFFSET_US
    return _STATUS.pack(b"r", write, flush, flush, now_us, int(reply))


@dataclass(frozen=True, slots=True)
class SlotState:
    confirmed_flush_lsn: int
    active_pid: int | None


class ReplicationStream:
    """Owns one replication connection and the LSN feedback it sends."""

    def __init__(self, conn: psycopg.Connection[Any], slot: str, publication: str) -> None:
        self._conn = conn
        self._slot = slot
        self._publication = publication
        self._sent_flush = 0
        self.last_status_at = 0.0

    @classmethod
    def connect(cls, url: str, slot: str, publication: str) -> ReplicationStream:
        # pgoutput sends text in the connection's client_encoding, by default the database's
        # own: asked for UTF-8, the server converts a LATIN1 (or other) database's text.
        with _source_errors("connect for replication"):
            conn = postgres.connect(
                url, autocommit=True, replication="database", client_encoding="UTF8"
            )
        return cls(conn, slot, publication)

    def slot_state(self) -> SlotState:
        """The slot's confirmed position and holder; refuses to go on if it is missing."""
        with _source_errors("read slot state"):
            row = self._conn.execute(
                "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots"
                f" WHERE slot_name = '{self._slot}'"
            ).fetchone()
        if row is None:
            raise PipelineError(
                ErrorKind.CONFIGURATION,
                f"replication slot {self._slot} does not exist",
                hint="run `python -m cdc_consumer migrate`, which creates the slot (or, if one of"
                " that name shipped before, refuses and names the backfill), or check CDC_SLOT",
            )
        return SlotState(str_to_lsn(str(row[0])), row[1])

    def identify(self) -> tuple[SourceIdentity, WalHistory]:
        """Which PostgreSQL this is, and its WAL history (see `identify`)."""
        return identify(self._conn, self._slot)

    def start(self) -> SlotState:
        """START_REPLICATION from the slot's confirmed position; names who holds it if busy."""
        state = self.slot_state()
        if state.active_pid is not None:
            raise PipelineError(
                ErrorKind.TRANSIENT_SOURCE,
                f"replication slot {self._slot} is active for PID {state.active_pid}",
                hint="another consumer (or a stale walsender) holds the slot; retrying",
            )
        if self._conn.info.parameter_status("server_encoding") == "SQL_ASCII":
            # A SQL_ASCII database stores bytes nobody checked, and asked for UTF-8 the walsender
            # fails on the first that is not, on every reconnect. Take them as stored instead:
            # the pipeline handles what is not UTF-8. (No SQL runs here after this point, so
            # psycopg's bytes-for-text on such a connection never shows.)
            with _source_errors("keep SQL_ASCII text as stored"):
                self._conn.execute("SET client_encoding = 'SQL_ASCII'")
        options = f"proto_version '1', publication_names '{self._publication}', messages 'true'"
        with _source_errors("start replication"):
            self._conn.execute(f"START_REPLICATION SLOT {self._slot} LOGICAL 0/0 ({options})")
        self._sent_flush = state.confirmed_flush_lsn
        log.info("replication started", slot=self._slot, lsn=lsn_to_str(state.confirmed_flush_lsn))
        return state

    def read(self, timeout: float) -> XLogData | Keepalive | None:
        """The next message, or None if none arrived within `timeout` seconds."""
        pgconn = self._conn.pgconn
        try:  # the hot path: no context manager, one libpq call when data is buffered
            size, data = pgconn.get_copy_data(1)
            if size == 0:
                ready, _, _ = select.select([pgconn.socket], [], [], timeout)
                if not ready:
                    return None
                pgconn.consume_input()
                size, data = pgconn.get_copy_data(1)
                if size == 0:
                    return None
        except psycopg.Error as exc:
            raise _source_error("read the replication stream", exc) from exc
        if size < 0 or not isinstance(data, memoryview | bytes):
            message = (pgconn.error_message or b"").decode(errors="replace").strip()
            raise PipelineError(
                ErrorKind.TRANSIENT_SOURCE,
                f"replication stream ended: {message or 'server closed the stream'}",
                hint="PostgreSQL restarted or dropped the connection; reconnecting",
            )
        return parse_copy_data(data if isinstance(data, memoryview) else memoryview(data))

    def send_status(self, *, flush: int, reply: bool = False) -> None:
        """Report `flush` as written, flushed and applied; it never moves backwards."""
        flush = max(self._sent_flush, flush)
        pgconn = self._conn.pgconn
        with _source_errors("send standby status"):
            message = standby_status(write=flush, flush=flush, reply=reply)
            if pgconn.put_copy_data(message) != 1 or pgconn.flush() != 0:
                raise psycopg.OperationalError(pgconn.error_message.decode(errors="replace"))
        self._sent_flush = flush
        self.last_status_at = time.monotonic()

    @property
    def confirmed(self) -> int:
        """The slot's position at START_REPLICATION, or the last flush position sent since
        (a status update that failed to go out does not count)."""
        return self._sent_flush

    def close(self) -> None:
        self._conn.close()


def identify(conn: psycopg.Connection[Any], slot: str) -> tuple[SourceIdentity, WalHistory]:
    """Which PostgreSQL a replication connection reaches (IDENTIFY_SYSTEM's system identifier
    and database) and its WAL history: the timeline, and where it left each ancestor
    (TIMELINE_HISTORY). Refuses a standby."""
    with _source_errors("identify the system"):
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
        assert row is not None  # the command always answers one row
        standby = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if standby is not None and standby[0]:
        # A standby's timeline changes under a walsender that stays connected through its
        # promotion, so rows would be recorded on a timeline they were not read on; and the
        # consumer writes cdc_progress, which a standby cannot.
        raise PipelineError(
            ErrorKind.CONFIGURATION,
            "DATABASE_URL names a standby (the server is in recovery)",
            hint="point DATABASE_URL at the primary",
        )
    identity = SourceIdentity(system_identifier=str(row[0]), database=str(row[3]), slot=slot)
    timeline = int(row[1])
    if timeline == 1:  # the first timeline has no history file
        return identity, WalHistory(timeline)
    with _source_errors("read the timeline history"):
        history = conn.execute(f"TIMELINE_HISTORY {timeline}").fetchone()
    assert history is not None
    content = history[1].decode() if isinstance(history[1], bytes) else str(history[1])
    return identity, parse_history(timeline, content)


def _source_error(doing: str, exc: psycopg.Error) -> PipelineError:
    """A psycopg failure as a transient source error naming what was being done."""
    detail = postgres.first_line(exc)
    busy = "is active for PID" in detail
    return PipelineError(
        ErrorKind.TRANSIENT_SOURCE,
        f"could not {doing}: {detail}",
        hint=(
            "another consumer holds the slot; retrying"
            if busy
            else "check DATABASE_URL and that PostgreSQL is up; reconnecting"
        ),
    )


@contextmanager
def _source_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise _source_error(doing, exc) from exc
