"""The transport: one aiohttp session, and one bounded GET.

Bounded three ways: the body may not exceed ``limit`` bytes (announced or sent), no byte for
``settings.timeout`` seconds is a failure, and the whole attempt has a ``deadline``.  Failures
come out as :class:`Failed` (whom to blame, and why in a site admin's words).
"""

from __future__ import annotations

import asyncio

import aiohttp

from cvmfs_download.core import Blame, Route, Settings, classify_status
from cvmfs_download.errors import network_reason
from cvmfs_download.wire import (
    CHUNK,
    Failed,
    Sink,
    SinkFailed,
    into,
    probe,
    read_file,
    secs,
    too_big,
)

__all__ = ["CHUNK", "Failed", "HttpTransport", "Sink", "probe"]


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
            return await asyncio.to_thread(read_file, url, sink, limit)
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
                            raise Failed(Blame.DATA, too_big(announced, limit))
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            got += len(chunk)
                            if got > limit:
                                raise Failed(Blame.DATA, too_big(got, limit, "sent"))
                            into(sink, chunk)
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
        except SinkFailed as e:
            raise e.error from None
        except TimeoutError:
            if not got:  # nothing at all: a stall, whichever clock saw it first
                raise Failed(broken, f"no data for {secs(deadline)} s") from None
            raise Failed(broken, f"took longer than {secs(deadline)} s ({got} bytes)") from None
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
