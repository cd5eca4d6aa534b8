"""Sentry tracing of batches: one `cdc.batch` transaction per batch, never a span per event.

A batch lives on two threads. The main thread decodes and encodes its rows as the WAL arrives
and cuts it; the sink thread inserts it (and dead-letters what ClickHouse refuses); the main
thread then confirms it to PostgreSQL in a standby status update. So the transaction is started
where the batch is cut, with the time its first row was encoded as its start, and finished
where its position is confirmed, the point past which its events are no longer the slot's to
replay. Its spans, each timed once per batch:

- `cdc.decode`: from the batch's first row to its cut, the window in which the main thread
  decoded and encoded its rows (per-row timing would cost per event);
- `cdc.queue`: from the cut until the sink thread takes it (the sink is behind);
- `cdc.insert`, `cdc.dead_letter`: one per write attempt, with the rows it held and, when it
  failed, the error kind; a rejected batch shows its halves and each dead-lettered row;
- `cdc.confirm`: from the sink reporting the batch durable to the status update that confirmed
  it (a split part of a transaction waits for the part that completes it).

A batch abandoned (the source went away, a stop's grace ran out) ends `aborted`, tagged
`cdc.outcome=abandoned`: the slot replays its events to a later batch.

Trace ids: the outbox's `trace_id` column holds the trace of the request that published each
event. The encoder notes each row's value as it reads the columns anyway, recording only where
the value changes from the previous row (the rows of one request, one transaction, share it),
so a batch's distinct trace ids come from slicing that record at the cut, with no pass over
its rows. A batch carries them as the tag `cdc.trace_ids` (as many as Sentry's 200-character
tag value holds, searchable with a wildcard) and in full, up to `TRACE_IDS_LIMIT`, as the data
of its `cdc.decode` span, with their count; so a request's trace id finds the batch that
shipped its events. No row value other than trace ids is ever put on a span.

Off unless SENTRY_DSN is set and SENTRY_TRACES_SAMPLE_RATE is above 0: then the encoder is the
plain one and every hook returns at once, so the hot path pays nothing. An unsampled batch
costs one sampling decision and two slices.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdc_consumer.batch import Batch
from cdc_consumer.errors import PipelineError
from cdc_consumer.event_log import EventLogEncoder
from cdc_consumer.observability import never_raises
from cdc_consumer.pgoutput import Relation, lsn_to_str
from cdc_consumer.sink import SourcePosition

if TYPE_CHECKING:
    from sentry_sdk.tracing import Span, Transaction

    from cdc_consumer.settings import ConsumerSettings

BATCH_TRANSACTION = "cdc.batch"
TRACE_IDS_LIMIT = 1_000  # distinct trace ids listed on one batch; the count is always exact
_TAG_LIMIT = 200  # characters Sentry keeps of a tag value
# What the sink worker's writes are called (`SinkWorker._retrying`), as span ops.
_WRITE_OPS = {
    "batch": "cdc.insert",
    "dead letter": "cdc.dead_letter",
    "minimal dead letter": "cdc.dead_letter",
}


class TraceIds:
    """The trace ids of the rows encoded since the session began, as runs: a row index where
    the value changed, and the value. The main thread notes rows and takes batches in order;
    batches are consecutive stretches of the rows noted (the builder cuts, never reorders)."""

    __slots__ = ("_count", "_last", "_opened_at", "_starts", "_taken", "_values")

    def __init__(self) -> None:
        self._count = 0  # rows noted
        self._taken = 0  # rows handed out in batches
        self._last: object = None
        self._starts: list[int] = []
        self._values: list[object] = []
        self._opened_at: float | None = None  # wall time of the next batch's first row

    @property
    def opened_at(self) -> float | None:
        """Wall time the next batch's first row was noted, if it was."""
        return self._opened_at

    def note(self, trace_id: object) -> None:
        """One row: called per event, so it only compares with the previous row's value."""
        if self._opened_at is None:
            self._opened_at = time.time()
        if trace_id != self._last:
            self._starts.append(self._count)
            self._values.append(trace_id)
            self._last = trace_id
        self._count += 1

    def take(self, rows: int, *, collect: bool) -> list[str]:
        """Hand out the next `rows` rows, with their distinct trace ids if `collect`."""
        end = self._taken + rows
        first = max(0, bisect_right(self._starts, self._taken) - 1)
        last = bisect_right(self._starts, end - 1) if rows else first
        ids: list[str] = []
        if collect:
            ids = [
                value.decode(errors="replace")
                for value in dict.fromkeys(self._values[first:last])
                if isinstance(value, bytes) and value
            ]
        # Runs before the one holding the next row are never read again.
        keep = max(0, bisect_right(self._starts, end) - 1)
        del self._starts[:keep], self._values[:keep]
        self._taken = end
        # Rows already noted belong to the next batch (the open transaction's, carried over):
        # its first row was noted before this cut, at a time not kept; the cut stands for it.
        self._opened_at = time.time() if self._count > end else None
        return ids


