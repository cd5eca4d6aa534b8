"""The contract between the pipeline and wherever events are delivered."""

from __future__ import annotations

from typing import NamedTuple, Protocol


class SourcePosition(NamedTuple):
    """Where an event sits in the source WAL: its transaction's commit LSN, then its order."""

    lsn: int
    seq: int


ORIGIN = SourcePosition(0, 0)


class EventSink(Protocol):
    """A destination for encoded outbox events.

    Delivery contract: the pipeline calls `write` with batches in source order and confirms the
    source position only after `write` returned. `write` either makes every row of the batch
    durable or raises; it is called again with the same batch after a failure (at-least-once),
    so a sink must tolerate a batch it has already stored. A batch the destination rejects for
    its content raises a POISON_EVENT error, one over a size limit BATCH_TOO_LARGE; the
    pipeline then halves it until the parts land or a failing row is alone, and hands each
    such row to `write_dead_letters`, in source order; if that is refused too, again with
    `minimal=True` (position, event id and error, no row text). `high_watermark` returns the
    highest source position stored in either place, which the pipeline skips up to after a
    restart (exactly-once). `fence_earlier_runs` returns once no write of an earlier run of
    this consumer (a killed process) can still land; it is called after the slot is ours and
    before `high_watermark`.
    """

    def write(self, rows: list[bytes]) -> None: ...

    def write_dead_letters(
        self, rows: list[bytes], error: str, *, minimal: bool = False
    ) -> None: ...

    def fence_earlier_runs(self) -> None: ...

    def high_watermark(self) -> SourcePosition: ...

    def close(self) -> None: ...
