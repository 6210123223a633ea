"""A repository's own files (manifest, whitelist, certificate, catalogs), for the jobs of a node.

The node's cache service fetches them for each job that mounts a repository: its HTTP client
is warm, so a job needs no network library of its own (importing one costs ~0.15 s, more than
the mount). The manifest and whitelist are fetched each time: they say what the current
revision is, and the job verifies their signatures itself, with its own keys. A certificate is
kept as stored; a catalog is verified against its name and inflated once, into a sealed memfd
every job maps (inflating a 1 MB catalog takes a job ~5 ms; the service's copy is trusted as
its objects are: it is the user's own). Both are named by their content hash, so a kept one
can never be stale.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from cvmfs_format.catalog import inflate_catalog
from cvmfs_format.errors import FormatError
from cvmfs_format.objects import Suffix, parse_object_path
from worker.ram.ramfiles import fill_sealed_memfd
from worker.repo.fetcher import FetchError, NotFound, object_url
from worker.repo.repository import REPOSITORY_NAME, RepositoryError, manifest_check

if TYPE_CHECKING:
    from worker.repo.repository import ObjectSource

UNHASHED = (".cvmfspublished", ".cvmfswhitelist")
KEPT_BYTES = 256 << 20  # certificates (as stored) and catalogs (inflated) kept


def is_repository_file(fqrn: str, path: str) -> bool:
    """Only these may be asked for: a job cannot make the service fetch arbitrary URLs."""
    if not REPOSITORY_NAME.fullmatch(fqrn):
        return False
    if path in UNHASHED:
        return True
    try:
        return parse_object_path(path).suffix in (Suffix.CATALOG, Suffix.CERTIFICATE)
    except FormatError:
        return False


class RepositoryFiles:
    """Repository files through one fetcher: certificates kept as stored, catalogs kept
    inflated in sealed memfds, up to a budget of bytes together."""

    def __init__(self, fetcher: ObjectSource, kept_bytes: int = KEPT_BYTES) -> None:
        self.fetcher = fetcher
        self.kept_bytes = kept_bytes
        self._kept: OrderedDict[tuple[str, str], bytes | tuple[int, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, fqrn: str, path: str) -> bytes:
        """The stored (verified, for hashed files) bytes; RepositoryError (errno, one line)
        otherwise."""
        if not is_repository_file(fqrn, path):
            raise RepositoryError(errno.EINVAL, f"{fqrn}/{path}: not a repository file")
        key = (fqrn, path)
        with self._lock:
            kept = self._kept.get(key)
            if isinstance(kept, bytes):
                self._kept.move_to_end(key)
                self.hits += 1
                return kept
        data = self._fetch(fqrn, path)
        if path.endswith("X"):  # a certificate: catalogs are kept inflated (catalog())
            self._keep(key, data, len(data))
        return data

    def catalog(self, fqrn: str, path: str) -> tuple[int, int]:
        """A catalog, verified and inflated once for the node's jobs: a new fd of its sealed
        memfd (the caller closes it) and its size; RepositoryError (errno, one line)."""
        if not path.endswith("C") or not is_repository_file(fqrn, path):
            raise RepositoryError(errno.EINVAL, f"{fqrn}/{path}: not a catalog")
        key = (fqrn, path)
        with self._lock:
            kept = self._kept.get(key)
            if isinstance(kept, tuple):
                self._kept.move_to_end(key)
                self.hits += 1
                return os.dup(kept[0]), kept[1]
        what = f"{fqrn}/{path}"
        try:
            data = inflate_catalog(self._fetch(fqrn, path), what)
        except FormatError as e:
            raise RepositoryError(errno.EIO, str(e)) from None
        fd = fill_sealed_memfd(what, len(data), lambda out: out.write_at(0, data))
        try:
            return os.dup(fd), len(data)
        finally:
            self._keep(key, (fd, len(data)), len(data))

    def close(self) -> None:
        """Close the kept memfds (jobs keep their own fds of them)."""
        with self._lock:
            for kept in self._kept.values():
                if isinstance(kept, tuple):
                    os.close(kept[0])
            self._kept.clear()
            self._used = 0

    def _fetch(self, fqrn: str, path: str) -> bytes:
        what = f"{fqrn}/{path}"
        try:
            if path in UNHASHED:
                check = manifest_check if path == ".cvmfspublished" else None
                return self.fetcher.get(object_url(fqrn, path), None, what, check)
            return self.fetcher.get(object_url(fqrn, path), parse_object_path(path).hash, what)
        except NotFound as e:
            raise RepositoryError(errno.ENOENT, str(e)) from None
        except FetchError as e:
            raise RepositoryError(errno.EIO, str(e)) from None

    def _keep(self, key: tuple[str, str], value: bytes | tuple[int, int], size: int) -> None:
        """Keep ``value`` (a memfd is ours from now on: closed when it goes), within budget."""
        with self._lock:
            if key in self._kept or size > self.kept_bytes:
                _close(value)  # a racing fetch kept its copy first, or too big to keep
                return
            self._kept[key] = value
            self._used += size
            while self._used > self.kept_bytes:
                _, old = self._kept.popitem(last=False)
                self._used -= len(old) if isinstance(old, bytes) else old[1]
                _close(old)


def _close(value: bytes | tuple[int, int]) -> None:
    if isinstance(value, tuple):
        os.close(value[0])
