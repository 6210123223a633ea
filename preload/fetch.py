"""preload's downloads: the one CernVM-FS download client (cvmfs_download) for one
repository's servers and forward proxies.

Fail-over, proxy groups, back-off, bounds and verification are the client's; what is left here
is preload's view of it: its settings from the spec, which server answered the manifest, and
turning a server away whose signed files do not verify.  Every object is hash-verified while
it streams into a temporary file; nothing unverified reaches its final name.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cvmfs_download.client import Downloader
from cvmfs_download.core import Blame, Kind, Route, Settings
from cvmfs_download.errors import DownloadError as FetchError
from cvmfs_download.h1 import make_transport as _make
from cvmfs_download.wire import Transport
from cvmfs_format.hashes import ContentHash
from cvmfs_format.objects import Suffix
from cvmfs_format.proxies import ProxyGroups

__all__ = ["FetchConfig", "FetchError", "Fetcher", "make_transport", "unique_tmp"]

USER_AGENT = "cvmfs preload (hep-cvmfs-hpc)"
_KINDS = {Suffix.CATALOG: Kind.CATALOG, Suffix.CERTIFICATE: Kind.CERTIFICATE}


@dataclass(frozen=True)
class FetchConfig:
    concurrency: int = 16
    timeout: float = 10.0
    connect_timeout: float = 5.0
    retries: int = 2
    backoff_init: float = 0.5
    backoff_max: float = 2.0

    def settings(self) -> Settings:
        return Settings(
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            retries=self.retries,
            backoff_init=self.backoff_init,
            backoff_max=self.backoff_max,
            max_connections=self.concurrency,
            user_agent=USER_AGENT,
        )


def make_transport(config: FetchConfig) -> Transport:
    """One keep-alive pool for a run (every repository's downloads share it)."""
    return _make(config.settings())


class Fetcher:
    """One repository's downloads."""

    def __init__(
        self,
        servers: tuple[str, ...],
        proxies: ProxyGroups,
        config: FetchConfig,
        transport: Transport,
        note: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.servers = servers
        self.client = Downloader(
            [[s] for s in servers], proxies, config.settings(), transport=transport, note=note
        )

    @property
    def current_server(self) -> str:
        """The server the last answer came from (before any: the first one to try)."""
        if self.client.last_route is not None:
            return self.client.last_route.server
        return self.client.failover.routes(time.monotonic())[0].server

    def reject_server(self, server: str) -> None:
        """Its signed files did not verify: try the others first."""
        self.client.failover.blame(Route(server, None), Blame.HOST, time.monotonic())
        self.client.last_route = None

    async def fetch_bytes(
        self, relpath: str, expected: ContentHash | None = None, size: int | None = None
    ) -> bytes:
        """Whole body in memory (manifest, whitelist, catalogs, certificate); ``size``: the
        uncompressed size a catalog gives, which bounds it."""
        return await self.client.get(relpath, expected=expected, size=size)

    async def fetch_object(
        self, relpath: str, expected: ContentHash, size: int, suffix: Suffix
    ) -> bytes:
        """A verified object in memory (small ones: the writer thread stores them); ``size``
        the catalog's, which bounds it."""
        kind = _KINDS.get(suffix, Kind.OBJECT)
        return await self.client.get(relpath, expected=expected, kind=kind, size=size)

    async def fetch_to_file(
        self, relpath: str, expected: ContentHash, tmp: Path, size: int | None = None
    ) -> int:
        """Stream a verified object into ``tmp``; returns its stored size.  ``size``: the
        catalog's (uncompressed), which bounds the answer."""
        return await self.client.get_file(relpath, tmp, expected=expected, size=size)


def unique_tmp(tmp_dir: Path, name: str) -> Path:
    return tmp_dir / f"{os.getpid()}-{random.getrandbits(48):012x}-{name.replace('/', '_')}"
