"""Stop signals as clean stops: deferred around thread starts, never lost."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pipeline.errors import Interrupted
from pipeline.signals import raise_on_signals, signals_deferred


def test_a_stop_signal_waits_for_the_deferred_block_then_stops() -> None:
    started: list[threading.Thread] = []
    with pytest.raises(Interrupted) as err, raise_on_signals():
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while threads are being started
            time.sleep(0.05)  # the handler has run (the signal is held, not lost)
            for _ in range(4):
                t = threading.Thread(target=lambda: None)
                t.start()  # never interrupted half-way
                started.append(t)
        raise AssertionError("the signal was lost")
    assert err.value.signum == signal.SIGTERM and len(started) == 4
    for t in started:
        t.join()


def test_outside_the_deferred_block_a_signal_stops_at_once() -> None:
    with pytest.raises(Interrupted), raise_on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        raise AssertionError("not interrupted")
