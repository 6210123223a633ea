"""hep-exec's fetcher: the one download client (cvmfs_download) on its own event-loop
thread, with a blocking, thread-safe API on top.

Each of hep-exec's ``--proxy`` URLs is a base URL serving ``/cvmfs/<fqrn>/…`` (hep-proxy, or
any static server of a store): to the download client they are servers, in fail-over groups
load-balanced inside (``a|b;c``).  A server that fails is tried last for
``proxy_reset_after`` seconds, so a dead one costs one timeout, not one per request.  Every
answer is bounded (its size by what it is, an overall deadline besides the idle timeout) and
verified against its content hash before anyone sees it: a corrupt answer is asked for
elsewhere (caches bypassed), and wrong bytes are never returned.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from cvmfs_download.core import Kind, Settings
from cvmfs_download.errors import DownloadError as FetchError
from cvmfs_download.errors import NotFound
from cvmfs_format.hashes import ContentHash
from cvmfs_format.objects import verify_stored
from cvmfs_format.proxies import ProxyGroups

if TYPE_CHECKING:
    import asyncio

    from cvmfs_download.client import Downloader
    from worker.config import ExecConfig

__all__ = ["USER_AGENT", "Check", "FetchError", "Fetcher", "Kind", "NotFound"]

log = logging.getLogger("hep_exec.fetcher")
T = TypeVar("T")
USER_AGENT = "hep-exec/0.1 (cvmfs-compatible)"
Check = Callable[[bytes], None]
# (url path, hash, what[, size]): one fetch of get_many/prefetch
Item = tuple[str, ContentHash | None, str] | tuple[str, ContentHash | None, str, int | None]


def _size(rest: list[Any]) -> int | None:
    return rest[0] if rest else None


class ProxyState:
    """One server's figures, read live from the download client (``--stats``, tests)."""

    def __init__(self, url: str, fetcher: Fetcher) -> None:
        self.url = url
        self._fetcher = fetcher

    def _route(self) -> Any:
        d = self._fetcher._downloader
        return None if d is None else d.stats.by_route.get(self.url)

    @property
    def requests(self) -> int:
        r = self._route()
        return 0 if r is None else int(r.requests)

    @property
    def failures(self) -> int:
        r = self._route()
        return 0 if r is None else int(r.failures)

    @property
    def corrupt(self) -> int:
        r = self._route()
        return 0 if r is None else int(r.corrupt)

    @property
    def dead_until(self) -> float:
        d = self._fetcher._downloader
        return 0.0 if d is None else d.failover.avoided_until(self.url)


class FetchStats:
    """The download client's counters (zero until the first request starts it)."""

    def __init__(self, fetcher: Fetcher, urls: Sequence[str]) -> None:
        self._fetcher = fetcher
        self.by_proxy = {u: ProxyState(u, fetcher) for u in urls}

    def _get(self, name: str) -> int:
        d = self._fetcher._downloader
        return 0 if d is None else int(getattr(d.stats, name))

    requests = property(lambda self: self._get("requests"))
    bytes_fetched = property(lambda self: self._get("bytes_fetched"))
    failures = property(lambda self: self._get("failures"))
    corrupt = property(lambda self: self._get("corrupt"))
    not_found = property(lambda self: self._get("not_found"))
    retries = property(lambda self: self._get("retries"))
    collapsed = property(lambda self: self._get("collapsed"))


def _new_loop() -> asyncio.AbstractEventLoop:
    import asyncio

    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()


