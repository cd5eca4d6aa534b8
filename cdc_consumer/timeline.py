"""Which stored positions a server's WAL history vouches for, after a failover (pure).

A position (commit LSN, seq) names an event only within one WAL history. Promoting a standby
starts a new timeline, whose history is its parent's up to the switchpoint (the end of the WAL
the standby had replayed) and its own from there: the same LSNs then name other transactions.
After an asynchronous failover the old primary may have sent the consumer transactions past
the switchpoint that the new primary never had, so ClickHouse can hold positions the new
timeline reuses for new events. Skipping by such a position would drop a new event.

Every row the consumer ships records the timeline it was read on (IDENTIFY_SYSTEM on the
connection that read it; the consumer reads only a primary, whose timeline cannot change while
it is connected), and TIMELINE_HISTORY gives, for each ancestor of the current timeline, the
LSN where the current history left it. Two rules follow:

- **Trust.** A stored position read on timeline t at LSN l names the same event in the current
  history exactly when t is the current timeline, or t is an ancestor and l is below the point
  where the current history left t. Below it both histories are the same WAL; at or above it,
  or on a timeline outside the history (a sibling branch), they are not. The restart read
  skips only trusted positions. An untrusted one is not skipped: what the current history has
  at that LSN is a different transaction, so shipping it doubles nothing. (The untrusted rows
  stay in event_log: events the old primary committed and the new one lost.)
- **Resume.** The slot replays from its confirmed position, and everything below that position
  must already be in ClickHouse. On the first run after the timeline changed, the slot's
  position must therefore be one this source confirmed on the timeline it last read: at or
  below where the current history left that timeline. A slot synchronised to the standby
  (a failover slot) is, since a standby never syncs a position past the WAL it has. A slot
  created, or moved by anyone else, on the new primary is past the switchpoint (the new
  timeline starts with the promotion's own record), and events between what was shipped and
  its position were never read: the consumer refuses to resume and points at the backfill.

A planned switchover, or the promotion of a standby that had everything, changes the timeline
too; there nothing was shipped past the switchpoint, so every stored position is trusted and a
failover slot resumes without a refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cdc_consumer.pgoutput import lsn_to_str, str_to_lsn


@dataclass(frozen=True, slots=True)
class WalHistory:
    """A server's current timeline, and the LSN where its history left each ancestor."""

    timeline: int
    left_at: Mapping[int, int] = field(default_factory=dict)

    def trusts(self, timeline: int, lsn: int) -> bool:
        """Whether a position read on `timeline` at `lsn` is in this history."""
        if timeline == self.timeline:
            return True
        switchpoint = self.left_at.get(timeline)
        return switchpoint is not None and lsn < switchpoint

    def resume_refusal(self, last_timeline: int, slot_lsn: int) -> str | None:
        """Why a slot at `slot_lsn` cannot resume a source last read on `last_timeline`, or
        None if it can (see the module's rule)."""
        if last_timeline == self.timeline:
            return None
        switchpoint = self.left_at.get(last_timeline)
        if switchpoint is None:
            return (
                f"was last read on timeline {last_timeline}, which is not in the history of"
                f" this server's timeline {self.timeline}: its positions may belong to WAL this"
                " server never had"
            )
        if slot_lsn > switchpoint:
            return (
                f"was last read on timeline {last_timeline}, which this server's history"
                f" (timeline {self.timeline}) left at {lsn_to_str(switchpoint)}; the slot is at"
                f" {lsn_to_str(slot_lsn)}, past that point, so it was created or moved after"
                " the failover, and events between what was shipped and it were never read"
            )
        return None


def parse_history(timeline: int, content: str) -> WalHistory:
    """The WalHistory of `timeline` from its history file (TIMELINE_HISTORY's content): one
    line per ancestor, `<timeline>\\t<switchpoint>\\t<reason>`; blank and `#` lines skipped."""
    left_at: dict[int, int] = {}
    for line in content.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        left_at[int(fields[0])] = str_to_lsn(fields[1])
    return WalHistory(timeline, left_at)
