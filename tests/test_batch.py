"""Batches are cut by rows, bytes and age, and confirm only whole transactions."""

from __future__ import annotations

from cdc_consumer.batch import BatchBuilder


class Clock:
    """A clock the test moves by hand (the edge of the process: time)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cut_by_rows_at_commit():
    """Reaching the row limit at a commit cuts a batch that confirms that commit."""
    builder = BatchBuilder(max_rows=3, max_bytes=10_000, max_seconds=60)
    for row in (b"a", b"b"):
        assert builder.add(row) is None
    assert builder.commit(10) is None
    assert builder.add(b"c") is None
    batch = builder.commit(20)
    assert batch is not None
    assert batch.rows == [b"a", b"b", b"c"]
    assert batch.confirm_lsn == 20
    assert builder.is_empty


def test_open_transaction_below_limit_waits_for_its_commit():
    """A batch over the limit mid-transaction waits for the commit, then confirms it whole."""
    builder = BatchBuilder(max_rows=3, max_bytes=10_000, max_seconds=60)
    builder.add(b"a")
    builder.add(b"b")
    builder.commit(10)
    assert builder.add(b"open-1") is None
    assert builder.add(b"open-2") is None
    batch = builder.commit(30)
    assert batch is not None
    assert batch.rows == [b"a", b"b", b"open-1", b"open-2"]
    assert batch.confirm_lsn == 30


def test_cut_by_bytes():
    """Reaching the byte budget at a commit cuts a batch."""
    builder = BatchBuilder(max_rows=1000, max_bytes=10, max_seconds=60)
    assert builder.add(b"12345") is None
    assert builder.commit(7) is None
    assert builder.add(b"67890") is None
    batch = builder.commit(9)
    assert batch is not None
    assert batch.nbytes == 10
    assert batch.confirm_lsn == 9


def test_big_transaction_is_split_without_confirming_its_middle():
    """A transaction larger than a batch is split; only the part after its commit confirms."""
    builder = BatchBuilder(max_rows=2, max_bytes=10_000, max_seconds=60)
    builder.add(b"x")
    builder.commit(5)
    assert builder.add(b"big-1") is None
    first = builder.add(b"big-2")
    assert first is not None
    assert first.rows == [b"x", b"big-1", b"big-2"]
    assert first.confirm_lsn == 5  # the earlier commit, never the middle of the open one
    assert builder.add(b"big-3") is None
    assert builder.commit(99) is None
    assert not builder.is_empty  # big-3, confirming 99 once shipped


def test_due_by_age_ships_only_committed_rows():
    """An aged batch ships committed rows; rows of the open transaction stay for the next one."""
    clock = Clock()
    builder = BatchBuilder(max_rows=1000, max_bytes=10_000, max_seconds=1.0, clock=clock)
    builder.add(b"done")
    builder.commit(42)
    builder.add(b"open")
    assert builder.due() is None
    clock.now += 1.0
    batch = builder.due()
    assert batch is not None
    assert batch.rows == [b"done"]
    assert batch.nbytes == 4
    assert batch.confirm_lsn == 42
    assert not builder.is_empty  # the open row is still there
    assert builder.due() is None  # and has no commit to confirm yet


def test_transaction_without_outbox_rows_still_confirms():
    """A commit with no rows of ours still yields a confirm position once due."""
    clock = Clock()
    builder = BatchBuilder(max_rows=10, max_bytes=10_000, max_seconds=0.5, clock=clock)
    builder.commit(77)
    clock.now += 0.5
    batch = builder.due()
    assert batch is not None
    assert batch.rows == []
    assert batch.confirm_lsn == 77


def test_drain_at_shutdown_keeps_only_committed():
    """At shutdown the committed part is shipped; an open transaction's rows are not."""
    builder = BatchBuilder(max_rows=10, max_bytes=10_000, max_seconds=60)
    builder.add(b"a")
    builder.commit(3)
    builder.add(b"partial")
    batch = builder.drain_committed()
    assert batch is not None
    assert batch.rows == [b"a"]
    assert batch.confirm_lsn == 3
