"""A run ends cleanly whatever signal arrives: SIGTERM, SIGINT or SIGHUP become :class:`RunInterrupted`.

Python's default SIGTERM / SIGHUP actions end the process at once, skipping every ``finally``: the Ray actors, the
engine servers they started (own process groups) and the teacher server would survive as orphans. Inside
:func:`interruptible` the first such signal raises :class:`RunInterrupted` in the main thread (also while it waits
in ``ray.get``), so the training loop saves a resumable checkpoint and the runtime stops everything it started;
further signals during that cleanup are reported and ignored (SIGKILL remains the hard stop). A signal whose
handler ran inside a finalizer (where Python swallows exceptions) is delivered again. Server subprocesses
also ask Linux to SIGTERM them when the process that started them dies (:func:`die_with_parent`), the last line of
defence against a parent killed with SIGKILL.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None)


class RunInterrupted(BaseException):
    """A termination signal arrived (a BaseException, like KeyboardInterrupt: ``except Exception`` lets it pass)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_ACTIVE: list = []          # the handler of the innermost interruptible() block


def reinstall() -> None:
    """Put our handlers back after a library replaced them (ray.init installs C++ handlers that print a stack
    dump and end the process on SIGTERM)."""
    if _ACTIVE:
        for s in SIGNALS:
            signal.signal(s, _ACTIVE[-1])


@contextlib.contextmanager
def interruptible():
    """Turn the first SIGTERM / SIGINT / SIGHUP into RunInterrupted; ignore (and say so) any later one."""
    state = {"interrupted": False}

    def handler(signum, _frame):
        if state["interrupted"]:
            print(f"[opd-train] {signal.Signals(signum).name} again: still stopping the run's processes "
                  "(SIGKILL stops at once, leaving them behind)", file=sys.stderr, flush=True)
            return
        state["interrupted"] = True
        raise RunInterrupted(signum)

    previous_hook = sys.unraisablehook

    def unraisable(info):
        # The handler runs wherever the main thread is, also inside a finalizer (__del__, a weakref callback),
        # where Python swallows exceptions: the run would go on. Deliver the signal again a moment later, from
        # another thread (raising it here would run the handler inside this hook, where it is swallowed too).
        if isinstance(info.exc_value, RunInterrupted):
            state["interrupted"] = False
            threading.Timer(0.01, os.kill, (os.getpid(), info.exc_value.signum)).start()
            return
        previous_hook(info)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    sys.unraisablehook = unraisable
    _ACTIVE.append(handler)
    try:
        yield
    finally:
        _ACTIVE.pop()
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)


def die_with_parent() -> None:
    """``preexec_fn`` of server subprocesses: Linux sends SIGTERM to the child when its parent dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:        # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