class _TracedEncoder(EventLogEncoder):
    """The encoder, noting each row's trace id on the way."""

    def __init__(
        self, relation: Relation, *, source: str, timeline: int, trace_ids: TraceIds
    ) -> None:
        super().__init__(relation, source=source, timeline=timeline)
        self._trace_column = [column.name for column in relation.columns].index("trace_id")
        self._note = trace_ids.note

    def encode(self, values: Sequence[object], position: SourcePosition) -> bytes:
        self._note(values[self._trace_column])
        return EventLogEncoder.encode(self, values, position)


@dataclass(eq=False)
class _BatchTrace:
    # Not the batch itself: a sampled part of a huge transaction would keep its rows in memory
    # until the part completing it is confirmed. Its id is a key only while it is alive, from
    # its cut until the sink thread takes it (in the queue, referenced there).
    key: int
    confirm_lsn: int | None
    transaction: Transaction
    queue: Span
    durable_at: float | None = None


class BatchTracer:
    """The pipeline's and the sink worker's hooks; `BatchTracer()` is the one that is off."""

    def __init__(self, *, source: str = "", active: bool = False) -> None:
        self.active = active
        self._source = source
        self._trace_ids = TraceIds()
        self._pending: list[_BatchTrace] = []  # main thread: cut, not yet confirmed
        self._by_batch: dict[int, _BatchTrace] = {}  # read by the sink thread
        self._writing: _BatchTrace | None = None  # sink thread only
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: ConsumerSettings) -> BatchTracer:
        """On when Sentry was initialised (SENTRY_DSN) with a sample rate above 0."""
        if settings.sentry_dsn is None or settings.sentry_traces_sample_rate <= 0:
            return cls()
        import sentry_sdk  # noqa: PLC0415  (not imported when Sentry is off)

        return cls(source=settings.source, active=sentry_sdk.get_client().is_active())

    # Main thread.

    def encoder(self, relation: Relation, *, source: str, timeline: int) -> EventLogEncoder:
        if not self.active:
            return EventLogEncoder(relation, source=source, timeline=timeline)
        return _TracedEncoder(relation, source=source, timeline=timeline, trace_ids=self._trace_ids)

    @never_raises
    def restart(self) -> None:
        """A new connection: the builder starts empty, and what was pending is abandoned."""
        if not self.active:
            return
        self._trace_ids = TraceIds()
        self.abandon()

    @never_raises
    def cut(self, batch: Batch) -> None:
        """The batch is cut and about to be handed to the sink worker: start its transaction
        (the sampling decision is made here, once per batch)."""
        if not self.active:
            return
        if not batch.rows:  # a commit without outbox rows: nothing to trace or take
            return
        import sentry_sdk  # noqa: PLC0415
        from sentry_sdk.tracing import Transaction  # noqa: PLC0415

        now = time.time()
        opened_at = min(self._trace_ids.opened_at or now, now)
        transaction = sentry_sdk.start_transaction(
            op=BATCH_TRANSACTION, name=BATCH_TRANSACTION, start_timestamp=opened_at
        )
        sampled = isinstance(transaction, Transaction) and bool(transaction.sampled)
        ids = self._trace_ids.take(len(batch.rows), collect=sampled)
        if not sampled or not isinstance(transaction, Transaction):
            return
        transaction.set_tag("cdc.source", self._source)
        transaction.set_tag("cdc.trace_ids", _tag(ids))
        transaction.set_data("rows", len(batch.rows))
        transaction.set_data("bytes", batch.nbytes)
        if batch.confirm_lsn is not None:
            transaction.set_data("cdc.confirm_lsn", lsn_to_str(batch.confirm_lsn))
        decode = transaction.start_child(
            op="cdc.decode", name="decode and encode", start_timestamp=opened_at
        )
        decode.set_data("rows", len(batch.rows))
        decode.set_data("cdc.trace_ids", ids[:TRACE_IDS_LIMIT])
        decode.set_data("cdc.trace_ids.count", len(ids))
        decode.finish(end_timestamp=now)
        queue = transaction.start_child(op="cdc.queue", name="wait for the sink thread")
        trace = _BatchTrace(id(batch), batch.confirm_lsn, transaction, queue)
        with self._lock:
            self._pending.append(trace)
            self._by_batch[id(batch)] = trace

    @never_raises
    def confirmed(self, flush_lsn: int) -> None:
        """A status update confirmed the slot at `flush_lsn`: finish every batch it covers
        (with a batch that completes a transaction, the parts of it that came before)."""
        if not self.active or not self._pending:
            return
        covered = 0
        for n, trace in enumerate(self._pending):
            lsn = trace.confirm_lsn
            if lsn is not None:
                if lsn > flush_lsn:
                    break
                covered = n + 1
        now = time.time()
        for trace in self._take(covered):
            confirm = trace.transaction.start_child(
                op="cdc.confirm",
                name="standby status update",
                start_timestamp=min(trace.durable_at or now, now),
            )
            confirm.set_data("cdc.flush_lsn", lsn_to_str(flush_lsn))
            confirm.finish(end_timestamp=now)
            trace.transaction.set_tag("cdc.outcome", "confirmed")
            trace.transaction.set_status("ok")
            trace.transaction.finish(end_timestamp=now)

    @never_raises
    def abandon(self) -> None:
        """Finish what is pending as abandoned (the slot replays its events)."""
        if not self.active:
            return
        now = time.time()
        for trace in self._take(len(self._pending)):
            trace.queue.finish(end_timestamp=now)  # a no-op if the sink took it
            trace.transaction.set_tag("cdc.outcome", "abandoned")
            trace.transaction.set_status("aborted")
            trace.transaction.finish(end_timestamp=now)

    def _take(self, count: int) -> list[_BatchTrace]:
        with self._lock:
            taken, self._pending[:count] = self._pending[:count], []
            for trace in taken:
                self._by_batch.pop(trace.key, None)
        return taken

    # Sink thread.

    @never_raises
    def writing(self, batch: Batch) -> None:
        """The sink thread takes `batch`: its writes are spans of its transaction if sampled."""
        if not self.active:
            return
        import sentry_sdk  # noqa: PLC0415

        with self._lock:  # taken: from here on the batch's id may be reused once it is freed
            trace = self._writing = self._by_batch.pop(id(batch), None)
        # An error logged on this thread while writing (a dead-lettered event) joins the
        # batch's trace. Through the trace context, not as the active span: that would make
        # the transport's HTTP requests child spans, whose query text names every column.
        scope = sentry_sdk.get_current_scope()
        if trace is None:
            scope.remove_context("trace")
        else:
            scope.set_context("trace", trace.transaction.get_trace_context())
            trace.queue.finish()

    @never_raises
    def durable(self, batch: Batch) -> None:
        """The sink holds every row of `batch` (in event_log or the dead-letter table)."""
        trace = self._writing
        if trace is not None and trace.key == id(batch):
            trace.durable_at = time.time()

    def traced(self, write: Callable[[], None], *, what: str, rows: int) -> Callable[[], None]:
        """`write` as one span per call, if the batch being written is sampled; else itself."""
        trace = self._writing
        if trace is None:
            return write
        transaction = trace.transaction

        def traced_write() -> None:
            span = transaction.start_child(op=_WRITE_OPS.get(what, "cdc.write"), name=what)
            span.set_data("rows", rows)
            try:
                write()
            except PipelineError as exc:
                span.set_status("internal_error")
                span.set_data("cdc.error_kind", exc.kind.value)
                raise
            else:
                span.set_status("ok")
            finally:
                span.finish()

        return traced_write


def _tag(ids: list[str]) -> str:
    """As many whole trace ids as a tag value holds."""
    text = ""
    for trace_id in ids:
        candidate = f"{text},{trace_id}" if text else trace_id
        if len(candidate) > _TAG_LIMIT:
            break
        text = candidate
    return text
