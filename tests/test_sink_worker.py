"""delivery.SinkWorker when the sink, or an observability hook, fails in a way no policy knows.

The sink here is a stand-in for the process's edge (ClickHouse answering with something the
transport never maps to a PipelineError: a library bug, a hook that raises): the worker is
real. Before, such an exception ended the thread silently: the worker then looked idle and
settled, and the next keepalive confirmed the slot past a batch ClickHouse never received.
"""

from __future__ import annotations

import time

import structlog.testing

from cdc_consumer.batch import Batch
from cdc_consumer.delivery import SinkWorker
from cdc_consumer.errors import ErrorKind, Policy, policy_for
from cdc_consumer.observability import never_raises


class _SinkThatBreaks:
    """Raises a plain exception from every write, as a bug would."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, rows: list[bytes]) -> None:
        self.writes += 1
        raise RuntimeError("unexpected state in the HTTP client")

    def write_dead_letters(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("not reached")


def test_an_unexpected_failure_stops_the_pipeline_and_confirms_nothing():
    """The batch is not durable, the worker is not settled, and its failure is one the
    policy stops on (exit 2; the restart replays from the confirmed position)."""
    sink = _SinkThatBreaks()
    worker = SinkWorker(sink, retry_cap_seconds=0.1)  # type: ignore[arg-type]
    try:
        assert worker.submit(Batch(rows=[b'{"n": 1}'], confirm_lsn=1000), timeout=1.0)
        deadline = time.monotonic() + 10
        while worker.fatal is None and time.monotonic() < deadline:
            worker.wait_progress(0.05)
        assert sink.writes == 1
        assert worker.fatal is not None
        assert worker.fatal.kind is ErrorKind.INTERNAL
        assert policy_for(worker.fatal) is Policy.STOP
        assert worker.durable_lsn == 0
        assert not worker.settled
    finally:
        worker.stop(abort=True, deadline=time.monotonic() + 5)


def test_a_failing_observability_hook_is_logged_once_and_swallowed():
    """A metrics or tracing hook that raises changes nothing for delivery: it is logged (once
    a minute at most) and its caller goes on."""
    calls: list[int] = []

    @never_raises
    def hook(n: int) -> None:
        calls.append(n)
        raise ValueError("label cardinality exceeded")

    with structlog.testing.capture_logs() as logs:
        hook(1)
        hook(2)
    assert calls == [1, 2]
    failures = [e for e in logs if e["event"] == "observability hook failed"]
    assert len(failures) == 1
    assert "label cardinality exceeded" in failures[0]["error"]
