"""Accumulates encoded outbox rows into batches cut at transaction boundaries.

No batch holds more than CDC_BATCH_MAX_ROWS rows or CDC_BATCH_MAX_BYTES bytes (a single row
larger than the byte limit goes alone). A row that would overfill the batch first sends the
committed part ahead; a transaction that alone would overfill it is split. A batch is also cut
at a commit that fills it, or when its oldest row is CDC_BATCH_MAX_SECONDS old. A batch only
carries a confirm LSN for transactions it completes: the slot is never confirmed into the
middle of a transaction, where a restart would lose events that share its commit LSN.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Named defaults, the ones settings.py uses (ClickHouse: 10k-100k rows, ~1 insert/s).
DEFAULT_MAX_ROWS = 50_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_SECONDS = 1.0


@dataclass(slots=True)
class Batch:
    """Rows to insert together, and the WAL position that is safe to confirm once they are in."""

    rows: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    confirm_lsn: int | None = None  # end LSN of the last transaction this batch completes
    commit_time: int | None = None  # that transaction's commit time, as pgoutput sends it
    # (commit time, rows in this batch) per transaction with rows here, for per-event latency
    # without a per-row cost: a transaction's rows share its commit time.
    commits: list[tuple[int, int]] = field(default_factory=list)


_NONE: Sequence[Batch] = ()


class BatchBuilder:
    """Stateful cutter; the pipeline feeds it rows and commits in WAL order."""

    def __init__(
        self,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._max_seconds = max_seconds
        self._clock = clock
        self._batch = Batch()
        self._complete_rows = 0  # rows[:complete_rows] belong to committed transactions
        self._complete_bytes = 0
        self._started_at: float | None = None
        self._open_commit_time: int | None = None

    @property
    def is_empty(self) -> bool:
        """No rows and nothing to confirm."""
        return not self._batch.rows and self._batch.confirm_lsn is None

    def add(self, row: bytes) -> Sequence[Batch]:
        """Add a row of the open transaction; returns the batches it pushed out (usually
        none): the committed part, then the open transaction's rows so far, as needed to keep
        every batch within both limits."""
        ready: Sequence[Batch] = _NONE
        if self._overfills(len(row)):
            cut = [self._cut(keep_open_rows=True)] if self._complete_rows else []
            if self._overfills(len(row)):
                # The open transaction alone fills a batch: split it. The cut carries the
                # confirm LSN of committed rows only, never a position inside this one.
                cut.append(self._cut(keep_open_rows=False))
            ready = cut
        batch = self._batch
        if self._started_at is None:
            self._started_at = self._clock()
        batch.rows.append(row)
        batch.nbytes += len(row)
        return ready

    def _overfills(self, size: int) -> bool:
        """Would a row of `size` bytes take the (non-empty) batch past a limit?"""
        rows = len(self._batch.rows)
        return rows > 0 and (rows >= self._max_rows or self._batch.nbytes + size > self._max_bytes)

    def begin(self, commit_time: int) -> None:
        """Open a transaction whose commit time (pgoutput's, known from its Begin) its rows
        carry into `Batch.commits`, also when it is split across batches."""
        self._open_commit_time = commit_time

    def commit(self, end_lsn: int, commit_time: int | None = None) -> Batch | None:
        """Close the open transaction; returns a batch if a limit is reached."""
        batch = self._batch
        batch.confirm_lsn = end_lsn
        batch.commit_time = commit_time
        self._count_open_rows(batch, commit_time)
        self._open_commit_time = None
        self._complete_rows = len(batch.rows)
        self._complete_bytes = batch.nbytes
        if self._started_at is None:
            self._started_at = self._clock()
        if len(batch.rows) >= self._max_rows or batch.nbytes >= self._max_bytes:
            return self._cut(keep_open_rows=False)
        return None

    def due(self) -> Batch | None:
        """The committed part of the batch, if its oldest row has waited long enough."""
        if self._batch.confirm_lsn is None or self._started_at is None:
            return None
        if self._clock() - self._started_at < self._max_seconds:
            return None
        return self._cut(keep_open_rows=True)

    def seconds_until_due(self) -> float:
        if self._started_at is None:
            return self._max_seconds
        return max(0.0, self._max_seconds - (self._clock() - self._started_at))

    def drain_committed(self) -> Batch | None:
        """Everything committed so far (at shutdown); rows of an open transaction are dropped,
        since the slot will replay that transaction whole."""
        if self._batch.confirm_lsn is None:
            return None
        return self._cut(keep_open_rows=True)

    def discard(self) -> None:
        """Forget everything (the source reconnects and replays from the confirmed position)."""
        self._batch = Batch()
        self._complete_rows = self._complete_bytes = 0
        self._started_at = None
        self._open_commit_time = None

    def _count_open_rows(self, batch: Batch, commit_time: int | None) -> None:
        rows = len(batch.rows) - self._complete_rows
        if rows and commit_time is not None:
            batch.commits.append((commit_time, rows))

    def _cut(self, *, keep_open_rows: bool) -> Batch:
        batch = self._batch
        if not keep_open_rows:  # the open transaction's rows so far go with this batch
            self._count_open_rows(batch, self._open_commit_time)
        self._batch = Batch()
        self._started_at = None
        if keep_open_rows and self._complete_rows < len(batch.rows):
            open_rows = batch.rows[self._complete_rows :]
            del batch.rows[self._complete_rows :]
            self._batch.rows = open_rows
            self._batch.nbytes = batch.nbytes - self._complete_bytes
            batch.nbytes = self._complete_bytes
            self._started_at = self._clock()
        self._complete_rows = self._complete_bytes = 0
        return batch
