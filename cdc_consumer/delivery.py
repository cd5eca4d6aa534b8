"""The sink worker: writes batches in order on its own thread, retrying until they are durable.

Inserting on a second thread lets the main loop keep decoding the next batch and, above all,
keep answering the walsender while ClickHouse is slow or down. The queue is short, so when the
sink falls behind the main loop stops reading the WAL (PostgreSQL keeps it) and memory stays at
a few batches.

When the source goes away, or another run takes the slot over, what is queued is abandoned
rather than written: the slot replays it to whichever run streams next, and a run that wakes
from a freeze must not write rows its successor is already shipping. The successor's fence
(`EventSink.fence_earlier_runs`) refuses whatever this worker still sends.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from collections.abc import Callable

import structlog

from cdc_consumer.batch import Batch
from cdc_consumer.errors import ErrorKind, PipelineError, Policy, policy_for
from cdc_consumer.metrics import OFF, Metrics
from cdc_consumer.pgoutput import lsn_to_str
from cdc_consumer.sink import EventSink
from cdc_consumer.tracing import BatchTracer

log = structlog.get_logger(__name__)

QUEUE_DEPTH = 1  # batches waiting behind the one being written
_BACKOFF_BASE_SECONDS = 0.2
# Policies carried out by halving the batch until the failing rows are alone.
_HALVING = frozenset({Policy.SPLIT, Policy.DEAD_LETTER})


def backoff_delay(attempt: int, cap: float) -> float:
    """Capped exponential backoff with full jitter (attempt counts from 1)."""
    return random.uniform(0, min(cap, _BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)))  # noqa: S311


class _BatchLogContext:
    """What every line the sink worker writes about a batch carries: `slot`, `batch_id` (this
    run's prefix and the batch's number), `lsn_from` (the position the batch before it
    completed; null for a run's first), `lsn_to` (the one it completes; null when it ends
    inside a transaction split across batches) and `rows`. Bound with structlog's contextvars
    on the worker's thread, so a line's own `rows` (a half being retried) wins."""

    def __init__(self, slot: str | None) -> None:
        self._slot = slot
        self._run = uuid.uuid4().hex[:8]
        self._seq = 0
        self._lsn: int | None = None

    def next(self, batch: Batch) -> dict[str, object]:
        self._seq += 1
        context: dict[str, object] = {
            "batch_id": f"{self._run}-{self._seq}",
            "lsn_from": None if self._lsn is None else lsn_to_str(self._lsn),
            "lsn_to": None if batch.confirm_lsn is None else lsn_to_str(batch.confirm_lsn),
            "rows": len(batch.rows),
        }
        if self._slot is not None:
            context["slot"] = self._slot
        if batch.confirm_lsn is not None:
            self._lsn = batch.confirm_lsn
        return context


class SinkWorker:
    """Owns the sink. `durable_lsn` only ever holds positions whose rows the sink has accepted.

    Retries use an Event wait rather than a retry library's sleep, so a shutdown or `abandon`
    interrupts the backoff at once instead of after the longest wait.
    """

    def __init__(
        self,
        sink: EventSink,
        *,
        retry_cap_seconds: float,
        metrics: Metrics = OFF,
        slot: str | None = None,
        tracer: BatchTracer | None = None,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._tracer = tracer or BatchTracer()  # spans of sampled batches; off by default
        self._retry_cap = retry_cap_seconds
        self._log_context = _BatchLogContext(slot)
        self._queue: queue.Queue[tuple[int, Batch] | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._abort = threading.Event()
        self._wake = threading.Event()  # interrupts a backoff: abort or abandon
        self._generation = 0  # batches of an older generation were abandoned
        # Set when a write met a failure that asks to reconnect: every batch is dropped until
        # the main loop calls `abandon`, so none submitted meanwhile lands (or is confirmed).
        self._refusing = False
        self._progress = threading.Event()
        self._lock = threading.Lock()
        self._durable_lsn = 0
        self._durable_commit_time: int | None = None
        self._fatal: PipelineError | None = None
        self.batches_written = 0
        self.rows_written = 0
        self._thread = threading.Thread(target=self._run, name="sink-writer", daemon=True)
        self._thread.start()

    @property
    def durable_lsn(self) -> int:
        with self._lock:
            return self._durable_lsn

    @property
    def durable_commit_time(self) -> int | None:
        """Commit time (pgoutput microseconds) of the transaction at `durable_lsn`, if known."""
        with self._lock:
            return self._durable_commit_time

    @property
    def fatal(self) -> PipelineError | None:
        """A failure the policy says to stop on; the main loop re-raises it."""
        return self._fatal

    @property
    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    @property
    def settled(self) -> bool:
        """Idle with every batch it was given durable: none dropped, none failed. Only then
        may the slot be confirmed past what the worker holds (a keepalive's WAL end)."""
        return self.idle and self._fatal is None and not self._refusing

    def submit(self, batch: Batch, timeout: float) -> bool:
        """Queue a batch; False if the worker is still busy after `timeout` (backpressure)."""
        try:
            self._queue.put((self._generation, batch), timeout=timeout)
        except queue.Full:
            return False
        return True

    def abandon(self) -> None:
        """Drop what is queued and stop retrying the batch being written; forget a failure
        that asked for this (never one that stops the pipeline). Returns at once: an insert
        already on its way may still land, which the restart read that follows accounts for
        once the worker is `idle` again."""
        with self._lock:
            self._generation += 1
            self._refusing = False
            if self._fatal is not None and policy_for(self._fatal) is not Policy.STOP:
                self._fatal = None
        self._wake.set()

    def wait_progress(self, timeout: float) -> None:
        """Sleep until a batch completes or `timeout` passes."""
        self._progress.wait(timeout)
        self._progress.clear()

    def stop(self, *, abort: bool, deadline: float | None = None) -> bool:
        """Finish queued batches (or abandon them if `abort`) and end the thread, waiting for
        it until `deadline` (a monotonic time; None: as long as it takes). False if the thread
        was still busy then, inside a write that has not returned: it is a daemon and goes
        with the process, and whatever that write lands is found by the next restart read."""

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if abort:
            self._abort.set()
            self._wake.set()
        try:
            self._queue.put(None, timeout=remaining())
        except queue.Full:
            return False  # a batch still waits behind the write in progress
        self._thread.join(remaining())
        return not self._thread.is_alive()

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self._refusing and not self._abort.is_set()

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:
            # A failure no policy knows (a bug here, in a library, in an observability hook):
            # the batch in hand may not have landed, so nothing may be confirmed past it. A
            # thread that simply ended would look idle and settled, and the next keepalive
            # would confirm the slot past that batch.
            log.exception("sink thread failed", error=repr(exc))
            self._fatal = PipelineError(
                ErrorKind.INTERNAL,
                f"the sink thread failed: {exc!r}",
                hint="a bug, not an outage: the consumer stops without confirming what the"
                " thread held, and the restart replays it from the slot's confirmed position",
            )
            self._abort.set()

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                generation, batch = item
                self._wake.clear()  # before the check: an abandon after it wakes the backoff
                if not self._current(generation):
                    continue
                with structlog.contextvars.bound_contextvars(**self._log_context.next(batch)):
                    self._tracer.writing(batch)
                    if batch.rows and not self._deliver(batch.rows, generation):
                        continue
                self.batches_written += 1
                self._metrics.batch_written(batch)
                with self._lock:
                    if generation != self._generation or self._refusing:
                        continue  # landed after all; the next restart read sees it
                    if batch.confirm_lsn is not None:
                        self._durable_lsn = max(self._durable_lsn, batch.confirm_lsn)
                    if batch.commit_time is not None:
                        self._durable_commit_time = batch.commit_time
                self._tracer.durable(batch)
                self._progress.set()
            finally:
                self._queue.task_done()

    def _deliver(self, rows: list[bytes], generation: int) -> bool:
        """Write rows in order. A batch ClickHouse rejects, for rows it refuses or for being too
        large, is halved and the halves written in order, recursively, until each part lands or
        a failing row is alone; that row goes to the dead-letter table. False if aborted or
        abandoned."""
        try:
            return self._retrying(
                lambda: self._sink.write(rows), what="batch", rows=rows, generation=generation
            )
        except PipelineError as exc:
            policy = policy_for(exc)
            if policy not in _HALVING:
                return self._give_up(exc, generation)
            error = str(exc)
            if len(rows) == 1:
                return self._dead_letter(rows, error, generation)
            if policy is Policy.SPLIT:
                log.warning("batch too large, halving", rows=len(rows), error=error, hint=exc.hint)
            else:
                log.warning("batch rejected, isolating bad rows", rows=len(rows), error=error)
            middle = len(rows) // 2
            return self._deliver(rows[:middle], generation) and self._deliver(
                rows[middle:], generation
            )

    def _dead_letter(self, rows: list[bytes], error: str, generation: int) -> bool:
        """Write one row's dead-letter record. If ClickHouse refuses the record as well (too
        large, or a data error), a minimal one without the row text still accounts for the row,
        so the stream moves on; the row text stays in event_outbox. False if aborted."""
        kept = True
        try:
            written = self._retrying(
                lambda: self._sink.write_dead_letters(rows, error),
                what="dead letter",
                rows=rows,
                generation=generation,
            )
        except PipelineError as exc:
            if policy_for(exc) not in _HALVING:
                return self._give_up(exc, generation)
            log.error(
                "dead letter refused, storing a minimal record",
                error=str(exc),
                hint="the row text is left out of event_log_dead_letter; event_outbox has it",
            )
            kept, error = False, f"{error} (its dead-letter record was refused: {exc})"
            try:
                written = self._retrying(
                    lambda: self._sink.write_dead_letters(rows, error, minimal=True),
                    what="minimal dead letter",
                    rows=rows,
                    generation=generation,
                )
            except PipelineError as refused:
                if policy_for(refused) not in _HALVING:
                    return self._give_up(refused, generation)
                # Nothing smaller can be written: the table or what guards it is wrong, and
                # skipping the row would move the slot past an event stored nowhere.
                return self._give_up(
                    PipelineError(
                        ErrorKind.CONFIGURATION,
                        f"event_log_dead_letter refused even a minimal record: {refused}",
                        hint="compare event_log_dead_letter with sql/clickhouse/, check the"
                        " consumer user's constraints and any body size limit before"
                        " ClickHouse; the slot stays before this event",
                    ),
                    generation,
                )
        if written:
            log.error(
                "event dead-lettered",
                error=error,
                row_kept=kept,
                hint="the event is in event_log_dead_letter with why it was refused",
            )
        return written

    def _give_up(self, exc: PipelineError, generation: int) -> bool:
        """Hand a failure the write cannot get past to the main loop: one that asks to
        reconnect abandons what is queued (the slot replays it), any other stops the worker.
        Moot if the batch was abandoned while it was being written."""
        if not self._current(generation):
            return False
        if policy_for(exc) is Policy.RECONNECT:
            with self._lock:
                self._refusing = True  # what is queued, or submitted next, is not written
                self._fatal = exc
        else:
            self._fatal = exc
            self._abort.set()
        self._progress.set()
        return False

    def _retrying(
        self, write: Callable[[], None], *, what: str, rows: list[bytes], generation: int
    ) -> bool:
        """Run `write` until it succeeds, backing off on failures the policy retries; any other
        failure is raised to the caller. False if aborted or abandoned."""
        write = self._tracer.traced(write, what=what, rows=len(rows))
        attempt = 0
        while self._current(generation):
            attempt += 1
            started = time.perf_counter()
            try:
                write()
            except PipelineError as exc:
                policy = policy_for(exc)
                if policy in _HALVING:
                    self._metrics.rejected(exc.kind)  # the caller halves, or dead-letters
                if policy is not Policy.RETRY:
                    raise
                delay = backoff_delay(attempt, self._retry_cap)
                self._metrics.retried(exc.kind)
                log.warning(
                    f"{what} write failed, retrying",
                    rows=len(rows),
                    attempt=attempt,
                    retry_in=round(delay, 2),
                    error=str(exc),
                    hint=exc.hint,
                )
                self._wake.wait(delay)
                continue
            self.rows_written += len(rows)
            nbytes, seconds = sum(len(row) for row in rows), time.perf_counter() - started
            self._metrics.written(what, rows=len(rows), nbytes=nbytes, seconds=seconds)
            log.info(
                f"{what} written",
                rows=len(rows),
                bytes=nbytes,
                attempt=attempt,
                seconds=round(seconds, 3),
            )
            return True
        return False
