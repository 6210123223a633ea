"""Upstream fill: fetch a missing object from the Stratum-1, verify its hash, store it atomically.

Downloads go through the one CernVM-FS download client (cvmfs_download): the repository's
upstream servers in fail-over order, every answer bounded (its size by what it is, an overall
deadline besides the idle timeout) and verified before it gets its name; no extra rounds (the
client waiting on this answer has its own retries).

Concurrent misses for one object make one upstream request: within a worker through a shared
task, across worker processes through a lock on one byte of ``data/.fill.lock`` (a byte per
object, by a hash of its name; whoever gets it second finds the object already stored).  The
lock only saves a second download: what is stored is verified and renamed into place either
way.  (It was a lock file made and removed per object: two more inodes each, which on an ext4
without a journal, shortly after deletions, cost more than the fill itself.)  The manifest is
refreshed only after the root catalog, certificate and whitelist it needs are in the store,
so the store always backs the ``.cvmfspublished`` it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from cvmfs_download.client import Downloader
from cvmfs_download.core import Settings
from cvmfs_download.errors import DownloadError, NotFound
from cvmfs_download.h1 import make_transport
from cvmfs_download.wire import Transport
from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import ContentHash
from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import Suffix
from cvmfs_format.proxies import ProxyGroups
from cvmfs_format.store import MANIFEST, WHITELIST, atomic_write, unmark_replica
from proxy.metrics import Metrics
from proxy.stores import RepoDir

LOCK_FILE = ".fill.lock"  # in data/: never served (not an object's name), never removed


class UpstreamError(Exception):
    """A fill that failed; ``status`` is what the client gets (404 or 502)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class Filler:
    """Upstream fill for one worker process."""

    def __init__(
        self,
        metrics: Metrics,
        timeout: float,
        user_agent: str = "hep-proxy",
        proxies: ProxyGroups | None = None,
    ) -> None:
        self.metrics = metrics
        self.proxies = proxies  # forward proxies (CVMFS_HTTP_PROXY syntax); None: DIRECT
        self.timeout = timeout
        self.settings = Settings(
            timeout=timeout,
            connect_timeout=min(10.0, timeout),
            max_time=timeout,  # upstream_timeout: a client is waiting for this answer
            retries=0,
            max_connections=64,
            user_agent=user_agent,
        )
        self._transport: Transport | None = None
        self._clients: dict[tuple[str, tuple[str, ...]], Downloader] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._manifest_checked: dict[str, float] = {}
        self._lock_fds: dict[str, int] = {}  # by repository: the lock file, for its fills

    def client(self, repo: RepoDir) -> Downloader:
        """The download client of one repository's upstream servers (one pool for all)."""
        key = (repo.fqrn, tuple(repo.upstream))
        d = self._clients.get(key)
        if d is None:
            if self._transport is None:
                self._transport = make_transport(self.settings)
            d = Downloader(
                [[b] for b in repo.upstream],
                self.proxies,
                self.settings,
                transport=self._transport,
            )
            self._clients[key] = d
        return d

    async def close(self) -> None:
        for fd in self._lock_fds.values():
            os.close(fd)
        self._lock_fds.clear()
        if self._transport is not None:
            await self._transport.close()

    async def _single_flight(
        self, key: tuple[str, str], make: Callable[[], Awaitable[None]]
    ) -> None:
        task = self._inflight.get(key)
        if task is None:

            async def run() -> None:
                try:
                    await make()
                finally:
                    self._inflight.pop(key, None)

            task = asyncio.ensure_future(run())
            task.add_done_callback(_consume)
            self._inflight[key] = task
        await asyncio.shield(task)

    async def fetch_object(self, repo: RepoDir, relpath: str, expected: ContentHash) -> None:
        """Make sure ``relpath`` is in the store (verified), fetching it once if needed."""
        await self._single_flight((repo.fqrn, relpath), lambda: self._fill(repo, relpath, expected))

    def _lock_fd(self, repo: RepoDir) -> int:
        """This worker's fd of the repository's lock file, open until close(): a process's
        POSIX locks on a file all go when it closes any fd of it."""
        fd = self._lock_fds.get(repo.fqrn)
        if fd is None:
            path = repo.dir / "data" / LOCK_FILE
            try:
                fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
            except OSError as e:  # the store's own trouble (read-only, not ours)
                self.metrics.upstream.labels("error").inc()
                raise UpstreamError(502, f"{path}: cannot lock for a fill ({e.strerror})") from None
            self._lock_fds[repo.fqrn] = fd
        return fd

    @contextlib.asynccontextmanager
    async def _object_lock(self, repo: RepoDir, relpath: str) -> AsyncIterator[None]:
        """Across worker processes: one fill of ``relpath`` at a time (a byte of the lock file,
        at a hash of the name; in this process the shared task already sees to it)."""
        fd = self._lock_fd(repo)
        at = int.from_bytes(hashlib.blake2b(relpath.encode(), digest_size=7).digest(), "big")
        deadline = time.monotonic() + self.timeout * 2
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, at)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise UpstreamError(
                        502, f"{repo.fqrn}/{relpath}: timed out waiting for another worker's fill"
                    ) from None
                await asyncio.sleep(0.01)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, at)

    async def _fill(self, repo: RepoDir, relpath: str, expected: ContentHash) -> None:
        final = repo.dir / relpath
        async with self._object_lock(repo, relpath):
            if final.exists():
                return
            if not repo.upstream:
                raise UpstreamError(404, f"{repo.fqrn}/{relpath}: no upstream")
            final.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=repo.dir / "data" / "txn", prefix=".fill-")
            os.close(fd)
            try:
                size = await self.client(repo).get_file(
                    relpath, Path(tmp), expected=expected, what=f"{repo.fqrn}/{relpath}"
                )
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
            except NotFound as e:
                self.metrics.upstream.labels("missing").inc()
                raise UpstreamError(404, str(e)) from None
            except DownloadError as e:
                self.metrics.upstream.labels("corrupt" if e.bad_data else "error").inc()
                raise UpstreamError(502, str(e)) from None
            except OSError as e:  # the store's own trouble (full, too large)
                self.metrics.upstream.labels("error").inc()
                raise UpstreamError(502, f"{final}: cannot store ({e.strerror})") from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self.metrics.upstream.labels("ok").inc()
        self.metrics.upstream_bytes.inc(size)

    async def _get_root_file(self, repo: RepoDir, name: str) -> bytes:
        if not repo.upstream:
            raise UpstreamError(502, f"{repo.fqrn}: no upstream")
        try:
            data = await self.client(repo).get(name, what=f"{repo.fqrn}/{name}", revalidate=True)
        except DownloadError as e:
            self.metrics.upstream.labels("error").inc()
            raise UpstreamError(502, str(e)) from None
        self.metrics.upstream.labels("ok").inc()
        self.metrics.upstream_bytes.inc(len(data))
        return data

    async def refresh_manifest(self, repo: RepoDir, max_age: float) -> None:
        """At most every ``max_age`` s: adopt a newer upstream manifest once the store backs it.

        Raises UpstreamError only when the store has no manifest at all to fall back on.
        """
        have = (repo.dir / MANIFEST).is_file()
        now = time.monotonic()
        if have and now - self._manifest_checked.get(repo.fqrn, -1e18) < max_age:
            return
        try:
            await self._single_flight((repo.fqrn, MANIFEST), lambda: self._refresh(repo))
        except UpstreamError:
            if not have:
                raise
        finally:
            self._manifest_checked[repo.fqrn] = time.monotonic()

    async def _refresh(self, repo: RepoDir) -> None:
        raw = await self._get_root_file(repo, MANIFEST)
        try:
            new = parse_manifest(raw).manifest
        except FormatError as e:
            raise UpstreamError(502, f"{repo.fqrn}: upstream {e}") from None
        if new.name and new.name != repo.fqrn:
            raise UpstreamError(502, f"{repo.fqrn}: upstream manifest names {new.name!r}")
        current_path = repo.dir / MANIFEST
        with contextlib.suppress(FileNotFoundError):
            current_raw = current_path.read_bytes()
            if current_raw == raw:
                return
            with contextlib.suppress(FormatError):
                if parse_manifest(current_raw).manifest.revision > new.revision:
                    return
        await self.fetch_object(
            repo, new.root_catalog.object_path(Suffix.CATALOG), new.root_catalog
        )
        if new.certificate is not None:
            await self.fetch_object(
                repo, new.certificate.object_path(Suffix.CERTIFICATE), new.certificate
            )
        whitelist = await self._get_root_file(repo, WHITELIST)
        tmp_dir = repo.dir / "data" / "txn"
        # the store holds only what was asked for of the new revision: no longer a replica
        unmark_replica(repo.dir)
        atomic_write(repo.dir / WHITELIST, whitelist, tmp_dir)
        atomic_write(current_path, raw, tmp_dir)
