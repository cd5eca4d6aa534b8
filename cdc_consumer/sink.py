"""The contract between the pipeline and wherever events are delivered."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from cdc_consumer.timeline import WalHistory


class SourcePosition(NamedTuple):
    """Where an event sits in the source WAL: its transaction's commit LSN, then its order."""

    lsn: int
    seq: int


ORIGIN = SourcePosition(0, 0)

SeqRanges = Sequence[tuple[int, int]]  # inclusive (first, last) runs of source_seq


@dataclass(frozen=True, slots=True)
class SourceIdentity:
    """The PostgreSQL and slot a source's positions belong to: positions compare only within
    one WAL, and seqs only within one slot's view of it (a row filter changes them)."""

    system_identifier: str
    database: str
    slot: str


class StoredPositions:
    """The positions of one source that the sink already holds at or above `since_lsn`.

    The slot replays exactly the transactions whose commit LSN is at or above its confirmed
    position, so these are the only stored positions a replay can meet. Skipping exactly them,
    rather than everything below a maximum, stays right whatever subset of earlier inserts
    landed: an insert that became several parts (one per partition) may have landed in part.

    Positions stored from another WAL history (a timeline the current one does not vouch for
    at that LSN, see `timeline.py`) are not among them: they are counted in `untrusted`, never
    skipped.
    """

    def __init__(
        self, since_lsn: int, ranges: Mapping[int, SeqRanges], *, untrusted: int = 0
    ) -> None:
        self.since_lsn = since_lsn
        self._ranges = dict(ranges)
        self.untrusted = untrusted

    def in_transaction(self, commit_lsn: int) -> SeqRanges | None:
        """The stored seq runs of the transaction that commits at `commit_lsn`, if any."""
        return self._ranges.get(commit_lsn)

    @property
    def transactions(self) -> int:
        return len(self._ranges)

    @property
    def rows(self) -> int:
        return sum(last - first + 1 for runs in self._ranges.values() for first, last in runs)


def covers(ranges: SeqRanges, seq: int) -> bool:
    """True if `seq` lies in one of the runs (there are few: usually one per transaction)."""
    return any(first <= seq <= last for first, last in ranges)


class EventSink(Protocol):
    """A destination for encoded outbox events of one source.

    Delivery contract: the pipeline calls `write` with batches in source order and confirms the
    source position only after `write` returned. `write` either makes every row of the batch
    durable or raises; it is called again with the same batch after a failure (at-least-once),
    so a sink must tolerate a batch it has already stored, wholly or in part. A batch the
    destination rejects for its content raises a POISON_EVENT error, one over a size limit
    BATCH_TOO_LARGE; the pipeline then halves it until the parts land or a failing row is
    alone, and hands each such row to `write_dead_letters`, in source order; if that is refused
    too, again with `minimal=True` (position, event id and error, no row text).

    On every (re)start, once the slot is ours: `check_source` refuses a source whose stored
    rows came from another PostgreSQL, or whose slot (at `slot_lsn`) cannot resume it after a
    timeline change (`WalHistory.resume_refusal`; None: the caller, the backfill, repairs the
    gap itself), and records the timeline; `fence_earlier_runs` returns once no write of an
    earlier run of this source (a killed process) can still land; `stored_positions` returns
    what the sink holds, in either table, at or above the slot's confirmed position and in
    `history`, which the pipeline skips on the way back in (exactly-once).
    """

    def write(self, rows: list[bytes]) -> None: ...

    def write_dead_letters(
        self, rows: list[bytes], error: str, *, minimal: bool = False
    ) -> None: ...

    def fence_earlier_runs(self) -> None: ...

    def check_source(
        self, identity: SourceIdentity, history: WalHistory, *, slot_lsn: int | None
    ) -> None: ...

    def stored_positions(self, since_lsn: int, history: WalHistory) -> StoredPositions: ...

    def close(self) -> None: ...