class Fetcher:
    """Thread-safe object fetcher; start() spawns the loop thread, close() stops it."""

    @classmethod
    def from_config(cls, config: ExecConfig, max_connections: int = 32) -> Fetcher:
        """A fetcher with the proxies, timeouts and retry policy of a hep-exec config."""
        return cls(
            config.proxies,
            timeout=config.timeout,
            connect_timeout=config.connect_timeout,
            retries=config.retries,
            backoff_init=config.backoff_init,
            backoff_max=config.backoff_max,
            proxy_reset_after=config.proxy_reset_after,
            max_connections=max_connections,
        )

    def __init__(
        self,
        proxies: ProxyGroups,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        retries: int = 1,
        backoff_init: float = 0.1,
        backoff_max: float = 2.0,
        proxy_reset_after: float = 300.0,
        max_connections: int = 32,
        rng: random.Random | None = None,
    ) -> None:
        members = [p for g in proxies.groups for p in g]
        if not members or any(p is None for p in members):
            raise ValueError("fetcher needs http:// proxies (DIRECT is not supported)")
        self.proxies = proxies
        self.timeout = timeout
        self.settings = Settings(
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            backoff_init=backoff_init,
            backoff_max=backoff_max,
            host_reset_after=proxy_reset_after,  # hep-exec's proxies are the servers
            proxy_reset_after=proxy_reset_after,
            max_connections=max_connections,
            user_agent=USER_AGENT,
        )
        self._rng = rng
        self._downloader: Downloader | None = None
        self.stats = FetchStats(self, [str(p) for p in members])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wanted = False
        self._start_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Fetcher:
        """Make the fetcher usable; its thread, event loop and HTTP session (asyncio and
        aiohttp, ~0.15 s to import) come with the first request, so a job that fetches
        nothing (its service fetches for it, or it never touches /cvmfs) starts without."""
        self._wanted = True
        return self

    def _start_loop(self) -> asyncio.AbstractEventLoop:
        import asyncio

        with self._start_lock:
            if self._loop is not None:
                return self._loop
            if not self._wanted:
                raise RuntimeError("fetcher not started")
            loop = _new_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name="hep-exec-fetcher", daemon=True)
            self._thread.start()
            ready.wait()
            asyncio.run_coroutine_threadsafe(self._open_session(), loop).result()
            self._loop = loop
            return loop

    async def _open_session(self) -> None:
        from cvmfs_download.client import Downloader
        from cvmfs_download.core import Failover

        groups = [[str(p) for p in g] for g in self.proxies.groups]
        d = Downloader(groups, None, self.settings, note=log.warning)
        if self._rng is not None:  # a fixed load-balancing order (tests)
            d.failover = Failover(groups, None, self.settings, self._rng)
        self._downloader = d

    def close(self) -> None:
        with self._start_lock:
            loop, self._loop, self._wanted = self._loop, None, False
        if loop is None:
            return
        import asyncio

        async def shutdown() -> None:
            if self._downloader is not None:
                await self._downloader.close()

        fut = asyncio.run_coroutine_threadsafe(shutdown(), loop)
        with contextlib.suppress(Exception):
            fut.result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        loop.close()

    def __enter__(self) -> Fetcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ blocking API

    def get(
        self,
        url_path: str,
        expected: ContentHash | None = None,
        what: str = "",
        check: Check | None = None,
        *,
        kind: Kind | None = None,
        size: int | None = None,
    ) -> bytes:
        """Stored bytes of ``url_path`` (``/cvmfs/<fqrn>/…``), verified against ``expected``.

        ``check`` (for unhashed files such as the manifest) raises FormatError on bytes that
        must be fetched from another proxy instead.  ``kind`` (default: by its name) and
        ``size`` (the catalog's) bound the answer.  Raises FetchError/NotFound (one line).
        """
        return self._call(self.fetch(url_path, expected, what, check, kind, size))

    def get_many(self, items: Iterable[Item]) -> list[bytes | BaseException]:
        """Fetch concurrently; results (or the exception per item) in input order."""
        import asyncio

        async def all_of() -> list[bytes | BaseException]:
            return await asyncio.gather(
                *(self.fetch(u, h, w, size=_size(rest)) for u, h, w, *rest in items),
                return_exceptions=True,
            )

        return self._call(all_of())

    def submit(
        self,
        url_path: str,
        expected: ContentHash | None = None,
        what: str = "",
        *,
        size: int | None = None,
    ) -> Future[bytes]:
        """Start one fetch (single-flight, verified, with fail-over) and return at once:
        callers stream big files by keeping a few of these in flight."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(
            self.fetch(url_path, expected, what, size=size), self._require_loop()
        )

    def prefetch(self, items: Iterable[Item]) -> Future[Any]:
        """Start fetching in the background; the returned future resolves to get_many's list."""
        import asyncio

        loop = self._require_loop()
        wanted = list(items)

        async def all_of() -> list[bytes | BaseException]:
            return await asyncio.gather(
                *(self.fetch(u, h, w, size=_size(rest)) for u, h, w, *rest in wanted),
                return_exceptions=True,
            )

        return asyncio.run_coroutine_threadsafe(all_of(), loop)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        return loop if loop is not None else self._start_loop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        import asyncio

        loop = self._require_loop()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking fetcher call from its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    # ------------------------------------------------------------------ async core

    async def fetch(
        self,
        url_path: str,
        expected: ContentHash | None = None,
        what: str = "",
        check: Check | None = None,
        kind: Kind | None = None,
        size: int | None = None,
    ) -> bytes:
        """Single-flight: concurrent fetches of one (path, hash) share one request."""
        assert self._downloader is not None
        return await self._downloader.get(
            url_path, expected=expected, kind=kind, size=size, check=check, what=what or url_path
        )

    # ------------------------------------------------------------------ --check support

    def probe(self, url_path: str) -> list[tuple[str, bool, str]]:
        """Ask every proxy for ``url_path`` once: (proxy, ok, 'HTTP 200 in 3 ms' or error)."""
        import asyncio

        from cvmfs_download.core import Route
        from cvmfs_download.http import HttpTransport, probe

        async def all_of() -> list[tuple[str, bool, str]]:
            assert self._downloader is not None
            transport = self._downloader.transport
            assert isinstance(transport, HttpTransport)
            urls = list(self.stats.by_proxy)
            got = await asyncio.gather(*(probe(transport, Route(u, None), url_path) for u in urls))
            return [(u, ok, detail) for u, (ok, detail) in zip(urls, got, strict=True)]

        return self._call(all_of())


def check_stored(
    data: bytes, expected: ContentHash | None, what: str, check: Check | None = None
) -> None:
    """The checks every answer passes before anyone sees it, wherever it came from: its
    content hash, and ``check`` for unhashed files; FormatError says what is wrong."""
    if expected is not None:
        verify_stored(data, expected, what)
    if check is not None:
        check(data)


def object_url(fqrn: str, relpath: str) -> str:
    """``/cvmfs/<fqrn>/<relpath>``: where a proxy serves a repository file."""
    return f"/cvmfs/{fqrn}/{relpath.lstrip('/')}"


def proxy_urls(proxies: ProxyGroups) -> Sequence[str]:
    return [str(p) for g in proxies.groups for p in g if p is not None]
