"""A scripted SGLang stand-in for tests and fault drills (no model): replays canned bodies, injects faults.

``LoopbackServer`` answers each request with the next scripted :class:`Reply` (or a default one): a status and a
body (JSON or raw bytes), optionally after a delay, or ``drop=True`` to close the connection with no response (what
SGLang 0.5.23 does when it crashes). It records every request (path + parsed body) and the peak number of requests
in flight, so tests can count retries and check a client's concurrency limit.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from aiohttp import web


@dataclass
class Reply:
    status: int = 200
    body: Any = None                # JSON-serialisable, or bytes/str sent as is
    delay: float = 0.0              # seconds before answering (timeouts)
    drop: bool = False              # close the connection without any response
    content_type: str = "application/json"


class LoopbackServer:
    """``with LoopbackServer() as srv: srv.script(Reply(...), ...); ... srv.url ...``"""

    def __init__(self, host: str = "127.0.0.1", default: Reply | Callable[[str, Any], Reply] | None = None):
        self.host = host
        self.port = 0
        self.default = default or Reply(404, {"error": {"message": "no scripted reply"}})
        self.requests: list[tuple[str, Any]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._script: deque[Reply] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def script(self, *replies: Reply) -> None:
        self._script.extend(replies)

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        self.requests.append((request.path, body))
        reply = self._script.popleft() if self._script else (
            self.default(request.path, body) if callable(self.default) else self.default)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.drop:
                request.transport.close()       # like a crashed server: no status line at all
                raise asyncio.CancelledError
            data = reply.body if isinstance(reply.body, (bytes, str)) else orjson.dumps(reply.body)
            return web.Response(status=reply.status, body=data, content_type=reply.content_type)
        finally:
            self.in_flight -= 1

    def start(self) -> "LoopbackServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def boot():
            app = web.Application(client_max_size=1 << 28)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        def run():
            self._loop.run_until_complete(boot())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="sglang-loopback", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("loopback server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
