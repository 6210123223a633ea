"""What every transport shares, with no HTTP library: the failure of one attempt, the sink its
bytes go to, the words for sizes and times, and ``file://`` servers.

Kept apart from :mod:`cvmfs_download.http` so that plain ``http://`` downloads (the lean
transport, :mod:`cvmfs_download.h1`) never import aiohttp (~0.15 s of a job's start).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import unquote, urlsplit

from cvmfs_download.core import Blame, Route
from cvmfs_download.errors import human_size, network_reason

Sink = Callable[[bytes], None]
CHUNK = 256 * 1024


class Transport(Protocol):
    """One bounded GET into a sink (its size, or :class:`Failed`), and closing the pool."""

    async def get(
        self,
        route: Route,
        path: str,
        sink: Sink,
        *,
        limit: int,
        deadline: float,
        no_cache: bool = False,
        revalidate: bool = False,
    ) -> int: ...

    async def close(self) -> None: ...


class Failed(Exception):
    """One attempt failed: ``blame`` says whom it is held against."""

    def __init__(self, blame: Blame, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.blame = blame
        self.reason = reason
        self.status = status  # the HTTP status that failed it, if one did


class SinkFailed(Exception):
    """Where the bytes go failed (a full disk): the caller's trouble, not the server's."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def into(sink: Sink, chunk: bytes) -> None:
    try:
        sink(chunk)
    except OSError as e:
        raise SinkFailed(e) from None


def secs(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def too_big(n: int, limit: int, how: str = "announced") -> str:
    return f"{human_size(n)} {how}, more than the {human_size(limit)} it may have"


def read_file(url: str, sink: Sink, limit: int) -> int:
    """A server given as file://: a local store (read in chunks, never past the limit)."""
    path = unquote(urlsplit(url).path)
    got = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                got += len(chunk)
                if got > limit:
                    raise Failed(Blame.DATA, too_big(got, limit, "in the file"))
                into(sink, chunk)
    except SinkFailed as e:
        raise e.error from None
    except FileNotFoundError:
        raise Failed(Blame.NOBODY, "not found") from None
    except OSError as e:
        raise Failed(Blame.HOST, network_reason(e)) from None
    return got


async def probe(transport: Transport, route: Route, path: str) -> tuple[bool, str]:
    """Ask once for a small file (``--check``): (answered 200, "HTTP 200 in 3 ms" or why not);
    any HTTP status is reported as "HTTP <status> in <ms>"."""
    t0 = time.perf_counter()
    status = 200
    try:
        await transport.get(route, path, lambda _c: None, limit=4 << 20, deadline=30.0)
    except Failed as f:
        if f.status is None:
            return False, f.reason
        status = f.status
    return status == 200, f"HTTP {status} in {(time.perf_counter() - t0) * 1000:.0f} ms"
