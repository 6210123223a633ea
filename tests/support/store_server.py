"""Real HTTP servers on 127.0.0.1 for tests: a static store server and a black hole.

``StoreServer`` serves ``<root>/<fqrn>/…`` under ``/cvmfs/<fqrn>/…`` like any static web
server (or a Stratum-1) would, counts requests per path, and can be told to delay, corrupt or
withhold chosen objects, or to answer an error status (always, or to the first N requests).
It runs its own event loop in a thread, so synchronous and asynchronous tests use it alike.
``BlackHole`` accepts TCP connections and never answers (timeouts).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
from pathlib import Path

from aiohttp import web


class StoreServer:
    def __init__(self, root: Path, delay: float = 0.0, *, delay_data_only: bool = False) -> None:
        self.root = Path(root)
        self.delay = delay
        self.delay_data_only = delay_data_only  # delay only objects (/data/), not the manifest
        self.requests: collections.Counter[str] = collections.Counter()
        self.headers: list[dict[str, str]] = []
        self.corrupt: set[str] = set()  # url paths whose body gets one byte flipped
        # url paths whose body gets its middle byte flipped: a zlib stream that inflates (to
        # wrong bytes, or until it breaks) well past its first chunk before its hash says so
        self.corrupt_middle: set[str] = set()
        self.missing: set[str] = set()  # url paths answered 404 although stored
        self.fail_status: int | None = None  # answer every request with this status
        self.fail_first = 0  # answer this many more requests with 503, then serve again
        self.gated: set[str] = set()  # url paths whose answers wait until open_gate()
        self.held: collections.Counter[str] = collections.Counter()  # requests waiting now
        self._gate: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._gate = asyncio.Event()
        app = web.Application()
        app.router.add_get("/cvmfs/{fqrn}/{rest:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = int(self._runner.addresses[0][1])
        ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[path] += 1
        self.headers.append(dict(request.headers))
        if self.delay and (not self.delay_data_only or "/data/" in path):
            await asyncio.sleep(self.delay)
        if path in self.gated:
            assert self._gate is not None
            self.held[path] += 1
            try:
                await self._gate.wait()
            finally:
                self.held[path] -= 1
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503, text="injected failure")
        if self.fail_status is not None:
            return web.Response(status=self.fail_status, text="injected failure")
        if path in self.missing:
            return web.Response(status=404)
        rel = request.match_info["rest"]
        fqrn = request.match_info["fqrn"]
        if ".." in rel.split("/") or "/" in fqrn:
            return web.Response(status=400)
        f = self.root / fqrn / rel
        if not f.is_file():
            return web.Response(status=404)
        body = f.read_bytes()
        if path in self.corrupt and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if path in self.corrupt_middle and body:
            mid = len(body) // 2
            body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :]
        return web.Response(body=body, content_type="application/octet-stream")

    def count(self, suffix: str) -> int:
        return sum(n for p, n in self.requests.items() if p.endswith(suffix))

    @property
    def total(self) -> int:
        """Requests answered or waiting, all paths together."""
        return sum(self.requests.values())

    def open_gate(self) -> None:
        """Let every held answer go (and every later request to a gated path pass)."""
        if self._gate is not None:
            self._loop.call_soon_threadsafe(self._gate.set)

    def stop(self) -> None:
        async def cleanup() -> None:
            if self._gate is not None:
                self._gate.set()  # held answers go out rather than hang the shutdown
            if self._runner is not None:
                await self._runner.cleanup()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


class BlackHole:
    """A listening socket nobody serves: connects succeed, answers never come."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()
