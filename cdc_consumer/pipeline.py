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
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from types import FrameType
from typing import TypeVar

import structlog

from cdc_consumer import pgoutput
from cdc_consumer.batch import Batch, BatchBuilder
from cdc_consumer.delivery import SinkWorker, backoff_delay
from cdc_consumer.errors import ErrorKind, PipelineError, Policy, policy_for
from cdc_consumer.event_log import EventLogEncoder
from cdc_consumer.metrics import OFF, Metrics
from cdc_consumer.outbox import OUTBOX_SCHEMA, OUTBOX_TABLE
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
from cdc_consumer.tracing import BatchTracer

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

_POLL_SECONDS = 0.2  # upper bound on how long a stop request or a due batch waits
# Messages handled between two rounds of bookkeeping (status, age cut, worker health): at
# ~100k messages/s a burst is ~20 ms, far inside every timer it could delay.
_MESSAGES_PER_BURST = 2000


class StopRequest:
    """Set by SIGTERM/SIGINT. A second signal while stopping exits at once, confirming nothing.

    The handler runs between two bytecodes of the main thread, wherever that thread is: inside
    `threading.Event.wait` holding the very lock `Event.set` takes, or inside a log handler's
    write. So it only assigns two attributes, and the main thread logs the request the first
    time it looks (`requested`), and waits by sleeping in short slices."""

    _WAIT_SLICE_SECONDS = 0.05

    def __init__(self) -> None:
        self._signal: int | None = None
        self._requested_at = 0.0
        self._logged = False

    @property
    def requested(self) -> bool:
        if self._signal is None:
            return False
        if not self._logged:
            self._logged = True
            log.info("stop requested, flushing", signal=self._signal)
        return True

    def deadline(self, grace: float) -> float:
        """The monotonic time by which the process must have left: `grace` after the request
        (after now, if none was made)."""
        return (self._requested_at if self._signal is not None else time.monotonic()) + grace

    def wait(self, timeout: float) -> bool:
        """Sleep until a stop is requested or `timeout` passes; True if one was."""
        until = time.monotonic() + timeout
        while not self.requested:
            left = until - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, self._WAIT_SLICE_SECONDS))
        return True

    def install(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            if self._signal is not None:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)  # the second: gone at once, confirming nothing
                return  # (only if the signal is blocked: the first request's time stands)
            self._requested_at = time.monotonic()
            self._signal = signum

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


class _GraceOver(Exception):  # noqa: N818  (a signal between two methods, not an error)
    """The stop's grace ran out while a batch still waited for the sink worker: nothing after
    it may be handed over, and what is not confirmed is left for the slot to replay."""


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
    others: dict[int, pgoutput.Relation] = field(default_factory=dict)  # not the outbox


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


def _not_the_outbox(relation: pgoutput.Relation, settings: ConsumerSettings) -> PipelineError:
    """A table in our publication that is not the outbox: its rows are not ours to drop."""
    name = f"{relation.namespace}.{relation.name}"
    publication = settings.cdc_publication
    return PipelineError(
        ErrorKind.CONFIGURATION,
        f"publication {publication} sends rows of {name}, which is not the outbox"
        f" {OUTBOX_SCHEMA}.{OUTBOX_TABLE}; the slot stays before them",
        hint=f"a partition of the outbox: ALTER PUBLICATION {publication} SET"
        " (publish_via_partition_root = true), then recreate the slot and backfill; a renamed"
        f" outbox: rename it back; a table that is not events: ALTER PUBLICATION {publication}"
        f" DROP TABLE {name}, and add it to CDC_IGNORED_TABLES so the rows already published"
        " (the slot still replays them) are skipped",
    )


