"""HTTP(S)/file fetching with CVMFS-style fail-over across servers and proxies.

The decisions (what counts as a host or a proxy failure, which server/proxy comes next) live in
:class:`Failover`, a small sans-I/O state machine; :class:`Fetcher` is the aiohttp adapter.
Every object is hash-verified while it streams in; nothing unverified reaches its final name.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiofiles
import aiofiles.os
import aiohttp

from cvmfs_format.hashes import ContentHash
from cvmfs_format.proxies import ProxyGroups

SMALL = 1 << 20  # bodies up to this size are read whole, larger ones are streamed to disk
USER_AGENT = "cvmfs preload (hep-cvmfs-hpc)"


class FetchError(Exception):
    """Every server/proxy failed for one path; ``str()`` names the URLs tried."""


class Outcome(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # transient transfer error: same server/proxy again (with back-off)
    HOST = "host"  # next server
    PROXY = "proxy"  # next proxy, then next server


def classify_status(status: int, headers: dict[str, str], via_proxy: bool) -> Outcome:
    """Status classification of the cvmfs download manager (format doc §1.4)."""
    if 200 <= status < 300:
        return Outcome.OK
    proxy_said = "x-squid-error" in headers or "error=" in headers.get("proxy-status", "")
    if status in (400, 404, 429) or status >= 500:
        return Outcome.PROXY if (proxy_said and via_proxy) else Outcome.HOST
    return Outcome.PROXY if via_proxy else Outcome.HOST


class Attempt(Exception):
    """One failed attempt: outcome and a short reason for messages."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


@dataclass
class Failover:
    """Global server/proxy choice shared by all requests, switched on failure like cvmfs."""

    servers: tuple[str, ...]
    proxies: ProxyGroups
    rng: random.Random = field(default_factory=random.Random)
    server: int = 0
    proxy_order: list[str | None] = field(default_factory=list)
    proxy: int = 0

    def __post_init__(self) -> None:
        self.proxy_order = self.proxies.order(self.rng)

    def plan(self) -> list[tuple[int, int]]:
        """(server index, proxy index) pairs in the order one request tries them."""
        out = []
        ns, np_ = len(self.servers), len(self.proxy_order)
        for i in range(ns):
            s = (self.server + i) % ns
            for j in range(np_):
                out.append((s, (self.proxy + j) % np_))
        return out

    def succeeded(self, server: int, proxy: int) -> str | None:
        """Make the working pair current; returns a message if that is a switch."""
        msg = None
        if server != self.server:
            msg = f"switched to server {self.servers[server]}"
        elif proxy != self.proxy:
            msg = f"switched to proxy {self.proxy_order[proxy] or 'DIRECT'}"
        self.server, self.proxy = server, proxy
        return msg


@dataclass(frozen=True)
class FetchConfig:
    concurrency: int = 16
    timeout: float = 10.0
    connect_timeout: float = 5.0
    retries: int = 2
    backoff_init: float = 0.5
    backoff_max: float = 2.0


def backoff_delay(attempt: int, init: float, cap: float, rng: random.Random) -> float:
    """Jittered exponential back-off: uniform in [0, min(cap, init * 2**attempt)]."""
    return rng.uniform(0, min(cap, init * (2**attempt)))


