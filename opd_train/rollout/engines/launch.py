"""Managed inference-server subprocesses: SGLang (``python -m sglang.launch_server``) or our CPU engine.

:class:`ManagedServer` starts the command in its own process group (SGLang forks scheduler / detokenizer
children), writes its output to a log file (never a pipe that could fill up and block the server), waits until
``GET /health`` answers 200 while watching that the process is still alive (a dead server fails fast with the tail
of its log), and on ``stop()`` sends SIGTERM to the whole group, then SIGKILL after a grace period. An ``atexit``
hook stops servers the caller forgot, and the server asks Linux to SIGTERM it when the process that started it
dies (``lifecycle.die_with_parent``), so a crashed driver leaves no orphan holding a port or GPU memory.

SGLang is never imported here: :func:`is_sglang_available` only looks for the package.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field

from ...lifecycle import die_with_parent

_LIVE: "weakref.WeakSet[ManagedServer]" = weakref.WeakSet()


def is_sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "<no log>"


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass(eq=False)   # identity semantics: tracked in a WeakSet
class ManagedServer:
    cmd: list[str]
    host: str
    port: int                             # 0 until known when the server picks it (port_file)
    log_path: str
    process: subprocess.Popen | None = None
    port_file: str | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, env: dict | None = None, health_timeout: float = 300.0) -> "ManagedServer":
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                            start_new_session=True, preexec_fn=die_with_parent)
        finally:
            log.close()
        try:                                # from here on, any failure stops the process it started
            _LIVE.add(self)
            self.wait_healthy(health_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _failure(self, why: str) -> RuntimeError:
        return RuntimeError(f"{why}\n  command: {' '.join(self.cmd)}\n  log {self.log_path} (last lines):\n"
                            f"{_tail(self.log_path)}")

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._failure(f"the server exited with code {self.process.returncode} before becoming healthy")
            if self.port == 0 and self.port_file and os.path.exists(self.port_file):
                with open(self.port_file) as f:
                    text = f.read().strip()
                self.port = int(text) if text else 0
            if self.port and _health_ok(self.url):
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise self._failure(f"the server was not healthy at {self.url or self.host}/health within {timeout:g} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; returns the exit code."""
        if self.process is None or self._stopped:
            return self.process.returncode if self.process else None
        self._stopped = True
        _LIVE.discard(self)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        if self.port_file and os.path.exists(self.port_file):
            os.unlink(self.port_file)
        return self.process.poll()

    def __enter__(self) -> "ManagedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        server.stop(grace=5.0)


def _log_path(log_path: str | None, name: str) -> str:
    if log_path:
        return log_path
    fd, path = tempfile.mkstemp(prefix=f"opd-{name}-", suffix=".log")
    os.close(fd)
    return path


def launch_cpu_engine(model_path: str, *, host: str = "127.0.0.1", port: int = 0, dtype: str = "float32",
                      num_threads: int | None = None, extra_args: tuple[str, ...] = (), log_path: str | None = None,
                      health_timeout: float = 120.0, env: dict | None = None) -> ManagedServer:
    """Start ``python -m opd_train.serving`` (our SGLang-protocol CPU engine) and wait until it is healthy."""
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ValueError(f"{model_path!r} is not an HF model directory (no config.json)")
    port_file = None
    if port == 0:
        fd, port_file = tempfile.mkstemp(prefix="opd-engine-port-")
        os.close(fd)
        os.unlink(port_file)
    cmd = [sys.executable, "-m", "opd_train.serving", "--model", model_path, "--host", host, "--port", str(port),
           "--dtype", dtype]
    if port_file:
        cmd += ["--port-file", port_file]
    if num_threads is not None:
        cmd += ["--num-threads", str(num_threads)]
    server = ManagedServer(cmd=cmd + list(extra_args), host=host, port=port, log_path=_log_path(log_path, "engine"),
                           port_file=port_file)
    return server.start(env=env, health_timeout=health_timeout)


def launch_sglang_server(model_path: str, *, host: str = "127.0.0.1", port: int | None = None,
                         extra_args: tuple[str, ...] = (), log_path: str | None = None, health_timeout: float = 900.0,
                         python: str = sys.executable, env: dict | None = None) -> ManagedServer:
    """Start ``python -m sglang.launch_server --model-path ... --host ... --port ...`` (GPU machines) and wait for
    ``/health``. ``extra_args`` pass SGLang's own flags through untouched (``--tp``, ``--mem-fraction-static``...)."""
    if python == sys.executable and not is_sglang_available():
        raise RuntimeError("sglang is not installed in this environment (it needs a CUDA machine: `pip install "
                           "sglang` there). On CPU machines serve models with opd's own engine: "
                           "launch_cpu_engine(...) or `opd-train serve --model DIR`.")
    port = port or free_port(host)
    cmd = [python, "-m", "sglang.launch_server", "--model-path", model_path, "--host", host, "--port", str(port),
           *extra_args]
    server = ManagedServer(cmd=cmd, host=host, port=port, log_path=_log_path(log_path, "sglang"))
    return server.start(env=env, health_timeout=health_timeout)