class Pipeline:
    def __init__(
        self,
        settings: ConsumerSettings,
        sink: EventSink,
        stop: StopRequest,
        metrics: Metrics = OFF,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._sink = sink
        self._stop = stop
        self._builder = BatchBuilder(
            max_rows=settings.cdc_batch_max_rows,
            max_bytes=settings.cdc_batch_max_bytes,
            max_seconds=settings.cdc_batch_max_seconds,
        )
        self._tracer = BatchTracer.for_settings(settings)  # a no-op unless Sentry traces
        self._worker = SinkWorker(
            sink,
            retry_cap_seconds=settings.cdc_retry_max_seconds,
            metrics=metrics,
            slot=settings.cdc_slot,
            tracer=self._tracer,
        )
        self._progress = ProgressRecorder(
            settings.database_url.get_secret_value(), settings.cdc_slot, metrics=metrics
        )
        # What the exit code reports: the end LSN of the newest commit received, on any
        # connection, against the newest position the slot was confirmed at (the slot's own
        # on every START_REPLICATION, then every flush sent). Above it, events were left for
        # the slot to replay.
        self._received_lsn = 0
        self._confirmed_lsn = 0
        self._streaming_since: float | None = None  # when this connection began streaming

    def run(self) -> int:
        """Stream until stopped; returns the process exit code: 0 when every commit received
        was delivered and confirmed, 1 when some were left for the slot to replay, 2 when the
        policy stopped the pipeline."""
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
                    self._worker.stop(abort=True, deadline=self._grace_deadline())
                    return 2
                # A failure after streaming a while starts the backoff afresh; one right after
                # each START_REPLICATION (a source that flaps) keeps growing it, since every
                # attempt costs a fence and a restart read.
                since, self._streaming_since = self._streaming_since, None
                if (
                    since is not None
                    and time.monotonic() - since >= self._settings.cdc_retry_max_seconds
                ):
                    attempt = 0
                attempt += 1
                self._metrics.retried(exc.kind)
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
        return self._leave()

    def _await_abandoned(self) -> None:
        while not self._worker.idle and not self._stop.requested:
            self._worker.wait_progress(_POLL_SECONDS)

    def _stream_once(self) -> None:
        self._builder.discard()  # the slot replays from its confirmed position
        self._tracer.restart()
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
            self._confirmed_lsn = slot.confirmed_flush_lsn
            stored = self._while_answering(
                stream, lambda: self._restart_read(identity, history, slot.confirmed_flush_lsn)
            )
            if stored is None:
                return  # stopped before streaming: nothing received on this connection
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
            self._streaming_since = time.monotonic()
            log.info(
                "streaming",
                slot=self._settings.cdc_slot,
                source=self._settings.source,
                timeline=history.timeline,
                confirmed_lsn=pgoutput.lsn_to_str(slot.confirmed_flush_lsn),
                stored_transactions=stored.transactions,
                stored_rows=stored.rows,
            )
            self._metrics.streaming(True)
            self._stream_until_stopped(session)
        finally:
            self._metrics.streaming(False)
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

    def _while_answering(self, stream: ReplicationStream, work: Callable[[], _T]) -> _T | None:
        """Run `work` on a helper thread while this one keeps the walsender answered: the fence
        and the restart read can outlast wal_sender_timeout on a large or busy ClickHouse.
        The helper is waited for before this returns or raises, so its fence never overlaps
        the next connection's, also when sending status fails; but not once a stop is
        requested: then this returns None at once, and the helper, a daemon, goes with the
        process whatever its request is waiting for (a ThreadPoolExecutor's thread would hold
        the interpreter's exit until it ended)."""
        future: Future[_T] = Future()

        def helper() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:  # handed to the thread waiting for it
                future.set_exception(exc)

        thread = threading.Thread(target=helper, name="restart-read", daemon=True)
        thread.start()
        interval = self._settings.cdc_status_interval_seconds
        try:
            while not wait([future], timeout=_POLL_SECONDS).done:
                if self._stop.requested:
                    return None
                if time.monotonic() - stream.last_status_at >= interval:
                    stream.send_status(flush=stream.confirmed)
            return future.result()
        finally:
            while thread.is_alive() and not self._stop.requested:
                thread.join(_POLL_SECONDS)

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
                other = s.others.get(message.relation_id)
                if other is not None:  # stop before its row, so before the commit holding it
                    raise _not_the_outbox(other, self._settings)
                return  # a table listed in CDC_IGNORED_TABLES
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
            self._builder.begin(message.commit_time)
        elif isinstance(message, pgoutput.Commit):
            s.tx.open = False
            self._received_lsn = max(self._received_lsn, message.end_lsn)
            batch = self._builder.commit(message.end_lsn, message.commit_time)
            if batch is not None:
                self._submit(s, batch)
        elif isinstance(message, pgoutput.Relation):
            # Re-sent after every schema change: rebuild so columns are found by name again.
            # Not refused here: published through the root, a partition's insert is preceded
            # by a Relation for the partition too, and then by the root's, which it names.
            name = (message.namespace, message.name)
            ours = name == (OUTBOX_SCHEMA, OUTBOX_TABLE)
            s.encoders[message.relation_id] = (
                self._tracer.encoder(message, source=self._settings.source, timeline=s.timeline)
                if ours
                else None
            )
            if ours or name in self._settings.ignored_tables:
                s.others.pop(message.relation_id, None)
            else:
                s.others[message.relation_id] = message

    def _submit(self, s: _Session, batch: Batch) -> None:
        """Hand a batch to the sink worker, keeping the walsender answered while it is busy;
        once a stop's grace is over, give up (`_GraceOver`)."""
        interval = self._settings.cdc_status_interval_seconds
        self._tracer.cut(batch)  # its cdc.batch transaction runs from here to its confirm
        while not self._worker.submit(batch, timeout=_POLL_SECONDS):
            self._check_worker()
            self._report(s, due_every=interval)
            self._check_grace()
        # A submit usually waited for the previous batch to land: confirm it now rather than
        # at the end of the burst, so catching up with small batches does not trail the slot.
        self._report(s, due_every=interval)

    def _report(self, s: _Session, *, due_every: float, flush: int | None = None) -> None:
        """Send status when the durable position moved or the interval passed."""
        target = max(self._worker.durable_lsn, flush or 0, s.stream.confirmed)
        overdue = time.monotonic() - s.stream.last_status_at >= due_every
        if target > s.stream.confirmed or overdue:
            s.stream.send_status(flush=target)
            self._confirmed_lsn = s.stream.confirmed
            self._metrics.confirmed(self._confirmed_lsn)
            self._tracer.confirmed(s.stream.confirmed)
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

    def _check_grace(self) -> None:
        if self._stop.requested and time.monotonic() >= self._grace_deadline():
            raise _GraceOver

    def _grace_deadline(self) -> float:
        return self._stop.deadline(self._settings.cdc_shutdown_grace_seconds)

    def _stream_until_stopped(self, s: _Session) -> None:
        """Stream until a stop request; then ship what is committed and confirm what landed,
        giving up on the rest once the grace is over."""
        try:
            self._loop(s)
            self._ship_committed(s)
        except _GraceOver:
            log.warning(
                "stop grace over, leaving the rest to the slot",
                grace_seconds=self._settings.cdc_shutdown_grace_seconds,
                hint="ClickHouse did not take the last batches in time; the slot replays them"
                " to the next run, which skips whatever of them landed",
            )
        self._report(s, due_every=0)
        self._record_progress(s, force=True)

    def _ship_committed(self, s: _Session) -> None:
        """Hand over what is committed and wait for the sink worker to write it all."""
        interval = self._settings.cdc_status_interval_seconds
        batch = self._builder.drain_committed()
        if batch is not None:
            self._submit(s, batch)
        while not self._worker.idle:
            self._check_worker()
            self._report(s, due_every=interval)
            self._check_grace()
            self._worker.wait_progress(_POLL_SECONDS)

    def _leave(self) -> int:
        """End the sink worker (what it still holds is abandoned) and say, as the exit code,
        whether any commit received is left for the slot to replay. A write still on its way
        at the deadline is not waited for (see `HttpTransport`: the stop never depends on the
        HTTP timeout)."""
        self._worker.stop(abort=True, deadline=self._grace_deadline())
        self._tracer.abandon()  # batches cut but not confirmed: the slot replays them
        self._progress.close()
        abandoned = self._received_lsn > self._confirmed_lsn
        log.info(
            "stopped",
            abandoned=abandoned,
            received_lsn=pgoutput.lsn_to_str(self._received_lsn),
            confirmed_lsn=pgoutput.lsn_to_str(self._confirmed_lsn),
            batches=self._worker.batches_written,
            rows=self._worker.rows_written,
        )
        return 1 if abandoned else 0