class Fetcher:
    """One repository's downloads: a keep-alive pool bounded by ``concurrency``."""

    def __init__(
        self,
        servers: tuple[str, ...],
        proxies: ProxyGroups,
        config: FetchConfig,
        session: aiohttp.ClientSession,
        note: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.failover = Failover(servers, proxies)
        self.config = config
        self.session = session
        self.note = note
        self.rng = random.Random()
        self.failures: dict[str, int] = {}

    @staticmethod
    def make_session(config: FetchConfig) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=config.concurrency, limit_per_host=config.concurrency, keepalive_timeout=60
        )
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.timeout
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": USER_AGENT, "Pragma": ""},
            auto_decompress=False,
            trust_env=False,
        )

    async def fetch_bytes(self, relpath: str, expected: ContentHash | None = None) -> bytes:
        """Whole body in memory (manifest, whitelist, catalogs, certificate)."""
        result = await self._fetch(relpath, expected, None)
        assert isinstance(result, bytes)
        return result

    async def fetch_to_file(self, relpath: str, expected: ContentHash, tmp: Path) -> int:
        """Stream a verified object into ``tmp``; returns its stored size."""
        result = await self._fetch(relpath, expected, tmp)
        assert isinstance(result, int)
        return result

    async def _fetch(
        self, relpath: str, expected: ContentHash | None, tmp: Path | None
    ) -> bytes | int:
        tried: list[str] = []
        fo = self.failover
        plan = fo.plan()
        burned_servers: set[int] = set()
        for server, proxy_i in plan:
            if server in burned_servers:
                continue
            base = fo.servers[server]
            proxy = fo.proxy_order[proxy_i]
            url = f"{base}/{relpath}"
            try:
                result = await self._attempt_with_retries(url, proxy, expected, tmp)
            except Attempt as a:
                where = url if proxy is None else f"{url} via {proxy}"
                tried.append(f"{where} ({a.reason})")
                key = f"{base if a.outcome is Outcome.HOST else proxy}: {a.reason}"
                self.failures[key] = self.failures.get(key, 0) + 1
                if a.outcome is Outcome.HOST or proxy is None:
                    burned_servers.add(server)
                continue
            msg = fo.succeeded(server, proxy_i)
            if msg:
                self.note(f"{msg} after: {'; '.join(tried)}")
            return result
        raise FetchError(f"{relpath}: every source failed: {'; '.join(tried)}")

    async def _attempt_with_retries(
        self, url: str, proxy: str | None, expected: ContentHash | None, tmp: Path | None
    ) -> bytes | int:
        no_cache = False
        attempt = 0
        while True:
            try:
                return await self._attempt(url, proxy, expected, tmp, no_cache)
            except Attempt as a:
                if a.outcome is Outcome.RETRY and attempt < self.config.retries:
                    await asyncio.sleep(
                        backoff_delay(
                            attempt, self.config.backoff_init, self.config.backoff_max, self.rng
                        )
                    )
                    attempt += 1
                    continue
                if a.reason == "hash mismatch" and not no_cache:
                    no_cache = True  # once more, asking caches to revalidate
                    continue
                if a.outcome is Outcome.RETRY:
                    raise Attempt(Outcome.PROXY if proxy else Outcome.HOST, a.reason) from None
                raise

    async def _attempt(
        self,
        url: str,
        proxy: str | None,
        expected: ContentHash | None,
        tmp: Path | None,
        no_cache: bool,
    ) -> bytes | int:
        if url.startswith("file://"):
            return await self._attempt_file(url, expected, tmp)
        headers = {"Pragma": "no-cache", "Cache-Control": "no-cache"} if no_cache else None
        try:
            async with self.session.get(url, proxy=proxy, headers=headers) as resp:
                outcome = classify_status(
                    resp.status, {k.lower(): v for k, v in resp.headers.items()}, proxy is not None
                )
                if outcome is not Outcome.OK:
                    raise Attempt(outcome, f"HTTP {resp.status}")
                hasher = expected.algorithm.new() if expected else None
                length = resp.content_length
                if tmp is None or (length is not None and length <= SMALL):
                    body = await resp.read()
                    if length is not None and len(body) != length:
                        raise Attempt(Outcome.RETRY, "short transfer")
                    if hasher is not None:
                        hasher.update(body)
                        _check(hasher.digest(), expected)
                    if tmp is None:
                        return body
                    async with aiofiles.open(tmp, "wb") as f:
                        await f.write(body)
                    return len(body)
                size = 0
                try:
                    async with aiofiles.open(tmp, "wb") as f:
                        async for block in resp.content.iter_chunked(256 * 1024):
                            assert hasher is not None
                            hasher.update(block)
                            size += len(block)
                            await f.write(block)
                    if length is not None and size != length:
                        raise Attempt(Outcome.RETRY, "short transfer")
                    assert hasher is not None
                    _check(hasher.digest(), expected)
                except BaseException:
                    with contextlib.suppress(OSError):
                        await aiofiles.os.remove(tmp)
                    raise
                return size
        except (aiohttp.ClientConnectorError, aiohttp.ClientProxyConnectionError) as e:
            refused = isinstance(e, aiohttp.ClientConnectorError) and isinstance(
                e.os_error, ConnectionRefusedError
            )
            reason = "connection refused" if refused else "cannot connect"
            raise Attempt(Outcome.RETRY, reason) from None
        except TimeoutError:
            raise Attempt(Outcome.RETRY, "timeout") from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            raise Attempt(Outcome.RETRY, "transfer interrupted") from None
        except aiohttp.ClientError as e:
            raise Attempt(Outcome.RETRY, type(e).__name__) from None

    async def _attempt_file(
        self, url: str, expected: ContentHash | None, tmp: Path | None
    ) -> bytes | int:
        path = unquote(urlsplit(url).path)
        try:
            async with aiofiles.open(path, "rb") as f:
                body = await f.read()
        except FileNotFoundError:
            raise Attempt(Outcome.HOST, "not found") from None
        except OSError as e:
            raise Attempt(Outcome.HOST, e.strerror or "cannot read") from None
        if expected is not None:
            h = expected.algorithm.new()
            h.update(body)
            _check(h.digest(), expected)
        if tmp is None:
            return body
        async with aiofiles.open(tmp, "wb") as out:
            await out.write(body)
        return len(body)


def _check(digest: bytes, expected: ContentHash | None) -> None:
    if expected is not None and digest != expected.digest:
        raise Attempt(Outcome.HOST, "hash mismatch")


def unique_tmp(tmp_dir: Path, name: str) -> Path:
    return tmp_dir / f"{os.getpid()}-{random.getrandbits(48):012x}-{name.replace('/', '_')}"
