"""Batches are cut by rows, bytes and age, stay within both limits, and confirm only whole
transactions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_consumer.batch import Batch, BatchBuilder


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
        assert not builder.add(row)
    assert builder.commit(10) is None
    assert not builder.add(b"c")
    batch = builder.commit(20)
    assert batch is not None
    assert batch.rows == [b"a", b"b", b"c"]
    assert batch.confirm_lsn == 20
    assert builder.is_empty


def test_row_that_would_overfill_sends_the_committed_part_ahead():
    """A row past the limit mid-transaction ships the committed rows first; the open
    transaction stays whole for its own commit, and no batch goes over the limit."""
    builder = BatchBuilder(max_rows=3, max_bytes=10_000, max_seconds=60)
    builder.add(b"a")
    builder.add(b"b")
    builder.commit(10)
    assert not builder.add(b"open-1")
    (ahead,) = builder.add(b"open-2")
    assert ahead.rows == [b"a", b"b"]
    assert ahead.confirm_lsn == 10
    assert builder.commit(30) is None
    batch = builder.drain_committed()
    assert batch is not None
    assert batch.rows == [b"open-1", b"open-2"]
    assert batch.confirm_lsn == 30


def test_cut_by_bytes():
    """Reaching the byte budget at a commit cuts a batch."""
    builder = BatchBuilder(max_rows=1000, max_bytes=10, max_seconds=60)
    assert not builder.add(b"12345")
    assert builder.commit(7) is None
    assert not builder.add(b"67890")
    batch = builder.commit(9)
    assert batch is not None
    assert batch.nbytes == 10
    assert batch.confirm_lsn == 9


def test_big_transaction_is_split_without_confirming_its_middle():
    """A transaction larger than a batch is split; only the part after its commit confirms."""
    builder = BatchBuilder(max_rows=2, max_bytes=10_000, max_seconds=60)
    builder.add(b"x")
    builder.commit(5)
    assert not builder.add(b"big-1")
    (committed,) = builder.add(b"big-2")
    assert committed.rows == [b"x"]
    assert committed.confirm_lsn == 5
    (middle,) = builder.add(b"big-3")
    assert middle.rows == [b"big-1", b"big-2"]
    assert middle.confirm_lsn is None  # never the middle of the open transaction
    assert builder.commit(99) is None
    assert not builder.is_empty  # big-3, confirming 99 once shipped


def test_one_row_larger_than_the_byte_limit_goes_alone():
    """A row bigger than the byte budget cannot be split: it is a batch of its own."""
    builder = BatchBuilder(max_rows=100, max_bytes=10, max_seconds=60)
    builder.add(b"small")
    builder.commit(1)
    (ahead,) = builder.add(b"x" * 50)
    assert ahead.rows == [b"small"]
    (alone,) = builder.add(b"next")
    assert alone.rows == [b"x" * 50]
    assert alone.confirm_lsn is None


_STEPS = st.lists(
    st.one_of(st.integers(min_value=1, max_value=40), st.just("commit")), max_size=200
)


@settings(max_examples=300, deadline=None)
@given(
    steps=_STEPS,
    max_rows=st.integers(min_value=1, max_value=8),
    max_bytes=st.integers(min_value=1, max_value=80),
)
def test_every_batch_keeps_both_limits_and_confirms_only_whole_transactions(
    steps, max_rows, max_bytes
):
    """For any stream of rows and commits: no batch passes a limit (bar a lone oversized row),
    rows come out in order, and a batch confirms a commit only once every row of that
    transaction has been cut into this or an earlier batch."""
    builder = BatchBuilder(max_rows=max_rows, max_bytes=max_bytes, max_seconds=60)
    batches: list[Batch] = []
    sent: list[bytes] = []
    commit_after_row: dict[int, int] = {}  # end LSN -> rows the stream held at that commit
    for n, step in enumerate(steps):
        if step == "commit":
            commit_after_row[n + 1] = len(sent)
            cut = builder.commit(n + 1)
            batches.extend([cut] if cut is not None else [])
        else:
            row = str(n).encode().ljust(step, b".")
            sent.append(row)
            batches.extend(builder.add(row))
    last = builder.drain_committed()
    batches.extend([last] if last is not None else [])
    shipped = 0
    for batch in batches:
        assert len(batch.rows) <= max_rows
        assert batch.nbytes <= max_bytes or len(batch.rows) == 1
        assert batch.nbytes == sum(len(row) for row in batch.rows)
        shipped += len(batch.rows)
        if batch.confirm_lsn is not None:
            assert commit_after_row[batch.confirm_lsn] <= shipped
    assert [row for batch in batches for row in batch.rows] == sent[:shipped]
    if commit_after_row:
        assert shipped >= max(commit_after_row.values())


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


@settings(max_examples=300, deadline=None)
@given(
    transactions=st.lists(st.lists(st.integers(min_value=1, max_value=40), max_size=12)),
    max_rows=st.integers(min_value=1, max_value=8),
    max_bytes=st.integers(min_value=1, max_value=80),
)
def test_every_row_is_counted_once_under_its_commit_time(transactions, max_rows, max_bytes):
    """`Batch.commits` counts each row once, under its transaction's commit time and in the
    batch that holds it, also for a transaction split across batches."""
    builder = BatchBuilder(max_rows=max_rows, max_bytes=max_bytes, max_seconds=60)
    batches: list[Batch] = []
    for commit_time, sizes in enumerate(transactions, start=1000):
        builder.begin(commit_time)
        for size in sizes:
            batches.extend(builder.add(b"r" * size))
        cut = builder.commit(commit_time, commit_time)
        batches.extend([cut] if cut is not None else [])
    last = builder.drain_committed()
    batches.extend([last] if last is not None else [])
    counted: dict[int, int] = {}
    for batch in batches:
        assert sum(rows for _, rows in batch.commits) == len(batch.rows)
        for commit_time, rows in batch.commits:
            counted[commit_time] = counted.get(commit_time, 0) + rows
    expected = {ct: len(sizes) for ct, sizes in enumerate(transactions, start=1000) if sizes}
    assert counted == expected
