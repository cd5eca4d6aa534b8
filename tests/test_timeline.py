"""cdc_consumer.timeline: which stored positions a WAL history vouches for, and when a slot can
resume a source last read on another timeline."""

from __future__ import annotations

import pytest

from cdc_consumer.pgoutput import str_to_lsn
from cdc_consumer.timeline import WalHistory, parse_history

# Timeline 3's history file: timeline 1 ended at 0/3000178, then 2 at 0/5000060.
HISTORY_3 = (
    "1\t0/3000178\tno recovery target specified\n"
    "\n"
    '2\t0/5000060\tat restore point "before upgrade"\n'
)
THREE = parse_history(3, HISTORY_3)


def test_history_file_is_parsed_into_switchpoints():
    """Each line names an ancestor and the LSN where the history left it."""
    assert parse_history(3, HISTORY_3) == WalHistory(
        3, {1: str_to_lsn("0/3000178"), 2: str_to_lsn("0/5000060")}
    )
    assert parse_history(1, "") == WalHistory(1)


@pytest.mark.parametrize(
    ("timeline", "lsn", "trusted"),
    [
        (3, str_to_lsn("0/1"), True),  # the current timeline: any position
        (3, str_to_lsn("9/0"), True),
        (1, str_to_lsn("0/3000177"), True),  # below where the history left timeline 1
        (1, str_to_lsn("0/3000178"), False),  # at it: the new timeline's WAL starts there
        (1, str_to_lsn("0/4000000"), False),  # the old primary's, past the switchpoint
        (2, str_to_lsn("0/4000000"), True),
        (2, str_to_lsn("0/5000060"), False),
        (4, str_to_lsn("0/1"), False),  # not in this history (a sibling or a later branch)
    ],
)
def test_positions_are_trusted_only_where_the_histories_agree(timeline, lsn, trusted):
    """A position read on an ancestor is trusted below the switchpoint only; one read on a
    timeline outside the history never is."""
    assert THREE.trusts(timeline, lsn) is trusted


def test_same_timeline_always_resumes():
    """No timeline change, no refusal, wherever the slot is."""
    assert THREE.resume_refusal(3, str_to_lsn("9/0")) is None


def test_slot_at_or_below_the_switchpoint_resumes_a_source_of_an_ancestor():
    """A slot synced before the failover (at or below the switchpoint) resumes: everything
    below it was confirmed on the old timeline, everything above it is replayed."""
    assert THREE.resume_refusal(2, str_to_lsn("0/5000060")) is None
    assert THREE.resume_refusal(1, str_to_lsn("0/3000100")) is None


def test_slot_past_the_switchpoint_is_refused():
    """A slot past where the history left the source's timeline was created (or moved) after
    the failover: what was committed between is unread, so resuming would lose it."""
    refusal = THREE.resume_refusal(1, str_to_lsn("0/3000200"))
    assert refusal is not None
    assert "left at 0/3000178" in refusal
    assert "slot is at 0/3000200" in refusal


def test_timeline_outside_the_history_is_refused():
    """A source last read on a timeline this server's history does not contain is refused."""
    refusal = THREE.resume_refusal(4, str_to_lsn("0/1"))
    assert refusal is not None
    assert "not in the history of this server's timeline 3" in refusal
