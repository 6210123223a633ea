"""Verified, bounded downloads with CernVM-FS fail-over: the core's decisions over the transport.

Every answer is checked before anyone sees it (its content hash, or ``check`` for files that
have none, such as the manifest); wrong bytes count as a failure of that route and are asked
for again elsewhere, never returned.  Concurrent requests for the same file share one
download.  Files too big for memory stream into a file the caller names (and renames into
place once this returns: nothing unverified ever gets a final name).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from cvmfs_download.core import (
    Attempts,
    Blame,
    Failover,
    Kind,
    Route,
    Settings,
    body_limit,
    deadline,
    kind_of_path,
)
from cvmfs_download.errors import DownloadError, NotFound
from cvmfs_download.h1 import make_transport
from cvmfs_download.wire import Failed, Transport
from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import ContentHash, Hasher
from cvmfs_format.proxies import ProxyGroups

log = logging.getLogger("cvmfs_download")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
Check = Callable[[bytes], None]  # raises FormatError for bytes to be fetched elsewhere


@dataclass
class RouteStats:
    requests: int = 0
    failures: int = 0
    corrupt: int = 0


@dataclass
class Stats:
    requests: int = 0
    bytes_fetched: int = 0
    failures: int = 0
    corrupt: int = 0
    not_found: int = 0
    retries: int = 0
    collapsed: int = 0
    by_route: dict[str, RouteStats] = field(default_factory=dict)  # "server [via proxy]"


class Downloader:
    """One client's downloads: ``servers`` are fail-over groups of base URLs (a path is
    appended to one), ``proxies`` the forward proxies (None: DIRECT)."""

    def __init__(
        self,
        servers: Sequence[Sequence[str]],
        proxies: ProxyGroups | None = None,
        settings: Settings | None = None,
        *,
        transport: Transport | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.failover = Failover(servers, proxies, self.settings)
        self.transport: Transport = transport or make_transport(self.settings)
        self.note = note or log.warning  # "switched to server …": a request got through
        self.last_route: Route | None = None  # where the last success came from
        self.stats = Stats()
        self._inflight: dict[tuple[str, ContentHash | None], asyncio.Future[bytes]] = {}
        self._per_route: dict[Route, RouteStats] = {}

    async def close(self) -> None:
        await self.transport.close()

    async def get(
        self,
        path: str,
        *,
        expected: ContentHash | None = None,
        kind: Kind | None = None,
        size: int | None = None,
        check: Check | None = None,
        what: str = "",
        revalidate: bool = False,
    ) -> bytes:
        """The bytes of ``path`` (relative to a server's base URL), verified against
        ``expected`` and ``check``; ``kind`` (default: by its name) and ``size`` (the
        catalog's) bound it; ``revalidate``: caches on the way must check with the server
        (``Cache-Control: max-age=0``: a manifest, for a replica).  Raises DownloadError or
        NotFound (one line)."""
        kind = kind or kind_of_path(path)
        key = (path, expected)
        shared = self._inflight.get(key)
        if shared is not None and check is None:
            self.stats.collapsed += 1
            return await asyncio.shield(shared)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if check is None:
            self._inflight[key] = fut
        try:
            data = await self._run(
                path, what or path, kind, size, lambda: _Memory(expected, check), revalidate
            )
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        fut.set_result(data)
        return data

    async def get_file(
        self,
        path: str,
        dest: str | os.PathLike[str],
        *,
        expected: ContentHash,
        kind: Kind | None = None,
        size: int | None = None,
        what: str = "",
    ) -> int:
        """Stream ``path`` into the file ``dest`` (created or truncated), verified; its size.
        On failure ``dest`` is removed.  Raises DownloadError or NotFound (one line)."""
        kind = kind or kind_of_path(path)
        try:
            return await self._run(path, what or path, kind, size, lambda: _ToFile(dest, expected))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dest)
            raise

    async def stream(
        self,
        path: str,
        on_chunk: Callable[[bytes | None], None],
        *,
        expected: ContentHash,
        kind: Kind | None = None,
        size: int | None = None,
        what: str = "",
    ) -> int:
        """Hand ``path``'s answer to ``on_chunk`` chunk by chunk as it arrives (hashed on
        the way), so that the caller can work on it meanwhile; ``on_chunk(None)`` when an
        attempt that gave chunks failed and the next one starts from the beginning.  Returns
        the size once the hash is verified: until then the chunks are unverified, and
        nothing made of them may be shown to anyone.  Raises DownloadError or NotFound."""
        kind = kind or kind_of_path(path)
        return await self._run(path, what or path, kind, size, lambda: _Forward(on_chunk, expected))

    async def _run(
        self,
        path: str,
        what: str,
        kind: Kind,
        size: int | None,
        make: Callable[[], _Receiver[T]],
        revalidate: bool = False,
    ) -> T:
        attempts = Attempts(self.failover, time.monotonic())
        limit = body_limit(kind, size)
        allowed = deadline(self.settings, size, limit)
        while (step := attempts.next(time.monotonic())) is not None:
            route, delay = step
            if delay:
                self.stats.retries += 1
                await asyncio.sleep(delay)
            per = self._per_route.get(route)
            if per is None:
                name = route.server if route.proxy is None else f"{route.server} via {route.proxy}"
                per = self._per_route[route] = self.stats.by_route.setdefault(name, RouteStats())
            per.requests += 1
            self.stats.requests += 1
            receiver = make()
            try:
                n = await self.transport.get(
                    route,
                    path,
                    receiver.write,
                    limit=limit,
                    deadline=allowed,
                    no_cache=attempts.no_cache,
                    revalidate=revalidate,
                )
                result = receiver.finish(what)
            except Failed as f:
                receiver.discard()
                if f.blame is not Blame.NOBODY:
                    self.stats.failures += 1
                    per.failures += 1
                if f.blame is Blame.DATA:
                    self.stats.corrupt += 1
                    per.corrupt += 1
                attempts.failed(route, f.blame, f.reason, path, time.monotonic())
                continue
            except BaseException:
                receiver.discard()
                raise
            self.stats.bytes_fetched += n
            self.last_route = route
            line = attempts.switched(route)
            if line:
                self.note(line)
            return result
        if attempts.not_found:
            self.stats.not_found += 1
            raise NotFound(what, attempts.failures)
        raise DownloadError(what, attempts.failures, attempts.bad_data)


class _Receiver(Protocol[T_co]):
    def write(self, chunk: bytes) -> None: ...
    def finish(self, what: str) -> T_co: ...
    def discard(self) -> None: ...


class _Memory:
    """An answer kept in memory, verified at the end (its chunks joined once: an answer
    that came in one chunk is not copied at all)."""

    def __init__(self, expected: ContentHash | None, check: Check | None) -> None:
        self.chunks: list[bytes] = []
        self.hasher = expected.algorithm.new() if expected is not None else None
        self.expected = expected
        self.check = check

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        if self.hasher is not None:
            self.hasher.update(chunk)

    def finish(self, what: str) -> bytes:
        data = b"".join(self.chunks)
        _verify(self.hasher, self.expected)
        if self.check is not None:
            try:
                self.check(data)
            except FormatError as e:
                raise Failed(Blame.DATA, str(e).removeprefix(f"{what}: ")) from None
        return data

    def discard(self) -> None:
        self.chunks = []


class _Forward:
    """An answer handed on chunk by chunk, hashed on the way; a failed attempt that handed
    some on says so (None), so that its receiver starts again."""

    def __init__(self, on_chunk: Callable[[bytes | None], None], expected: ContentHash) -> None:
        self.on_chunk = on_chunk
        self.hasher = expected.algorithm.new()
        self.expected = expected
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.size += len(chunk)
        self.on_chunk(chunk)

    def finish(self, what: str) -> int:
        _verify(self.hasher, self.expected)
        return self.size

    def discard(self) -> None:
        if self.size:
            self.size = 0
            self.on_chunk(None)


class _ToFile:
    """An answer streamed into a file, hashed on the way."""

    def __init__(self, dest: str | os.PathLike[str], expected: ContentHash) -> None:
        self.dest = dest
        self.fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.hasher = expected.algorithm.new()
        self.expected = expected
        self.size = 0

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:  # named: the message says where (a full or capped disk)
            raise OSError(e.errno, e.strerror, str(self.dest)) from None
        self.hasher.update(chunk)
        self.size += len(chunk)

    def finish(self, what: str) -> int:
        os.close(self.fd)
        self.fd = -1
        _verify(self.hasher, self.expected)
        return self.size

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _verify(hasher: Hasher | None, expected: ContentHash | None) -> None:
    if expected is None or hasher is None:
        return
    digest = hasher.digest()
    if digest != expected.digest:
        got = ContentHash(expected.algorithm, digest)
        raise Failed(Blame.DATA, f"content hash mismatch (got {got.hex})")
