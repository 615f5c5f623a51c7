"""Signals become RunInterrupted in the main thread, wherever it is when they arrive."""
from __future__ import annotations

import signal
import time

import pytest

from opd_train.lifecycle import RunInterrupted, interruptible


class _SignalInFinalizer:
    """A finalizer during which SIGTERM arrives: Python runs the handler inside it and swallows what it raises
    (seen in a real run: SIGTERM landed in a WeakSet callback while the Ray engine actor started)."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)
        for _ in range(1000):       # the handler runs at one of these bytecodes, inside the finalizer
            pass


def test_a_signal_that_lands_in_a_finalizer_still_interrupts():
    started = time.monotonic()
    with pytest.raises(RunInterrupted, match="SIGTERM") as info:
        with interruptible():
            _SignalInFinalizer()                     # dropped at once: __del__ runs here
            while time.monotonic() - started < 5:    # the run goes on unless the signal is delivered again
                pass
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert time.monotonic() - started < 2


def test_a_plain_signal_interrupts_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted, match="SIGINT"):
        with interruptible():
            signal.raise_signal(signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before
