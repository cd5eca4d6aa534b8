"""The stop signal's handler: it runs between two bytecodes of the main thread, wherever that
thread is, so it may take no lock the main thread could be holding."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

# Many stops, each signalled from another thread while the main thread waits on the request
# (the backoff between reconnects does): a handler that takes the waited-on lock deadlocks.
# Before the fix, 50 stops hung the process on every try; 300 leave a margin.
_SIGNALLED_WHILE_WAITING = textwrap.dedent(
    """
    import os, random, signal, threading
    from cdc_consumer.observability import configure_logging, logging_dict_config
    from cdc_consumer.pipeline import StopRequest

    configure_logging(logging_dict_config(level="info", log_format="json"))
    for _ in range({stops}):
        stop = StopRequest()
        stop.install()
        kill = threading.Timer(random.uniform(0, 0.002), os.kill, (os.getpid(), signal.SIGTERM))
        kill.start()
        while not stop.requested:
            stop.wait(0)
        kill.join()
    print("left")
    """
)


def test_a_stop_signalled_while_the_main_thread_waits_on_it_never_deadlocks():
    """Before: `Event.set` in the handler, interrupting `Event.wait` inside the same Condition,
    hung the process for good (what CI saw: a consumer in its reconnect backoff that never
    left after SIGTERM)."""
    script = _SIGNALLED_WHILE_WAITING.format(stops=300)
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the stop signal's handler deadlocked the main thread")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "left"


_ONE_STOP_DURING_A_LONG_WAIT = textwrap.dedent(
    """
    import os, signal, threading, time
    from cdc_consumer.observability import configure_logging, logging_dict_config
    from cdc_consumer.pipeline import StopRequest

    configure_logging(logging_dict_config(level="info", log_format="json"))
    stop = StopRequest()
    stop.install()
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    woke = stop.wait(5)
    print(woke, round(time.monotonic() - started, 3), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the second: the process goes at once
    time.sleep(5)
    print("still here")
    """
)


def test_a_stop_ends_a_long_wait_at_once_and_a_second_signal_ends_the_process():
    done = subprocess.run(
        [sys.executable, "-c", _ONE_STOP_DURING_A_LONG_WAIT],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == -signal.SIGTERM, done.stderr
    woke, waited = done.stdout.split()
    assert woke == "True"
    assert float(waited) < 1.0  # the 0.1 s before the signal, and one sleep slice after it
    assert done.stderr.count('"stop requested, flushing"') == 1
