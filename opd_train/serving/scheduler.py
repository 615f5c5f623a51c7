"""The engine loop: one thread owns the model and batches everything that is waiting.

Each loop iteration (1) runs pending control operations (weight updates) once no sequence is mid-generation,
(2) scores every waiting prefill-only request in one batched forward (chunked by token budget), (3) prefills waiting
generation requests and merges them into the running decode batch (continuous batching), (4) advances the decode
batch by one token. So concurrent single requests are batched together, a request list with ``n`` runs as one
generation, and scoring requests never wait for a long generation to finish (at most one decode step).

Callers get a ``concurrent.futures.Future`` per submitted request (all its sequences finish together);
the HTTP layer awaits it with ``asyncio.wrap_future``. A runner exception fails only the requests of that batch and
the loop keeps serving.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from ..http import paused_gc
from .model_runner import DecodeBatch, ModelRunner
from .types import SeqRequest, SeqResult

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """One submitted request: its sequences' results fill in as they finish."""

    seqs: list[SeqRequest]
    future: Future
    results: list[SeqResult | None] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self):
        self.results = [None] * len(self.seqs)
        self.remaining = len(self.seqs)

    def deliver(self, index: int, result: SeqResult) -> None:
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.results)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass
class SchedulerStats:
    batches: int = 0
    decode_steps: int = 0
    scored_seqs: int = 0
    generated_seqs: int = 0
    merges: int = 0              # prefills merged into a running decode batch (continuous batching)
    max_batch: int = 0


class Scheduler:
    def __init__(self, runner: ModelRunner, *, max_running_requests: int = 1024):
        self.runner = runner
        self.max_running = max_running_requests
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._pending: deque[_Group] = deque()
        self._control: deque[tuple[Callable[[], object], Future]] = deque()
        self._paused = False
        self._stopping = False
        self._running: DecodeBatch | None = None
        self._thread = threading.Thread(target=self._loop, name="opd-engine", daemon=True)

    # ------------------------------------------------------------------------------------------------ API
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, seqs: list[SeqRequest]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopping:
                future.set_exception(RuntimeError("the engine is shutting down"))
                return future
            self._pending.append(_Group(seqs, future))
            self._cond.notify_all()
        return future

    def run_exclusive(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the engine thread when no sequence is mid-generation (new work waits meanwhile)."""
        future: Future = Future()
        with self._cond:
            self._control.append((fn, future))
            self._cond.notify_all()
        return future

    def pause(self) -> None:
        """Stop admitting new requests (running ones finish); ``resume`` continues."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def num_waiting(self) -> int:
        return sum(len(g.seqs) for g in self._pending)

    @property
    def num_running(self) -> int:
        return len(self._running) if self._running is not None else 0

    # ------------------------------------------------------------------------------------------------ loop
    def _take_work(self) -> tuple[list, list[_Group]]:
        with self._cond:
            while not self._stopping and self._running is None and not self._control and \
                    (self._paused or not self._pending):
                self._cond.wait()
            if self._stopping:
                return [], []
            control = []
            if self._control and self._running is None:
                control = list(self._control)
                self._control.clear()
            groups = []
            if not self._control and not control and not self._paused:
                room = self.max_running - self.num_running
                while self._pending and (not groups or len(self._pending[0].seqs) <= room):
                    group = self._pending.popleft()
                    room -= len(group.seqs)
                    groups.append(group)
            return control, groups

    def _loop(self) -> None:
        while True:
            control, groups = self._take_work()
            if self._stopping:
                break
            for fn, future in control:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # reported to the caller, the loop goes on
                    future.set_exception(exc)
            if groups:
                self._admit(groups)
            if self._running is not None:
                self._step()
        self._fail_all(RuntimeError("the engine shut down before the request finished"))

    def _admit(self, groups: list[_Group]) -> None:
        score, gen = [], []
        for g in groups:
            for i, s in enumerate(g.seqs):
                (score if s.sampling.max_new_tokens == 0 else gen).append((g, i))
        self.stats.batches += 1
        self.stats.max_batch = max(self.stats.max_batch, len(score) + len(gen))
        if score:
            self._guarded([g for g, _ in score], lambda: self._score(score))
        if gen:
            self._guarded([g for g, _ in gen], lambda: self._prefill(gen))

    def _score(self, items: list[tuple[_Group, int]]) -> None:
        with paused_gc():   # a full-distribution batch is ~10^5 Python lists (see opd_train.http.paused_gc)
            results = self.runner.score([g.seqs[i] for g, i in items])
        self.stats.scored_seqs += len(items)
        for (g, i), res in zip(items, results):
            g.deliver(i, res)

    def _prefill(self, items: list[tuple[_Group, int]]) -> None:
        batch = self.runner.prefill([g.seqs[i] for g, i in items], items)
        self.stats.generated_seqs += len(items)
        if self._running is None:
            self._running = batch
        elif self.runner.can_merge(self._running):
            self.runner.merge(self._running, batch)
            self.stats.merges += 1
        else:  # a cache layout we cannot pad (e.g. sliding-window layers): finish the new rows on their own
            while len(batch):
                self._deliver(self.runner.decode_step(batch))

    def _step(self) -> None:
        batch = self._running
        groups = list({id(g): g for g, _ in batch.tags}.values())
        self._guarded(groups, lambda: self._deliver(self.runner.decode_step(batch)), reset_running=True)
        self.stats.decode_steps += 1
        if self._running is not None and len(self._running) == 0:
            self._running = None

    @staticmethod
    def _deliver(finished: list[tuple[object, SeqResult]]) -> None:
        for (group, index), res in finished:
            group.deliver(index, res)

    def _guarded(self, groups: list[_Group], fn: Callable[[], None], reset_running: bool = False) -> None:
        try:
            fn()
        except Exception as exc:
            log.exception("engine batch failed")
            for g in groups:
                g.fail(exc)
            if reset_running:
                self._running = None

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for g in pending:
            g.fail(exc)
        if self._running is not None:
            for g, _ in self._running.tags:
                g.fail(exc)
        for _, future in self._control:
            future.set_exception(exc)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Test helper: True once nothing is pending or running."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self._pending and self._running is None:
                return True
            time.sleep(0.005)
        return False
