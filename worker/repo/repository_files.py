"""A repository's own files (manifest, whitelist, certificate, catalogs), for the jobs of a node.

The node's cache service fetches them for each job that mounts a repository: its HTTP client
is warm, so a job needs no network library of its own (importing one costs ~0.15 s, more than
the mount), and a catalog or certificate fetched once is kept for the next job (they are
named by their content hash, so a kept one can never be stale). The manifest and whitelist
are fetched each time: they say what the current revision is. The job still verifies all of
it (signature, hashes) itself, with its own keys.
"""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from cvmfs_format.errors import FormatError
from cvmfs_format.objects import Suffix, parse_object_path
from worker.repo.fetcher import FetchError, NotFound, object_url
from worker.repo.repository import REPOSITORY_NAME, RepositoryError, manifest_check

if TYPE_CHECKING:
    from worker.repo.repository import ObjectSource

UNHASHED = (".cvmfspublished", ".cvmfswhitelist")
KEPT_BYTES = 256 << 20  # catalogs and certificates kept (compressed, as stored)


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
    """Stored bytes of repository files through one fetcher, catalogs kept up to a budget."""

    def __init__(self, fetcher: ObjectSource, kept_bytes: int = KEPT_BYTES) -> None:
        self.fetcher = fetcher
        self.kept_bytes = kept_bytes
        self._kept: OrderedDict[tuple[str, str], bytes] = OrderedDict()
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
            data = self._kept.get(key)
            if data is not None:
                self._kept.move_to_end(key)
                self.hits += 1
                return data
        what = f"{fqrn}/{path}"
        try:
            if path in UNHASHED:
                check = manifest_check if path == ".cvmfspublished" else None
                return self.fetcher.get(object_url(fqrn, path), None, what, check)
            data = self.fetcher.get(object_url(fqrn, path), parse_object_path(path).hash, what)
        except NotFound as e:
            raise RepositoryError(errno.ENOENT, str(e)) from None
        except FetchError as e:
            raise RepositoryError(errno.EIO, str(e)) from None
        if len(data) <= self.kept_bytes:
            with self._lock:
                if key not in self._kept:
                    self._kept[key] = data
                    self._used += len(data)
                while self._used > self.kept_bytes:
                    _, old = self._kept.popitem(last=False)
                    self._used -= len(old)
        return data
