"""HTTP fetcher: aiohttp on its own event-loop thread, a blocking thread-safe API on top.

Each proxy URL is a base URL serving ``/cvmfs/<fqrn>/…`` (hep-proxy, or any static server of
a store). Proxies come in CVMFS_HTTP_PROXY groups: load-balanced inside a group, fail-over
across groups; a proxy that fails (connection, timeout, 5xx) is avoided for
``proxy_reset_after`` seconds, so a dead proxy costs one timeout, not one per request.
Objects are verified against their content hash before anyone sees them: a corrupt answer is
retried on the next proxy (with no-cache headers), and wrong bytes are never returned.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import ContentHash
from cvmfs_format.objects import verify_stored
from cvmfs_format.proxies import ProxyGroups

if TYPE_CHECKING:
    import asyncio

    import aiohttp

    from worker.config import ExecConfig

log = logging.getLogger("hep_exec.fetcher")
T = TypeVar("T")
USER_AGENT = "hep-exec/0.1 (cvmfs-compatible)"
Check = Callable[[bytes], None]


class FetchError(Exception):
    """Every proxy failed for a URL; the message names the URL and each proxy's failure."""


class NotFound(FetchError):
    """Every proxy that answered said 404 (the object or repository does not exist there)."""


@dataclass
class ProxyState:
    url: str
    group: int
    dead_until: float = 0.0
    requests: int = 0
    failures: int = 0
    corrupt: int = 0


@dataclass
class FetchStats:
    requests: int = 0
    bytes_fetched: int = 0
    failures: int = 0
    corrupt: int = 0
    not_found: int = 0
    retries: int = 0
    collapsed: int = 0
    by_proxy: dict[str, ProxyState] = field(default_factory=dict)


