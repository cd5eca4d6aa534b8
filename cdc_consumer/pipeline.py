"""The loop that composes replication → decode → batch → sink, with acks, retries and shutdown.

Delivery rule: the flush LSN sent to PostgreSQL is only ever a commit end LSN whose batch the
sink worker reported durable (or, with nothing buffered anywhere, a keepalive's WAL end). A crash
anywhere replays from the last confirmed position; the positions the sink already holds above
it are read once the slot is ours and skipped exactly on the way back in, so the replay doubles
nothing and drops nothing, whatever part of an earlier insert landed.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import FrameType
from typing import TypeVar

import structlog

from cdc_consumer import pgoutput
from cdc_consumer.batch import Batch, BatchBuilder
from cdc_consumer.delivery import SinkWorker, backoff_delay
from cdc_consumer.errors import ErrorKind, PipelineError, Policy, policy_for
from cdc_consumer.event_log import EventLogEncoder
from cdc_consumer.outbox import OUTBOX_TABLE
from cdc_consumer.progress import ProgressRecorder, commit_time_from_pgoutput
from cdc_consumer.replication import Keepalive, ReplicationStream
from cdc_consumer.settings import ConsumerSettings
from cdc_consumer.sink import (
    EventSink,
    SeqRanges,
    SourceIdentity,
    SourcePosition,
    StoredPositions,
    covers,
)
from cdc_consumer.timeline import WalHistory

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

_POLL_SECONDS = 0.2  # upper bound on how long a stop request or a due batch waits
# Messages handled between two rounds of bookkeeping (status, age cut, worker health): at
# ~100k messages/s a burst is ~20 ms, far inside every timer it could delay.
_MESSAGES_PER_BURST = 2000


class StopRequest:
    """Set by SIGTERM/SIGINT. A second signal while stopping exits at once, confirming nothing."""

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def install(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            if self._event.is_set():
                log.warning("second stop signal, exiting without confirming", signal=signum)
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            log.info("stop requested, flushing", signal=signum)
            self._event.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


@dataclass
class _Transaction:
    commit_lsn: int = 0
    next_seq: int = 0
    open: bool = False
    stored: SeqRanges | None = None  # seqs of this transaction the sink already holds


@dataclass
class _Session:
    """State of one replication connection; discarded and rebuilt on reconnect."""

    stream: ReplicationStream
    stored: StoredPositions
    timeline: int  # the server's, recorded with every row it ships
    tx: _Transaction = field(default_factory=_Transaction)
    encoders: dict[int, EventLogEncoder | None] = field(default_factory=dict)


def _undecodable(
    exc: pgoutput.PgoutputError, wal_start: int, settings: ConsumerSettings
) -> PipelineError:
    """A message the decoder cannot read, with how an operator looks at it."""
    return PipelineError(
        ErrorKind.UNDECODABLE_SOURCE,
        f"cannot decode the pgoutput message at {pgoutput.lsn_to_str(wal_start)}: {exc}",
        hint="the slot stays before it; with the consumer stopped, read it with SELECT * FROM"
        f" pg_logical_slot_peek_binary_changes('{settings.cdc_slot}', NULL, 10,"
        f" 'proto_version', '1', 'publication_names', '{settings.cdc_publication}',"
        " 'messages', 'true'); a relation name or message prefix that is not UTF-8 (a"
        " SQL_ASCII database) or a server speaking a newer protocol are the usual causes",
    )


class Pipeline:
    def __init__(self, settings: ConsumerSettings, sink: EventSink, stop: StopRequest) -> None:
        self._settings = settings
        self._sink = sink
        self._stop = stop
        self._builder = BatchBuilder(
            max_rows=settings.cdc_batch_max_rows,
            max_bytes=settings.cdc_batch_max_bytes,
            max_seconds=settings.cdc_batch_max_seconds,
        )
        self._worker = SinkWorker(sink, retry_cap_seconds=settings.cdc_retry_max_seconds)
        self._progress = ProgressRecorder(
            settings.database_url.get_secret_value(), settings.cdc_slot
        )

    def run(self) -> int:
        """Stream until stopped; returns the process exit code."""
        attempt = 0
        while not self._stop.requested:
            try:
                self._stream_once()
                attempt = 0
            except PipelineError as exc:
                fatal = self._worker.fatal
                stopping = next(
                    (e for e in (exc, fatal) if e is not None and policy_for(e) is Policy.STOP),
                    None,
                )
                if stopping is not None:
                    log.error(
                        "pipeline stopped",
                        error=str(stopping),
                        kind=stopping.kind.value,
                        hint=stopping.hint,
                    )
                    self._worker.stop(abort=True)
                    return 2
                attempt += 1
                delay = backoff_delay(attempt, self._settings.cdc_retry_max_seconds)
                log.warning(
                    "superseded, standing by"
                    if exc.kind is ErrorKind.SUPERSEDED
                    else "source failed, reconnecting",
                    error=str(exc),
                    hint=exc.hint,
                    attempt=attempt,
                    retry_in=round(delay, 2),
                )
                # Whatever is queued belongs to the lost connection: the slot replays it to
                # whichever run streams next. This run's next restart read waits until the
                # write already on its way has ended, so it sees it if it landed.
                self._worker.abandon()
                self._await_abandoned()
                self._stop.wait(delay)
        return 0

    def _await_abandoned(self) -> None:
        while not self._worker.idle and not self._stop.requested:
            self._worker.wait_progress(_POLL_SECONDS)

    def _stream_once(self) -> None:
        self._builder.discard()  # the slot replays from its confirmed position
        stream = ReplicationStream.connect(
            self._settings.database_url.get_secret_value(),
            self._settings.cdc_slot,
            self._settings.cdc_publication,
        )
        try:
            # The stream takes no SQL once it is started.
            identity, history = stream.identify()
            # START_REPLICATION makes the slot ours, so no other run of this consumer is alive;
            # only then are its leftover inserts fenced off and what is stored read.
            slot = stream.start()
            stored = self._while_answering(
                stream, lambda: self._restart_read(identity, history, slot.confirmed_flush_lsn)
            )
            session = _Session(stream, stored, history.timeline)
            if stored.untrusted:
                log.warning(
                    "stored positions of another wal history are not skipped",
                    source=self._settings.source,
                    timeline=history.timeline,
                    untrusted_rows=stored.untrusted,
                    hint="event_log holds events read from a primary this server's history"
                    " left before they were replicated (an asynchronous failover): they stay,"
                    " and the events this server has at those positions are shipped;"
                    " docs/runbook-failover.md",
                )
            log.info(
                "streaming",
                slot=self._settings.cdc_slot,
                source=self._settings.source,
                timeline=history.timeline,
                confirmed_lsn=pgoutput.lsn_to_str(slot.confirmed_flush_lsn),
                stored_transactions=stored.transactions,
                stored_rows=stored.rows,
            )
            self._loop(session)
            self._shutdown(session)
        finally:
            stream.close()

    def _restart_read(
        self, identity: SourceIdentity, history: WalHistory, confirmed_lsn: int
    ) -> StoredPositions:
        # The source check first: a consumer pointed at the wrong server, or resuming from a
        # slot that lost events in a failover, must not fence the right run before it is
        # refused.
        self._sink.check_source(identity, history, slot_lsn=confirmed_lsn)
        self._sink.fence_earlier_runs()
        return self._sink.stored_positions(confirmed_lsn, history)

    def _while_answering(self, stream: ReplicationStream, work: Callable[[], _T]) -> _T:
        """Run `work` on a helper thread while this one keeps the walsender answered: the fence
        and the restart read can outlast wal_sender_timeout on a large or busy ClickHouse.
        Leaving the pool waits for the helper, so its fence never overlaps the next
        connection's, also when sending status fails."""
        interval = self._settings.cdc_status_interval_seconds
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="restart-read") as pool:
            future = pool.submit(work)
            while not wait([future], timeout=interval).done:
                stream.send_status(flush=stream.confirmed)
            return future.result()

    def _loop(self, s: _Session) -> None:
        interval = self._settings.cdc_status_interval_seconds
        while not self._stop.requested:
            self._check_worker()
            self._report(s, due_every=interval)
            timeout = min(_POLL_SECONDS, self._builder.seconds_until_due())
            # Drain what is buffered in one go; bookkeeping above runs once per burst.
            for _ in range(_MESSAGES_PER_BURST):
                message = s.stream.read(timeout)
                if message is None:
                    break
                timeout = 0.0
                if isinstance(message, Keepalive):
                    if self._nothing_buffered(s):
                        self._report(s, due_every=interval, flush=message.wal_end)
                    if message.reply_requested:
                        self._report(s, due_every=0)
                else:
                    try:
                        decoded = pgoutput.decode(message.payload)
                    except pgoutput.PgoutputError as exc:
                        raise _undecodable(exc, message.wal_start, self._settings) from exc
                    self._handle(s, decoded)
            batch = self._builder.due()
            if batch is not None:
                self._submit(s, batch)

    def _handle(self, s: _Session, message: pgoutput.PgoutputMessage) -> None:
        if isinstance(message, pgoutput.Insert):
            encoder = s.encoders.get(message.relation_id)
            if encoder is None:
                return  # another table in the publication: not ours to ship
            seq = s.tx.next_seq
            s.tx.next_seq += 1
            if s.tx.stored is not None and covers(s.tx.stored, seq):
                return  # already in ClickHouse before a restart; the slot replayed it
            row = encoder.encode(message.new, SourcePosition(s.tx.commit_lsn, seq))
            for ready in self._builder.add(row):
                self._submit(s, ready)
        elif isinstance(message, pgoutput.Begin):
            stored = s.stored.in_transaction(message.final_lsn)
            s.tx = _Transaction(commit_lsn=message.final_lsn, open=True, stored=stored)
        elif isinstance(message, pgoutput.Commit):
            s.tx.open = False
            batch = self._builder.commit(message.end_lsn, message.commit_time)
            if batch is not None:
                self._submit(s, batch)
        elif isinstance(message, pgoutput.Relation):
            # Re-sent after every schema change: rebuild so columns are found by name again.
            ours = message.name == OUTBOX_TABLE
            s.encoders[message.relation_id] = (
                EventLogEncoder(message, source=self._settings.source, timeline=s.timeline)
                if ours
                else None
            )

    def _submit(self, s: _Session, batch: Batch) -> None:
        """Hand a batch to the sink worker, keeping the walsender answered while it is busy."""
        interval = self._settings.cdc_status_interval_seconds
        while not self._worker.submit(batch, timeout=_POLL_SECONDS):
            self._check_worker()
            self._report(s, due_every=interval)
        # A submit usually waited for the previous batch to land: confirm it now rather than
        # at the end of the burst, so catching up with small batches does not trail the slot.
        self._report(s, due_every=interval)

    def _report(self, s: _Session, *, due_every: float, flush: int | None = None) -> None:
        """Send status when the durable position moved or the interval passed."""
        target = max(self._worker.durable_lsn, flush or 0, s.stream.confirmed)
        overdue = time.monotonic() - s.stream.last_status_at >= due_every
        if target > s.stream.confirmed or overdue:
            s.stream.send_status(flush=target)
            self._record_progress(s)

    def _record_progress(self, s: _Session, *, force: bool = False) -> None:
        """cdc_progress after each status update: the confirmed position, and the commit time
        of the newest transaction the sink holds (read after the send, so it may belong to a
        batch a little past the confirmed position: that batch is in ClickHouse too)."""
        commit_time = self._worker.durable_commit_time
        self._progress.record(
            confirmed_lsn=s.stream.confirmed,
            commit_time=None if commit_time is None else commit_time_from_pgoutput(commit_time),
            force=force,
        )

    def _nothing_buffered(self, s: _Session) -> bool:
        return not s.tx.open and self._builder.is_empty and self._worker.settled

    def _check_worker(self) -> None:
        if self._worker.fatal is not None:
            raise self._worker.fatal

    def _drain_worker(self, deadline: float) -> bool:
        while not self._worker.idle:
            if time.monotonic() >= deadline:
                return False
            self._check_worker()
            self._worker.wait_progress(_POLL_SECONDS)
        return True

    def _shutdown(self, s: _Session) -> None:
        """On a stop request: ship what is committed, confirm it, and leave within the grace."""
        deadline = time.monotonic() + self._settings.cdc_shutdown_grace_seconds
        batch = self._builder.drain_committed()
        if batch is not None:
            while not self._worker.submit(batch, timeout=_POLL_SECONDS):
                if time.monotonic() >= deadline:
                    break
        drained = self._drain_worker(deadline) and self._worker.settled
        self._report(s, due_every=0)
        self._record_progress(s, force=True)
        self._worker.stop(abort=not drained)
        self._progress.close()
        log.info(
            "stopped",
            drained=drained,
            confirmed_lsn=pgoutput.lsn_to_str(s.stream.confirmed),
            batches=self._worker.batches_written,
            rows=self._worker.rows_written,
        )
        if not drained:
            raise SystemExit(1)
