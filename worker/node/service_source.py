"""What a job's repositories get through the node's cache service (worker.node.cache_client):
their own files (manifest, whitelist, certificate, catalogs) and the objects of their files,
with the job's own fetcher for whatever the service cannot give."""

from __future__ import annotations

import errno
import logging
import mmap
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from cvmfs_format.catalog import DirEntry
from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import ContentHash
from worker.node.cache_client import CacheClient, SharedObject
from worker.node.cache_protocol import ObjectSpec
from worker.repo.fetcher import Fetcher, check_stored
from worker.repo.repository import MountedRepository, NotOnServers, RepositoryError
from worker.repo.repository_files import UNHASHED, is_repository_file

if TYPE_CHECKING:
    from concurrent.futures import Future

log = logging.getLogger("hep_exec.cache_client")


def object_spec(repo: MountedRepository, relpath: str) -> ObjectSpec | None:
    """How to load the file at ``relpath`` now; None for anything but a plain regular file."""
    entry = repo.lookup(relpath)
    if entry is None or not entry.is_regular or entry.is_external:
        return None
    chunks = tuple(repo.chunks(entry.path)) if entry.is_chunked else ()
    if not chunks and entry.hash is None:
        return None
    return ObjectSpec.of_entry(repo.fqrn, entry, chunks)


def open_shared(
    client: CacheClient, repo: MountedRepository, entry: DirEntry
) -> SharedObject | None:
    """The object from the service, or None: then the caller loads it privately.

    A service that cannot load an object (its proxies fail, say) is not the job's problem:
    the private path fetches it through the job's own proxies. Only ENOMEM is final.
    """
    spec = object_spec(repo, entry.path)
    if spec is None:
        return None
    try:
        return client.open(spec)
    except RepositoryError as e:
        if e.errno == errno.ENOMEM or isinstance(e, NotOnServers):
            raise
        log.warning("%s:%s: cache service: %s; fetching it here", repo.fqrn, entry.path, e)
        return None


class ServiceFirst:
    """The object source of a job's repositories with a node service: their own files
    (manifest, whitelist, certificate, catalogs) through the service, which keeps them for
    the node's next jobs; everything else, and anything the service cannot give, through
    the job's own fetcher (which then starts its HTTP client).  Stored bytes from the
    service are checked here as the fetcher would check them; a catalog comes inflated, and
    is trusted as the service's objects are (the service verified it against its name)."""

    def __init__(self, client: CacheClient, fetcher: Fetcher) -> None:
        self.client = client
        self.fetcher = fetcher
        self.from_service = 0

    def get(
        self,
        url_path: str,
        expected: ContentHash | None = None,
        what: str = "",
        check: Callable[[bytes], None] | None = None,
        *,
        size: int | None = None,
    ) -> bytes:
        fqrn, _, path = url_path.removeprefix("/cvmfs/").partition("/")
        if url_path.startswith("/cvmfs/") and is_repository_file(fqrn, path):
            data = self.client.meta(fqrn, path)
            if data is not None:
                try:
                    check_stored(data, expected, what, check)
                except FormatError as e:
                    log.warning("%s from the cache service: %s; fetching it here", what, e)
                else:
                    self.from_service += 1
                    return data
        return self.fetcher.get(url_path, expected, what, check, size=size)

    def ahead(self, url_path: str) -> None:
        """A repository file wanted soon: the service is asked now."""
        fqrn, _, path = url_path.removeprefix("/cvmfs/").partition("/")
        if not url_path.startswith("/cvmfs/") or not is_repository_file(fqrn, path):
            return
        if path in UNHASHED:
            self.client.meta_ahead(fqrn, path)
        elif path.endswith("C"):
            self.client.catalog_ahead(fqrn, path)

    def submit(
        self,
        url_path: str,
        expected: ContentHash | None = None,
        what: str = "",
        *,
        size: int | None = None,
    ) -> Future[bytes]:
        return self.fetcher.submit(url_path, expected, what, size=size)

    def stream(
        self, url_path: str, expected: ContentHash, what: str = "", *, size: int | None = None
    ) -> Iterator[bytes | None]:
        return self.fetcher.stream(url_path, expected, what, size=size)

    def catalog(
        self, url_path: str, expected: ContentHash, what: str = "", *, size: int | None = None
    ) -> bytes | mmap.mmap:
        """The service's inflated copy, mapped (it verified it against its name, which is
        ``expected``); else fetched and inflated here."""
        fqrn, _, path = url_path.removeprefix("/cvmfs/").partition("/")
        if url_path.startswith("/cvmfs/") and path.endswith("C") and is_repository_file(fqrn, path):
            data = self.client.catalog(fqrn, path)
            if data is not None:
                self.from_service += 1
                return data
        return self.fetcher.catalog(url_path, expected, what, size=size)