class _Attempt(Exception):
    """One proxy's failure for one request: why, and whether the proxy itself is to blame."""

    def __init__(
        self, reason: str, proxy_fault: bool, not_found: bool = False, corrupt: bool = False
    ) -> None:
        super().__init__(reason)
        self.proxy_fault = proxy_fault
        self.not_found = not_found
        self.corrupt = corrupt


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
        members = [(p, i) for i, g in enumerate(proxies.groups) for p in g]
        if not members or any(p is None for p, _ in members):
            raise ValueError("fetcher needs http:// proxies (DIRECT is not supported)")
        self.proxies = proxies
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff_init = backoff_init
        self.backoff_max = backoff_max
        self.proxy_reset_after = proxy_reset_after
        self.max_connections = max_connections
        self.stats = FetchStats()
        self._states = [ProxyState(str(p), g) for p, g in members]
        self.stats.by_proxy = {s.url: s for s in self._states}
        self._rng = rng or random.Random()
        self._inflight: dict[tuple[str, ContentHash | None], asyncio.Future[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
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
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self.max_connections, keepalive_timeout=60, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT, "Connection": "Keep-Alive", "Pragma": ""},
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )

    def close(self) -> None:
        with self._start_lock:
            loop, self._loop, self._wanted = self._loop, None, False
        if loop is None:
            return
        import asyncio

        async def shutdown() -> None:
            if self._session is not None:
                await self._session.close()

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
    ) -> bytes:
        """Stored bytes of ``url_path`` (``/cvmfs/<fqrn>/…``), verified against ``expected``.

        ``check`` (for unhashed files such as the manifest) raises FormatError on bytes that
        must be fetched from another proxy instead. Raises FetchError/NotFound (one line).
        """
        return self._call(self.fetch(url_path, expected, what, check))

    def get_many(
        self, items: Iterable[tuple[str, ContentHash | None, str]]
    ) -> list[bytes | BaseException]:
        """Fetch concurrently; results (or the exception per item) in input order."""
        import asyncio

        async def all_of() -> list[bytes | BaseException]:
            return await asyncio.gather(
                *(self.fetch(u, h, w) for u, h, w in items), return_exceptions=True
            )

        return self._call(all_of())

    def submit(
        self, url_path: str, expected: ContentHash | None = None, what: str = ""
    ) -> Future[bytes]:
        """Start one fetch (single-flight, verified, with fail-over) and return at once:
        callers stream big files by keeping a few of these in flight."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(
            self.fetch(url_path, expected, what), self._require_loop()
        )

    def prefetch(self, items: Iterable[tuple[str, ContentHash | None, str]]) -> Future[Any]:
        """Start fetching in the background; the returned future resolves to get_many's list."""
        import asyncio

        loop = self._require_loop()
        wanted = list(items)

        async def all_of() -> list[bytes | BaseException]:
            return await asyncio.gather(
                *(self.fetch(u, h, w) for u, h, w in wanted), return_exceptions=True
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
    ) -> bytes:
        """Single-flight: concurrent fetches of one (path, hash) share one request."""
        import asyncio

        key = (url_path, expected)
        fut = self._inflight.get(key)
        if fut is not None:
            self.stats.collapsed += 1
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            data = await self._fetch_with_failover(url_path, expected, what or url_path, check)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]
        fut.set_result(data)
        return data

    def _order(self) -> list[ProxyState]:
        """Live proxies group by group (members shuffled), then avoided ones as a last resort."""
        now = time.monotonic()
        live: list[ProxyState] = []
        dead: list[ProxyState] = []
        by_group: dict[int, list[ProxyState]] = {}
        for s in self._states:
            by_group.setdefault(s.group, []).append(s)
        for g in sorted(by_group):
            members = by_group[g][:]
            self._rng.shuffle(members)
            for s in members:
                (live if s.dead_until <= now else dead).append(s)
        dead.sort(key=lambda s: s.dead_until)
        return live + dead

    async def _fetch_with_failover(
        self, url_path: str, expected: ContentHash | None, what: str, check: Check | None
    ) -> bytes:
        import asyncio

        if not url_path.startswith("/"):
            url_path = "/" + url_path
        errors: list[str] = []
        no_cache = False
        all_not_found = True
        for round_ in range(self.retries + 1):
            if round_:
                self.stats.retries += 1
                delay = min(self.backoff_max, self.backoff_init * 2 ** (round_ - 1))
                await asyncio.sleep(self._rng.uniform(0, delay))
            for state in self._order():
                try:
                    return await self._attempt(state, url_path, expected, what, check, no_cache)
                except _Attempt as e:
                    errors.append(f"{state.url}: {e}")
                    all_not_found = all_not_found and e.not_found
                    if e.proxy_fault:
                        state.failures += 1
                        self.stats.failures += 1
                        if state.dead_until <= time.monotonic():
                            log.warning(
                                "proxy %s failed (%s); avoiding it for %.0f s",
                                state.url,
                                e,
                                self.proxy_reset_after,
                            )
                        state.dead_until = time.monotonic() + self.proxy_reset_after
                    if e.corrupt:
                        no_cache = True  # ask the next one to bypass its caches
            if all_not_found:
                break  # 404 everywhere: retrying will not make it appear
        summary = "; ".join(dict.fromkeys(errors))
        if all_not_found:
            self.stats.not_found += 1
            raise NotFound(f"{what}: not found on any proxy ({summary})")
        raise FetchError(f"{what}: failed on every proxy ({summary})")

    async def _attempt(
        self,
        state: ProxyState,
        url_path: str,
        expected: ContentHash | None,
        what: str,
        check: Check | None,
        no_cache: bool,
    ) -> bytes:
        import aiohttp

        assert self._session is not None
        state.requests += 1
        self.stats.requests += 1
        headers = {"Pragma": "no-cache", "Cache-Control": "no-cache"} if no_cache else None
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=self.connect_timeout)
        try:
            async with self._session.get(
                state.url + url_path, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                if resp.status == 404:
                    raise _Attempt("HTTP 404", proxy_fault=False, not_found=True)
                if resp.status != 200:
                    raise _Attempt(f"HTTP {resp.status}", proxy_fault=resp.status >= 500)
                data = await resp.read()
        except TimeoutError:
            raise _Attempt(f"timeout after {self.timeout:g} s", proxy_fault=True) from None
        except aiohttp.ClientError as e:
            raise _Attempt(f"{type(e).__name__}: {e}"[:200], proxy_fault=True) from None
        self.stats.bytes_fetched += len(data)
        try:
            check_stored(data, expected, what, check)
        except FormatError as e:
            state.corrupt += 1
            self.stats.corrupt += 1
            log.warning("%s from %s: %s; trying another proxy", what, state.url, e)
            raise _Attempt(f"bad data ({e})", proxy_fault=False, corrupt=True) from None
        return data

    # ------------------------------------------------------------------ --check support

    def probe(self, url_path: str) -> list[tuple[str, bool, str]]:
        """Ask every proxy for ``url_path`` once: (proxy, ok, 'HTTP 200 in 3 ms' or error)."""
        import asyncio

        import aiohttp

        async def one(state: ProxyState) -> tuple[str, bool, str]:
            assert self._session is not None
            t0 = time.perf_counter()
            try:
                timeout = aiohttp.ClientTimeout(
                    total=self.timeout, sock_connect=self.connect_timeout
                )
                async with self._session.get(state.url + url_path, timeout=timeout) as resp:
                    await resp.read()
                    ms = (time.perf_counter() - t0) * 1000
                    return state.url, resp.status == 200, f"HTTP {resp.status} in {ms:.0f} ms"
            except TimeoutError:
                return state.url, False, f"timeout after {self.timeout:g} s"
            except aiohttp.ClientError as e:
                return state.url, False, f"{type(e).__name__}: {e}"[:200]

        async def all_of() -> list[tuple[str, bool, str]]:
            return list(await asyncio.gather(*(one(s) for s in self._states)))

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
