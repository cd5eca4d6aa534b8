"""One error type with kinds, and the one policy that maps each kind to what the pipeline does.

Every failure the consumer can meet is raised (or wrapped, `raise ... from exc`) as a
`PipelineError` carrying a kind and an operator-facing hint; `policy_for` is the only place that
decides retry / split / dead-letter / stop, so the loop never guesses from exception classes.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    TRANSIENT_SOURCE = "transient_source"  # PostgreSQL unreachable, restarted, slot busy
    UNDECODABLE_SOURCE = "undecodable_source"  # a WAL message the decoder cannot read
    TRANSIENT_SINK = "transient_sink"  # ClickHouse unreachable, timed out, overloaded
    POISON_EVENT = "poison_event"  # one row that cannot be encoded or that ClickHouse rejects
    BATCH_TOO_LARGE = "batch_too_large"  # an insert over a server or proxy limit on its size
    CONFIGURATION = "configuration"  # wrong settings, missing publication, wrong schema
    SUPERSEDED = "superseded"  # a newer run of this source owns the slot and fenced this one
    INTERNAL = "internal"  # a failure no policy knows (a bug): nothing after it is trusted


class Policy(enum.Enum):
    RETRY = "retry"  # the same write again, after a backoff
    # Abandon everything queued (the slot replays it from the confirmed position) and connect
    # again, after a backoff: the source went away, or another run took the slot over.
    RECONNECT = "reconnect"
    SPLIT = "split"  # halve the batch until it fits; a row that fails alone is dead-lettered
    DEAD_LETTER = "dead_letter"  # halve the batch until each bad row is alone, dead-letter it
    STOP = "stop"  # exit for an operator; retrying cannot help


_POLICY = {
    ErrorKind.TRANSIENT_SOURCE: Policy.RECONNECT,
    # The slot replays the same message to every reconnect and restart: only an operator (or
    # a fixed decoder) can move past it, and skipping it could skip events.
    ErrorKind.UNDECODABLE_SOURCE: Policy.STOP,
    ErrorKind.TRANSIENT_SINK: Policy.RETRY,
    ErrorKind.POISON_EVENT: Policy.DEAD_LETTER,
    # Retrying the same bytes would fail the same way forever; smaller inserts fit.
    ErrorKind.BATCH_TOO_LARGE: Policy.SPLIT,
    ErrorKind.CONFIGURATION: Policy.STOP,
    ErrorKind.SUPERSEDED: Policy.RECONNECT,
    # Stop before confirming anything more; the restart replays from the confirmed position.
    ErrorKind.INTERNAL: Policy.STOP,
}


class PipelineError(Exception):
    """A failure with a kind (what happened) and a hint (what an operator can do about it)."""

    def __init__(self, kind: ErrorKind, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.hint = hint


def policy_for(error: PipelineError) -> Policy:
    """Decide what the pipeline does with a failure of this kind."""
    return _POLICY[error.kind]
