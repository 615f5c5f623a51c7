"""``opd_train.http.paused_gc``: the collector is off inside every open block, on again after the last one, and a
collector that was already off stays off."""
from __future__ import annotations

import gc
import threading

from opd_train.http import paused_gc


def test_nested_and_concurrent_blocks():
    assert gc.isenabled()
    entered, release = threading.Event(), threading.Event()

    def other():
        with paused_gc():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
        thread.start()
        entered.wait(10)
    assert not gc.isenabled()           # the other thread's block is still open
    release.set()
    thread.join(10)
    assert gc.isenabled()


def test_an_exception_reenables_and_a_disabled_collector_stays_off():
    try:
        with paused_gc():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
