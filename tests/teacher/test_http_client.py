"""``opd_train.http``: ``paused_gc`` (the collector is off inside every open block, on again after the last one, and
a collector that was already off stays off) and the ``Coalescer`` (callers on several event loops share a batch
and each gets its own result or the batch's error; a cancelled caller does not disturb the others)."""
from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from opd_train.http import AsyncHTTP, Coalescer, paused_gc


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


def _coalescer(window_ms: float = 100.0, fail: bool = False):
    http, batches = AsyncHTTP(), []

    async def send(key, items):
        batches.append((key, list(items)))
        if fail:
            raise RuntimeError("teacher at http://x/generate failed")
        return [(key, item * 10) for item in items]

    return http, Coalescer(http, send, window_ms=window_ms, max_size=64), batches


def test_callers_on_several_loops_share_one_batch():
    http, co, batches = _coalescer()
    results: dict = {}

    def caller(name: str, items: list[int]):
        async def main():
            return await asyncio.gather(*(co.submit("k", i) for i in items))
        results[name] = asyncio.run(main())

    threads = [threading.Thread(target=caller, args=(f"t{j}", [10 * j + i for i in range(5)])) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {f"t{j}": [("k", (10 * j + i) * 10) for i in range(5)] for j in range(3)}
    assert len(batches) == 1 and sorted(batches[0][1]) == sorted(10 * j + i for j in range(3) for i in range(5))
    http.close()


def test_a_failed_batch_fails_every_caller_and_cancellation_is_local():
    http, co, _ = _coalescer(fail=True)

    async def failing():
        return await asyncio.gather(*(co.submit(None, i) for i in range(3)), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) and "http://x/generate" in str(r) for r in asyncio.run(failing()))
    http.close()
    http, co, batches = _coalescer(window_ms=200.0)

    async def one_cancelled():
        tasks = [asyncio.ensure_future(co.submit("k", i)) for i in range(3)]
        await asyncio.sleep(0.05)
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = asyncio.run(one_cancelled())
    assert out[0] == ("k", 0) and isinstance(out[1], asyncio.CancelledError) and out[2] == ("k", 20)
    http.close()


@pytest.mark.parametrize("max_size", [1, 4])
def test_max_size_sends_without_waiting_for_the_window(max_size):
    http, co, batches = _coalescer(window_ms=10_000.0)
    co.max_size = max_size

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(co.submit("k", i) for i in range(4))), timeout=5)

    assert asyncio.run(main()) == [("k", i * 10) for i in range(4)]
    assert [len(items) for _, items in batches] == [max_size] * (4 // max_size)
    http.close()
