"""hep-exec's fetcher: the one download client (cvmfs_download) on its own event-loop
thread, with a blocking, thread-safe API on top.

Servers are as CernVM-FS names them (``CVMFS_SERVER_URL``: hep-proxy instances and
Stratum-1s, ``http://host:port/cvmfs/@fqrn@``), in fail-over groups (``;``; ``|``
load-balances inside a group), reached directly or through forward proxies
(``CVMFS_HTTP_PROXY``: ``a|b;c``, ``DIRECT``).  Repositories with the same routes share one
download client (and its memory of failed servers): a server that fails is tried last for a
while, so a dead one costs one timeout, not one per request.  Every answer is bounded (its
size by what it is, an overall deadline besides the idle timeout) and verified against its
content hash before anyone sees it: a corrupt answer is asked for elsewhere (caches
bypassed), and wrong bytes are never returned.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from cvmfs_download.core import Kind, Settings
from cvmfs_download.errors import DownloadError as FetchError
from cvmfs_download.errors import NotFound
from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import ContentHash
from cvmfs_format.objects import verify_stored
from cvmfs_format.proxies import ProxyGroups, ServerGroups, expand_servers

if TYPE_CHECKING:
    import asyncio
    import random
    from concurrent.futures import Future

    from cvmfs_download.client import Downloader
    from worker.config import ExecConfig

__all__ = ["USER_AGENT", "Check", "FetchError", "Fetcher", "Kind", "NotFound"]

log = logging.getLogger("hep_exec.fetcher")
T = TypeVar("T")
USER_AGENT = "hep-exec/0.1 (cvmfs-compatible)"
Check = Callable[[bytes], None]
# (url path, hash, what[, size]): one fetch of get_many/prefetch
Item = tuple[str, ContentHash | None, str] | tuple[str, ContentHash | None, str, int | None]


class _End:
    """The end of a streamed download (its outcome is its future's)."""


_END = _End()


def _size(rest: list[Any]) -> int | None:
    return rest[0] if rest else None


class ProxyState:
    """One server's figures, read live from the download clients (``--stats``, tests)."""

    def __init__(self, url: str, fetcher: Fetcher) -> None:
        self.url = url
        self._fetcher = fetcher

    def _sum(self, name: str) -> int:
        total = 0
        for d in self._fetcher._downloaders.values():
            for route, r in d.stats.by_route.items():
                if route == self.url or route.startswith(self.url + " via "):
                    total += int(getattr(r, name))
        return total

    requests = property(lambda self: self._sum("requests"))
    failures = property(lambda self: self._sum("failures"))
    corrupt = property(lambda self: self._sum("corrupt"))

    @property
    def dead_until(self) -> float:
        return max(
            (d.failover.avoided_until(self.url) for d in self._fetcher._downloaders.values()),
            default=0.0,
        )


class FetchStats:
    """The download clients' counters (zero until the first request starts one)."""

    def __init__(self, fetcher: Fetcher, urls: Sequence[str]) -> None:
        self._fetcher = fetcher
        self.by_proxy = {u: ProxyState(u, fetcher) for u in urls}

    def _get(self, name: str) -> int:
        return sum(int(getattr(d.stats, name)) for d in self._fetcher._downloaders.values())

    requests = property(lambda self: self._get("requests"))
    bytes_fetched = property(lambda self: self._get("bytes_fetched"))
    failures = property(lambda self: self._get("failures"))
    corrupt = property(lambda self: self._get("corrupt"))
    not_found = property(lambda self: self._get("not_found"))
    retries = property(lambda self: self._get("retries"))
    collapsed = property(lambda self: self._get("collapsed"))


SUFFIX = "/cvmfs/@fqrn@"


class Routes(NamedTuple):
    """Where one repository's files come from: base URLs that a request path is appended to
    (``/cvmfs/<fqrn>/…`` when ``whole_path``, else the path inside the repository), and the
    forward proxies (None: DIRECT)."""

    servers: tuple[tuple[str, ...], ...]
    proxies: ProxyGroups | None
    whole_path: bool


def routes_of(servers: ServerGroups, proxies: ProxyGroups | None, fqrn: str) -> Routes:
    """Servers named the usual way (``…/cvmfs/@fqrn@``) serve every repository from one
    base URL, so all repositories share one client; other templates get one per repository."""
    if all(u.endswith(SUFFIX) and "@" not in u[: -len(SUFFIX)] for g in servers for u in g):
        bases = tuple(tuple(u[: -len(SUFFIX)] for u in g) for g in servers)
        return Routes(bases, proxies, True)
    expanded = tuple(tuple(g) for g in expand_servers(servers, fqrn))
    return Routes(expanded, proxies, False)


def _split(url_path: str) -> tuple[str, str]:
    """``/cvmfs/<fqrn>/<rest>`` -> (fqrn, rest)."""
    parts = url_path.lstrip("/").split("/", 2)
    if len(parts) < 2 or parts[0] != "cvmfs" or not parts[1]:
        raise ValueError(f"not a repository path: {url_path!r}")
    return parts[1], parts[2] if len(parts) > 2 else ""


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
        """A fetcher with the servers, proxies, timeouts and retry policy of a hep-exec
        config (and, per repository, of the site's CernVM-FS configuration)."""
        from worker.sites import routes_for

        return cls(
            config.servers,
            config.proxies,
            timeout=config.timeout,
            connect_timeout=config.connect_timeout,
            retries=config.retries,
            backoff_init=config.backoff_init,
            backoff_max=config.backoff_max,
            proxy_reset_after=config.proxy_reset_after,
            max_connections=max_connections,
            routes=lambda fqrn: routes_for(config, fqrn),
        )

    def __init__(
        self,
        servers: ServerGroups,
        proxies: ProxyGroups | None = None,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        retries: int = 1,
        backoff_init: float = 0.1,
        backoff_max: float = 2.0,
        proxy_reset_after: float = 300.0,
        max_connections: int = 32,
        rng: random.Random | None = None,
        routes: Callable[[str], Routes] | None = None,
    ) -> None:
        if routes is None and (not servers or not all(servers)):
            raise ValueError("fetcher needs at least one server")
        self.servers = servers
        self.proxies = proxies
        self.timeout = timeout
        self.settings = Settings(
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            backoff_init=backoff_init,
            backoff_max=backoff_max,
            host_reset_after=proxy_reset_after,
            proxy_reset_after=proxy_reset_after,
            max_connections=max_connections,
            user_agent=USER_AGENT,
        )
        self._routes = routes or (lambda fqrn: routes_of(servers, proxies, fqrn))
        self._rng = rng
        self._transport: Any = None
        self._downloaders: dict[Routes, Downloader] = {}
        self._by_fqrn: dict[str, tuple[Downloader, bool]] = {}
        some = routes_of(servers, proxies, "@fqrn@").servers if servers else ()
        self.stats = FetchStats(self, [u for g in some for u in g])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wanted = False
        self._start_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Fetcher:
        """Make the fetcher usable; its thread, event loop and connection pool (asyncio, and
        aiohttp for https:// servers only) come with the first request, so a job that
        fetches nothing (its service fetches for it, or it never touches /cvmfs) starts
        without."""
        self._wanted = True
        return self

    def warm(self) -> None:
        """Start the thread, event loop and HTTP client now (asyncio and the client's imports:
        ~25 ms here), not on the first request."""
        self._require_loop()

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
        from cvmfs_download.h1 import make_transport

        self._transport = make_transport(self.settings)

    def _downloader_for(self, fqrn: str) -> tuple[Downloader, bool]:
        """The download client of ``fqrn``'s routes (event-loop thread only)."""
        got = self._by_fqrn.get(fqrn)
        if got is not None:
            return got
        from cvmfs_download.client import Downloader
        from cvmfs_download.core import Failover

        try:
            routes = self._routes(fqrn)
        except FormatError as e:  # the site's files for this repository are wrong
            err = FetchError(f"/cvmfs/{fqrn}", [str(e)])
            err.args = (str(e),)
            raise err from None
        d = self._downloaders.get(routes)
        if d is None:
            groups = [list(g) for g in routes.servers]
            d = Downloader(
                groups, routes.proxies, self.settings, transport=self._transport, note=log.warning
            )
            if self._rng is not None:  # a fixed load-balancing order (tests)
                d.failover = Failover(groups, routes.proxies, self.settings, self._rng)
            self._downloaders[routes] = d
        self._by_fqrn[fqrn] = (d, routes.whole_path)
        return d, routes.whole_path

    def close(self) -> None:
        with self._start_lock:
            loop, self._loop, self._wanted = self._loop, None, False
        if loop is None:
            return
        import asyncio

        async def shutdown() -> None:
            # fetches nobody waits for any more (a chunked file's read-ahead after a failed
            # chunk, a prefetch): cancelled and awaited, so none is destroyed while pending
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            if self._transport is not None:
                await self._transport.close()

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

    def catalog(
        self, url_path: str, expected: ContentHash, what: str = "", *, size: int | None = None
    ) -> bytes:
        """A catalog's SQLite bytes: fetched, verified against ``expected``, inflated here
        (FetchError/NotFound, or FormatError for a corrupt or oversized stream)."""
        from cvmfs_format.catalog import inflate_catalog  # sqlite3: only once a job mounts

        return inflate_catalog(self.get(url_path, expected, what, size=size), what)

    def stream(
        self, url_path: str, expected: ContentHash, what: str = "", *, size: int | None = None
    ) -> Iterator[bytes | None]:
        """The stored bytes of ``url_path`` chunk by chunk as they arrive, so that the caller
        inflates and writes one while the next comes and is hashed here (an object's fetch
        and its writing overlap on two CPUs); None: the download starts again from another
        server, and so must the caller.  The loop ends once the hash is verified, or raises
        FetchError/NotFound (one line).  Until it ends the chunks are unverified: nothing
        made of them may be shown to anyone.  Leaving the loop early stops the download."""
        import asyncio

        loop = self._require_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking fetcher call from its own event loop")
        import queue

        chunks: queue.SimpleQueue[bytes | _End | None] = queue.SimpleQueue()

        async def download() -> int:
            fqrn, rest = _split(url_path)
            d, whole = self._downloader_for(fqrn)
            return await d.stream(
                url_path if whole else rest,
                chunks.put,
                expected=expected,
                size=size,
                what=what or url_path,
            )

        done = asyncio.run_coroutine_threadsafe(download(), loop)
        done.add_done_callback(lambda _f: chunks.put(_END))
        try:
            while not isinstance(item := chunks.get(), _End):
                yield item
            done.result()  # its FetchError, NotFound
        finally:
            done.cancel()  # the caller stopped early: so does the download

    def get_many(self, items: Iterable[Item]) -> list[bytes | BaseException]:
        """Fetch concurrently; results (or the exception per item) in input order."""
        import asyncio

        async def all_of() -> list[bytes | BaseException]:
            return await asyncio.gather(
                *(self.fetch(u, h, w, size=_size(rest)) for u, h, w, *rest in items),
                return_exceptions=True,
            )

        return self._call(all_of())

    def ahead(self, url_path: str) -> None:
        """(A hint that ``get`` of this comes soon: nothing to gain without a service.)"""

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

    def prefetch(self, items: Iterable[Item], into: Future[Any] | None = None) -> Future[Any]:
        """Start fetching in the background; the returned future resolves to get_many's list.
        ``into``: the future to resolve (one that others may wait on already), returned."""
        import asyncio

        loop = self._require_loop()
        wanted = list(items)

        async def all_of() -> list[bytes | BaseException]:
            return await asyncio.gather(
                *(self.fetch(u, h, w, size=_size(rest)) for u, h, w, *rest in wanted),
                return_exceptions=True,
            )

        done = asyncio.run_coroutine_threadsafe(all_of(), loop)
        if into is None:
            return done

        def relay(f: Future[Any]) -> None:
            if f.cancelled():
                into.cancel()
            elif (e := f.exception()) is not None:
                into.set_exception(e)
            else:
                into.set_result(f.result())

        done.add_done_callback(relay)
        return into

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        return loop if loop is not None else self._start_loop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            loop = self._require_loop()
        except BaseException:  # closed (a mount ahead that outlasted its job): never run
            coro.close()
            raise
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking fetcher call from its own event loop")
        # run_coroutine_threadsafe without its chained concurrent Future (a Condition, its
        # locks and two callbacks a call): a bare lock is the whole hand-back, ~20 µs less
        # CPU for each object a job fetches
        done = _thread.allocate_lock()
        done.acquire()
        box: list[asyncio.Task[T] | BaseException] = []

        def finished(task: asyncio.Task[T] | BaseException) -> None:
            box.append(task)
            done.release()

        def start() -> None:
            try:
                task = loop.create_task(coro)
            except BaseException as e:  # the loop is closing: the caller hears it
                coro.close()
                finished(e)
                return
            task.add_done_callback(finished)

        try:
            loop.call_soon_threadsafe(start)
        except BaseException:  # the loop closed meanwhile
            coro.close()
            raise
        done.acquire()
        got = box[0]
        if isinstance(got, BaseException):
            raise got
        return got.result()

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
        fqrn, rest = _split(url_path)
        d, whole = self._downloader_for(fqrn)
        return await d.get(
            url_path if whole else rest,
            expected=expected,
            kind=kind,
            size=size,
            check=check,
            what=what or url_path,
        )

    # ------------------------------------------------------------------ --check support

    def probe(self, url_path: str) -> list[tuple[str, bool, str]]:
        """Ask every route of ``url_path``'s repository for it once:
        (server [via proxy], ok, 'HTTP 200 in 3 ms' or error)."""
        import asyncio

        from cvmfs_download.core import Route
        from cvmfs_download.wire import probe

        async def all_of() -> list[tuple[str, bool, str]]:
            if url_path.startswith("/cvmfs/info/"):  # no repository named: anybody there?
                bases = routes_of(self.servers, self.proxies, "@fqrn@")
                path = url_path if bases.whole_path else "/"
                servers = [u for g in bases.servers for u in g]
                proxies = [p for g in (bases.proxies or ProxyGroups(((None,),))).groups for p in g]
            else:
                fqrn, rest = _split(url_path)
                d, whole = self._downloader_for(fqrn)
                path = url_path if whole else rest
                servers, proxies = d.failover.server_urls, d.failover.proxy_urls
            routes = [Route(s, p) for s in servers for p in proxies]
            got = await asyncio.gather(*(probe(self._transport, r, path) for r in routes))
            return [
                (r.server if r.proxy is None else f"{r.server} via {r.proxy}", ok, detail)
                for r, (ok, detail) in zip(routes, got, strict=True)
            ]

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
