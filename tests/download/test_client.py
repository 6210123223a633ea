"""The download client against real servers on 127.0.0.1 that misbehave on purpose.

A small raw HTTP/1.1 server (asyncio streams: it must be able to lie about Content-Length,
stall, trickle and never end) serves named bodies; each test points a Downloader at one or
two of them and checks what comes back: right bytes, or one line saying what failed, in
bounded time and memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cvmfs_download.client import Downloader
from cvmfs_download.core import Kind, Settings
from cvmfs_download.errors import DownloadError, NotFound
from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import Algorithm, ContentHash
from cvmfs_format.proxies import parse_proxies
from tests.support.network import dead_url

GOOD = b"the right bytes\n" * 100
GOOD_HASH = ContentHash(Algorithm.SHA1, hashlib.sha1(GOOD).digest())
FAST = Settings(timeout=1.0, connect_timeout=1.0, retries=0, min_rate=64 * 1024)

Handler = Callable[[asyncio.StreamWriter, dict[str, str]], Awaitable[None]]


async def ok(w: asyncio.StreamWriter, _h: dict[str, str], body: bytes = GOOD) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


async def missing(w: asyncio.StreamWriter, _h: dict[str, str]) -> None:
    w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


async def corrupt(w: asyncio.StreamWriter, h: dict[str, str]) -> None:
    """Wrong bytes, unless asked to bypass caches (a stale cache in the way)."""
    fresh = h.get("cache-control") == "no-cache" and h.get("pragma") == "no-cache"
    await ok(w, h, GOOD if fresh else GOOD[:-1] + b"?")


async def always_corrupt(w: asyncio.StreamWriter, h: dict[str, str]) -> None:
    await ok(w, h, GOOD[:-1] + b"?")


async def endless(w: asyncio.StreamWriter, _h: dict[str, str]) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    while True:
        w.write(b"x" * 65536)
        await w.drain()


async def tenfold(w: asyncio.StreamWriter, _h: dict[str, str]) -> None:
    body = GOOD + b"y" * (9 * len(GOOD))
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


async def huge(w: asyncio.StreamWriter, _h: dict[str, str]) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n" + GOOD)


async def trickle(w: asyncio.StreamWriter, _h: dict[str, str]) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(GOOD))
    for b in GOOD:
        w.write(bytes([b]))
        await w.drain()
        await asyncio.sleep(0.5)


async def stall(w: asyncio.StreamWriter, _h: dict[str, str]) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(GOOD))
    await w.drain()
    await asyncio.sleep(3600)


async def short(w: asyncio.StreamWriter, _h: dict[str, str]) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(GOOD) + GOOD[:100])
    await w.drain()
    w.close()


class RawServer:
    """Serves every request with ``handler``; counts requests and what they asked."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[dict[str, str]] = []
        self.url = ""
        self._server: asyncio.AbstractServer | None = None

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                }
                headers[":path"] = lines[0].split()[1]
                self.requests.append(headers)
                await self.handler(w, headers)
                await w.drain()
        w.close()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/cvmfs/r.org"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1)


@contextlib.asynccontextmanager
async def serving(*handlers: Handler) -> AsyncIterator[list[RawServer]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(RawServer(h)) for h in handlers]


async def fetch(servers: list[str], settings: Settings = FAST, **kw: object) -> bytes:
    d = Downloader([[s] for s in servers], settings=settings, note=lambda _l: None)
    try:
        return await d.get("data/ab/cdef", **kw)  # type: ignore[arg-type]
    finally:
        await d.close()


async def test_right_bytes_verified() -> None:
    async with serving(ok) as (s,):
        assert await fetch([s.url], expected=GOOD_HASH, size=len(GOOD)) == GOOD
        assert s.requests[0][":path"] == "/cvmfs/r.org/data/ab/cdef"


async def test_wrong_bytes_never_returned_the_next_server_gives_the_right_ones() -> None:
    async with serving(always_corrupt, ok) as (bad, good):
        got = await fetch([bad.url, good.url], expected=GOOD_HASH, size=len(GOOD))
        assert got == GOOD
        # the next server, asked to bypass caches (a cache on the way may hold the same
        # wrong bytes)
        assert len(bad.requests) == 1 and good.requests[0]["cache-control"] == "no-cache"


async def test_a_stale_proxy_cache_is_bypassed_through_the_same_proxy() -> None:
    """A forward proxy whose cache holds wrong bytes (it gives the right ones when asked to
    revalidate): asked once more through it, with no-cache."""
    async with serving(corrupt) as (proxy,):
        origin = "http://127.0.0.1:9/cvmfs/r.org"  # only the proxy is connected to
        d = Downloader(
            [[origin]], parse_proxies(proxy.url.rsplit("/cvmfs", 1)[0]), FAST, note=print
        )
        try:
            assert await d.get("data/ab/cdef", expected=GOOD_HASH) == GOOD
        finally:
            await d.close()
        assert [r.get("cache-control") for r in proxy.requests] == [None, "no-cache"]
        assert proxy.requests[0][":path"] == origin + "/data/ab/cdef"  # an absolute URI


