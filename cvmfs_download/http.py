"""The transport: one aiohttp session, and one bounded GET.

Bounded three ways: the body may not exceed ``limit`` bytes (announced or sent), no byte for
``settings.timeout`` seconds is a failure, and the whole attempt has a ``deadline``.  Failures
come out as :class:`Failed` (whom to blame, and why in a site admin's words).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import aiohttp

from cvmfs_download.core import Blame, Route, Settings, classify_status
from cvmfs_download.errors import human_size, network_reason

Sink = Callable[[bytes], None]
CHUNK = 256 * 1024


class Failed(Exception):
    """One attempt failed: ``blame`` says whom it is held against."""

    def __init__(self, blame: Blame, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.blame = blame
        self.reason = reason
        self.status = status  # the HTTP status that failed it, if one did


class _SinkFailed(Exception):
    """Where the bytes go failed (a full disk): the caller's trouble, not the server's."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _into(sink: Sink, chunk: bytes) -> None:
    try:
        sink(chunk)
    except OSError as e:
        raise _SinkFailed(e) from None


class HttpTransport:
    """GETs with keep-alive connections (made on first use, in the running event loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            s = self.settings
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=s.max_connections, keepalive_timeout=60, enable_cleanup_closed=True
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=s.connect_timeout, sock_read=s.timeout
                ),
                headers={"User-Agent": s.user_agent, "Pragma": ""},
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding",),
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
    ) -> int:
        """Stream one answer into ``sink``; its size.  Raises Failed.  ``no_cache``: caches
        must not answer (after wrong bytes); ``revalidate``: they must check first."""
        url = route.url(path)
        if url.startswith("file://"):
            return await asyncio.to_thread(_read_file, url, sink, limit)
        via_proxy = route.proxy is not None
        broken = Blame.PROXY if via_proxy else Blame.HOST
        headers = (
            {"Pragma": "no-cache", "Cache-Control": "no-cache"}
            if no_cache
            else {"Cache-Control": "max-age=0"}
            if revalidate
            else None
        )
        got = 0
        try:
            async with asyncio.timeout(deadline) as clock:
                try:
                    async with self._client().get(
                        url, proxy=route.proxy, headers=headers, allow_redirects=False
                    ) as resp:
                        blame = classify_status(
                            resp.status,
                            {k.lower(): v for k, v in resp.headers.items()},
                            via_proxy,
                        )
                        if blame is not None:
                            what = "not found" if resp.status == 404 else "answered"
                            raise Failed(blame, f"{what} (HTTP {resp.status})", resp.status)
                        announced = resp.content_length
                        if announced is not None and announced > limit:
                            raise Failed(Blame.DATA, _too_big(announced, limit))
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            got += len(chunk)
                            if got > limit:
                                raise Failed(Blame.DATA, _too_big(got, limit, "sent"))
                            _into(sink, chunk)
                        if announced is not None and got != announced:
                            raise Failed(broken, "the response body was cut short")
                except TimeoutError as e:
                    if clock.expired():
                        raise
                    if isinstance(e, aiohttp.ConnectionTimeoutError):
                        reason = (
                            f"cannot connect (no answer in {self.settings.connect_timeout:g} s)"
                        )
                    else:
                        reason = f"no data for {self.settings.timeout:g} s"
                    raise Failed(broken, reason) from None
        except _SinkFailed as e:
            raise e.error from None
        except TimeoutError:
            if not got:  # nothing at all: a stall, whichever clock saw it first
                raise Failed(broken, f"no data for {_secs(deadline)} s") from None
            raise Failed(broken, f"took longer than {_secs(deadline)} s ({got} bytes)") from None
        except aiohttp.ClientConnectorError as e:
            where = "cannot connect to the proxy" if via_proxy else "cannot connect"
            raise Failed(broken, f"{where} ({network_reason(e.os_error)})") from None
        except aiohttp.ServerDisconnectedError:
            raise Failed(broken, "the server closed the connection") from None
        except aiohttp.ClientPayloadError:
            raise Failed(broken, "the response body was cut short") from None
        except aiohttp.ClientResponseError as e:
            raise Failed(broken, f"bad HTTP response ({e.message})") from None
        except aiohttp.InvalidURL:
            raise Failed(Blame.HOST, "not a valid URL") from None
        except (aiohttp.ClientError, OSError) as e:
            raise Failed(broken, network_reason(e)) from None
        return got


async def probe(transport: HttpTransport, route: Route, path: str) -> tuple[bool, str]:
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


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _too_big(n: int, limit: int, how: str = "announced") -> str:
    return f"{human_size(n)} {how}, more than the {human_size(limit)} it may have"


def _read_file(url: str, sink: Sink, limit: int) -> int:
    """A server given as file://: a local store (read in chunks, never past the limit)."""
    path = unquote(urlsplit(url).path)
    got = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                got += len(chunk)
                if got > limit:
                    raise Failed(Blame.DATA, _too_big(got, limit, "in the file"))
                _into(sink, chunk)
    except _SinkFailed as e:
        raise e.error from None
    except FileNotFoundError:
        raise Failed(Blame.NOBODY, "not found") from None
    except OSError as e:
        raise Failed(Blame.HOST, network_reason(e)) from None
    return got