async def test_check_for_unhashed_files() -> None:
    def check(data: bytes) -> None:
        if not data.startswith(b"the right"):
            raise FormatError("data/ab/cdef: not a manifest")

    async with serving(always_corrupt) as (s,):
        assert await fetch([s.url], check=check) == GOOD[:-1] + b"?"  # passes the check

    async with serving(ok) as (s,):

        def refuse(_data: bytes) -> None:
            raise FormatError("data/ab/cdef: no signature")

        with pytest.raises(DownloadError, match="no signature") as e:
            await fetch([s.url], check=refuse)
        assert "cdef: data/ab/cdef" not in str(e.value)  # the check's own prefix is not repeated


async def test_not_found_everywhere_is_one_line() -> None:
    async with serving(missing, missing) as servers:
        with pytest.raises(NotFound) as e:
            await fetch([s.url for s in servers], what="/cvmfs/r.org/data/ab/cdef")
        msg = str(e.value)
        assert msg.startswith("/cvmfs/r.org/data/ab/cdef: not found on any server (")
        assert msg.count("not found (HTTP 404)") == 2 and "\n" not in msg


@pytest.mark.parametrize(
    ("handler", "words", "within"),
    [
        (endless, "sent, more than the 67.1 KiB it may have", 2.0),
        (tenfold, "content hash mismatch", 2.0),  # within its limit: 2x + 64 KiB
        (huge, "9.3 GiB announced, more than the 67.1 KiB it may have", 2.0),
        (trickle, "took longer than 2 s", 4.0),
        (stall, "no data for 1 s", 3.0),
        (short, "the response body was cut short", 2.0),
    ],
)
async def test_misbehaving_servers_end_in_bounded_time_with_one_line(
    handler: Handler, words: str, within: float
) -> None:
    async with serving(handler) as (s,):
        t = time.monotonic()
        with pytest.raises(DownloadError) as e:
            await fetch([s.url], expected=GOOD_HASH, size=len(GOOD))
        assert time.monotonic() - t < within
        msg = str(e.value)
        assert words in msg and s.url in msg and "\n" not in msg, msg
        assert "Error" not in msg and "Exception" not in msg, msg  # no library names


async def test_unknown_size_endless_manifest_is_cut_at_its_limit() -> None:
    async with serving(endless) as (s,):
        with pytest.raises(DownloadError, match="more than the 4.0 MiB it may have"):
            await fetch([s.url], kind=Kind.MANIFEST)


async def test_dead_server_then_good_one() -> None:
    async with serving(ok) as (good,):
        dead = dead_url() + "/cvmfs/r.org"
        lines: list[str] = []
        d = Downloader([[dead], [good.url]], settings=FAST, note=lines.append)
        try:
            assert await d.get("data/ab/cdef", expected=GOOD_HASH) == GOOD
            assert await d.get("data/ab/cdef", expected=GOOD_HASH) == GOOD
        finally:
            await d.close()
        assert len(lines) == 1 and lines[0].startswith(f"switched to server {good.url} after: ")
        assert "cannot connect (connection refused)" in lines[0], lines
        assert d.stats.by_route[dead].requests == 1  # avoided for the second request


async def test_to_a_file_verified_and_nothing_left_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "obj.tmp"
    async with serving(ok, always_corrupt) as (good, bad):
        d = Downloader([[good.url]], settings=FAST)
        try:
            assert await d.get_file("data/ab/cdef", dest, expected=GOOD_HASH) == len(GOOD)
        finally:
            await d.close()
        assert dest.read_bytes() == GOOD
        dest.unlink()
        d = Downloader([[bad.url]], settings=FAST, note=lambda _l: None)
        try:
            with pytest.raises(DownloadError, match="content hash mismatch"):
                await d.get_file("data/ab/cdef", dest, expected=GOOD_HASH)
        finally:
            await d.close()
        assert not dest.exists()


async def test_concurrent_requests_for_one_file_share_one_download() -> None:
    async with serving(ok) as (s,):
        d = Downloader([[s.url]], settings=FAST)
        try:
            got = await asyncio.gather(
                *(d.get("data/ab/cdef", expected=GOOD_HASH) for _ in range(10))
            )
        finally:
            await d.close()
        assert got == [GOOD] * 10 and len(s.requests) == 1 and d.stats.collapsed == 9
