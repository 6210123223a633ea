"""A repository mounted from the proxy: verified manifest, catalogs in RAM, objects in the cache.

``MountedRepository`` does the I/O the sans-I/O pieces ask for: it fetches the manifest ensemble
(and checks signatures when master keys are given), keeps the root catalog and lazily loaded
nested catalogs in memory, and loads file objects (whole or chunked) into the RAM cache.
``Repositories`` mounts repositories on first touch and remembers which names do not exist.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import itertools
import logging
import math
import mmap
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from lru import LRU

from cvmfs_format.catalog import (
    FLAG_BIND_MOUNTPOINT,
    FLAG_NESTED_MOUNTPOINT,
    Catalog,
    CatalogTree,
    Chunk,
    DirEntry,
    NestedRef,
)
from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import ContentHash
from cvmfs_format.manifest import Manifest, parse_manifest
from cvmfs_format.objects import Inflater, Suffix, inflate_pieces, parse_object_path
from cvmfs_format.verify import loading, recheck_ensemble, verify_ensemble
from worker.config import ConfigError
from worker.ram.ramcache import CachedObject, RamCache
from worker.ram.ramfiles import RamFileWriter
from worker.repo.fetcher import FetchError, NotFound, object_url

if TYPE_CHECKING:
    from concurrent.futures import Future

    from cvmfs_format.rsa_keys import RsaPublicKey

log = logging.getLogger("hep_exec.repository")
_MISSING = object()
_MOUNTPOINTS = FLAG_NESTED_MOUNTPOINT | FLAG_BIND_MOUNTPOINT
NESTED_RETRY = 30.0  # seconds a nested catalog that failed to load is not asked for again


class ObjectSource(Protocol):
    """What a repository needs from the network: verified stored bytes of a URL path."""

    def get(
        self,
        url_path: str,
        expected: ContentHash | None = None,
        what: str = "",
        check: Callable[[bytes], None] | None = None,
        *,
        size: int | None = None,
    ) -> bytes:
        """Verified stored bytes (or FetchError); ``size``: the catalog's, which bounds them."""
        ...

    def submit(
        self,
        url_path: str,
        expected: ContentHash | None = None,
        what: str = "",
        *,
        size: int | None = None,
    ) -> Future[bytes]:
        """Start one fetch; the future has its verified stored bytes (or FetchError)."""
        ...

    def ahead(self, url_path: str) -> None:
        """A hint: ``get`` of this will come soon (a source may ask for it now)."""
        ...

    def stream(
        self, url_path: str, expected: ContentHash, what: str = "", *, size: int | None = None
    ) -> Iterator[bytes | None]:
        """Verified stored bytes chunk by chunk as they come (None: start again); see
        worker.repo.fetcher.Fetcher.stream."""
        ...


class RepositorySource(ObjectSource, Protocol):
    """What a mounted repository needs: objects, and its catalogs ready to open."""

    def catalog(
        self, url_path: str, expected: ContentHash, what: str = "", *, size: int | None = None
    ) -> bytes | mmap.mmap:
        """A catalog's SQLite bytes, its stored form verified against ``expected`` (or
        FetchError, FormatError); a node's cache service hands a mapping of the copy it
        inflated once for all its jobs."""
        ...


class Voucher(Protocol):
    """Where a node's jobs vouch for the repository ensembles they verified (the node's
    cache service, which is the user's own): a job that mounts bytes another job verified
    with the same keys checks only what time can change (worker.node.cache_service)."""

    def vouched(self, digest: str) -> bool: ...

    def vouch(self, digest: str) -> None: ...


def ensemble_digest(fqrn: str, manifest: bytes, whitelist: bytes, keys: object) -> str | None:
    """What a verification of ``manifest`` and ``whitelist`` with ``keys`` is known by; None
    for keys that cannot say who they are without parsing (then nothing is vouched for)."""
    digest = getattr(keys, "digest", None)
    if not callable(digest):
        return None
    h = hashlib.sha256(b"hep-exec ensemble 1\0" + fqrn.encode() + b"\0")
    for part in (manifest, whitelist, str(digest()).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


class RepositoryError(OSError):
    """A repository or object that cannot be used; ``errno`` is what the tracee should see."""

    def __init__(self, err: int, message: str, reported: bool = False) -> None:
        super().__init__(err, message)
        self.message = message
        self.reported = reported  # said in the log already: callers need not say it again

    def __str__(self) -> str:
        return self.message


class NotOnServers(RepositoryError):
    """Every server said 404 for a file the catalog lists: with hep-proxy serving a preloaded
    store, a file the spec did not select.  Asking again (here, or after the node's service
    asked the same servers) cannot help: said once, EIO."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    @classmethod
    def of(cls, what: str, e: NotFound) -> NotOnServers:
        first = f": {e.failures[0]}" if e.failures else ""
        return cls(f"{what}: not in the preloaded store (not selected by the spec?){first}")


class MountedRepository:
    """One repository: bootstrap on construction; lookups are thread-safe and cached."""

    def __init__(
        self,
        fqrn: str,
        fetcher: RepositorySource,
        master_keys: Sequence[RsaPublicKey] = (),
        cache: RamCache | None = None,
        *,
        now: dt.datetime | None = None,
        lookup_cache_size: int = 1 << 16,
        voucher: Voucher | None = None,
        on_root: Callable[[str, str], None] | None = None,
    ) -> None:
        self.fqrn = fqrn
        self.voucher = voucher
        self.on_root = on_root  # (fqrn, root catalog hash): the manifest names it
        self.vouched = False  # verified by an earlier job of the node: rechecked only
        self.fetcher = fetcher
        self.cache = cache if cache is not None else RamCache(1 << 30)
        self.verified = bool(master_keys)
        self._lock = threading.RLock()
        self._lookups: LRU[str, DirEntry | None] = LRU(lookup_cache_size)
        self._listings: LRU[str, list[DirEntry]] = LRU(max(256, lookup_cache_size // 16))
        self._failed_catalogs: dict[ContentHash, tuple[RepositoryError, float]] = {}
        self.manifest = self._bootstrap(master_keys, now or dt.datetime.now(dt.UTC))
        root = self._load_catalog(
            self.manifest.root_catalog, "root catalog", self.manifest.root_catalog_size
        )
        if root.revision != self.manifest.revision:
            raise RepositoryError(
                errno.EIO,
                f"{fqrn}: root catalog revision {root.revision} != manifest revision "
                f"{self.manifest.revision}",
            )
        self.tree = CatalogTree(root)
        self.root_entry = self.lookup("")
        if self.root_entry is None or not self.root_entry.is_dir:
            raise RepositoryError(errno.EIO, f"{fqrn}: root catalog has no root directory")
        log.info(
            "mounted %s revision %d (root catalog %s%s)",
            fqrn,
            self.manifest.revision,
            self.manifest.root_catalog.hex,
            ", signature verified by an earlier job of the node"
            if self.vouched
            else ", signature verified"
            if self.verified
            else "",
        )

    # ------------------------------------------------------------------ bootstrap

    def _read(self, relpath: str, what: str = "", size: int | None = None) -> bytes:
        """Fetch a repository file; ``data/`` objects are verified against their own name;
        ``size``: the uncompressed size a catalog or manifest gives (bounds the answer)."""
        expected = parse_object_path(relpath).hash if relpath.startswith("data/") else None
        return self.fetcher.get(
            object_url(self.fqrn, relpath), expected, what or relpath, size=size
        )

    def _bootstrap(self, master_keys: Sequence[RsaPublicKey], now: dt.datetime) -> Manifest:
        fqrn = self.fqrn
        if master_keys:
            self.fetcher.ahead(object_url(fqrn, ".cvmfswhitelist"))
        try:
            raw = self.fetcher.get(
                object_url(fqrn, ".cvmfspublished"),
                None,
                f"{fqrn}/.cvmfspublished",
                check=manifest_check,
            )
            self._ahead_root(raw)
            if master_keys:
                whitelist = self.fetcher.get(
                    object_url(fqrn, ".cvmfswhitelist"), None, f"{fqrn}/.cvmfswhitelist"
                )
                manifest = self._verify(raw, whitelist, master_keys, now)
            else:
                manifest = parse_manifest(raw).manifest
        except NotFound as e:
            raise RepositoryError(errno.ENOENT, f"{fqrn}: repository not served ({e})") from None
        except FetchError as e:
            raise RepositoryError(errno.EIO, str(e)) from None
        except FormatError as e:
            raise RepositoryError(errno.EIO, f"{fqrn}: {e}") from None
        if manifest.name and manifest.name != fqrn:
            raise RepositoryError(errno.EIO, f"{fqrn}: manifest names repository {manifest.name!r}")
        return manifest

    def _ahead_root(self, raw: bytes) -> None:
        """Ask for what the manifest names (its root catalog; through ``on_root``, the node's
        answers for it) while its signatures are checked: only asked for, never used before
        they are."""
        try:
            root = parse_manifest(raw).manifest.root_catalog
        except FormatError:
            return  # (said by the verification)
        self.fetcher.ahead(object_url(self.fqrn, root.object_path(Suffix.CATALOG)))
        if self.on_root is not None:
            self.on_root(self.fqrn, root.hex)

    def _verify(
        self,
        raw: bytes,
        whitelist: bytes,
        master_keys: Sequence[RsaPublicKey],
        now: dt.datetime,
    ) -> Manifest:
        """The signatures (master key, whitelist, certificate, manifest), unless a job of the
        node verified these very bytes with these keys: then what time can change (expiry)."""
        digest = None
        if self.voucher is not None:
            digest = ensemble_digest(self.fqrn, raw, whitelist, master_keys)
        if digest is not None and self.voucher is not None and self.voucher.vouched(digest):
            self.vouched = True
            return recheck_ensemble(raw, whitelist, self.fqrn, now)
        keys = list(master_keys)  # parsed here, on first use (worker.repo.keys.MasterKeys)
        manifest = verify_ensemble(raw, whitelist, self._read, self.fqrn, keys, now)
        if digest is not None and self.voucher is not None:
            self.voucher.vouch(digest)
        return manifest

    def _load_catalog(self, content: ContentHash, what: str, size: int | None) -> Catalog:
        name = f"{self.fqrn} {what}"
        path = object_url(self.fqrn, content.object_path(Suffix.CATALOG))
        try:
            catalog = Catalog(self.fetcher.catalog(path, content, name, size=size or None), name)
        except FetchError as e:
            raise RepositoryError(errno.EIO, str(e)) from None
        except FormatError as e:
            raise RepositoryError(errno.EIO, f"{self.fqrn}: {e}") from None
        self.cache.charge(catalog.size)
        return catalog

    def _attach(self, ref: NestedRef) -> None:
        failed = self._failed_catalogs.get(ref.hash)
        if failed is not None and time.monotonic() < failed[1]:
            raise RepositoryError(failed[0].errno or errno.EIO, failed[0].message, reported=True)
        try:
            catalog = self._load_catalog(ref.hash, f"nested catalog {ref.path}", ref.size)
        except RepositoryError as e:
            # said once; every path below it fails the same way for a while, quietly
            self._failed_catalogs[ref.hash] = (e, time.monotonic() + NESTED_RETRY)
            raise
        try:
            self.tree.attach(ref.path, catalog)
        except FormatError as e:
            raise RepositoryError(errno.EIO, f"{self.fqrn}: {e}") from None
        log.debug("%s: attached nested catalog %s", self.fqrn, ref.path)

    # ------------------------------------------------------------------ queries

    @property
    def revision(self) -> int:
        return self.manifest.revision

    @property
    def catalogs_loaded(self) -> int:
        return len(self.tree.catalogs)

    def lookup(self, relpath: str) -> DirEntry | None:
        """Entry for ``""`` (root) or ``/a/b``; loads nested catalogs as needed."""
        hit = self._lookups.get(relpath, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        with self._lock:
            try:
                entry = loading(self._attach, lambda: self.tree.lookup(relpath))
            except FormatError as e:
                raise RepositoryError(errno.EIO, f"{self.fqrn}:{relpath}: {e}") from None
            self._lookups[relpath] = entry
            return entry

    def listing(self, relpath: str) -> list[DirEntry]:
        """Children of the directory ``relpath``, sorted by name."""
        hit = self._listings.get(relpath)
        if hit is not None:
            return hit
        with self._lock:
            try:
                entries = loading(self._attach, lambda: self.tree.listing(relpath))
            except FormatError as e:
                raise RepositoryError(errno.EIO, f"{self.fqrn}:{relpath}: {e}") from None
            self._listings[relpath] = entries
            # their look-ups follow (stat, open, and a walk's next directory); not a nested
            # catalog's mountpoint (or a bind mountpoint): that is looked up in the nested
            # catalog once it is loaded, where its root entry is
            for child in entries:
                if not child.flags & _MOUNTPOINTS and child.path not in self._lookups:
                    self._lookups[child.path] = child
            return entries

    def chunks(self, relpath: str) -> list[Chunk]:
        with self._lock:
            return loading(self._attach, lambda: self.tree.chunks(relpath))

    # ------------------------------------------------------------------ objects

    def object_key(self, entry: DirEntry) -> str:
        """RAM-cache key: the content hash, or a digest of the chunk list for chunked files."""
        if entry.is_chunked:
            return chunked_key(self.chunks(entry.path))
        if entry.hash is None:
            raise RepositoryError(errno.EIO, f"{self.fqrn}:{entry.path}: file without content hash")
        return entry.hash.hex

    def open_object(self, entry: DirEntry) -> CachedObject:
        """Pin the file's content in the RAM cache (fetching it once); release via the cache."""
        path = f"{self.fqrn}:{entry.path}"
        if not entry.is_regular:
            raise RepositoryError(errno.EINVAL, f"{path}: not a regular file")
        if entry.is_external:
            raise RepositoryError(errno.EIO, f"{path}: external files are not supported")
        key = self.object_key(entry)
        if entry.is_chunked:
            chunks = self.chunks(entry.path)
            return self.cache.acquire_filled(
                key, entry.size, lambda out: self._fill_chunks(entry, chunks, out)
            )
        content = entry.hash
        assert content is not None
        return self.cache.acquire_filled(
            key,
            entry.size,
            lambda out: fill_whole(
                self.fetcher, self.fqrn, entry.path, content, entry.is_compressed, entry.size, out
            ),
        )

    def _fill_chunks(self, entry: DirEntry, chunks: list[Chunk], out: RamFileWriter) -> None:
        fill_chunks(
            self.fetcher, self.fqrn, entry.path, chunks, entry.is_compressed, entry.size, out
        )


def chunked_key(chunks: Sequence[Chunk]) -> str:
    """Cache key of a chunked file: a digest of its chunk hashes in order."""
    h = hashlib.sha1(b"chunked")
    for c in chunks:
        h.update(c.hash.digest)
    return f"chunked-{h.hexdigest()}"


# Objects from this size on are inflated and written as their chunks arrive: below it an
# answer is one or two socket reads, and the hand-over of each chunk to the caller's thread
# costs more than it saves (a cold import of 2,000 small modules: 938 -> 967 ms streamed).
STREAM_FROM = 256 * 1024


def fill_whole(
    fetcher: ObjectSource,
    fqrn: str,
    path: str,
    content: ContentHash,
    compressed: bool,
    size: int,
    out: RamFileWriter,
) -> None:
    """Fetch a whole-file object and write it, verified and decompressed, into its RAM file;
    RepositoryError (EIO) otherwise.  A big one is inflated and written chunk by chunk while
    the fetcher's thread receives and hashes the next (a 1 MiB object's 0.36 ms of inflating
    and writing no longer follow its fetch); the file is only shown once the hash is right."""
    what = f"{fqrn}:{path}"
    url = object_url(fqrn, content.object_path())
    try:
        if size < STREAM_FROM:
            stored = fetcher.get(url, content, what, size=size)
        else:
            _fill_streamed(
                fetcher.stream(url, content, what, size=size), compressed, size, what, out
            )
            return
    except NotFound as e:
        raise NotOnServers.of(what, e) from None
    except FetchError as e:
        raise RepositoryError(errno.EIO, str(e)) from None
    write_object(stored, compressed, size, what, out)


def _fill_streamed(
    chunks: Iterable[bytes | None], compressed: bool, size: int, what: str, out: RamFileWriter
) -> None:
    """Write what ``chunks`` make (see ObjectSource.stream: None, start again); an answer
    that does not make the object is said only if its hash was right: a wrong answer is
    followed by another one."""
    broken: FormatError | None = None
    n = 0
    inflater = Inflater(what, size) if compressed else None
    for chunk in chunks:
        if chunk is None:
            broken, n = None, 0
            inflater = Inflater(what, size) if compressed else None
            out.start_over()
        elif broken is None:
            try:
                n = _write_pieces(
                    out, n, inflater.feed(chunk) if inflater else (chunk,), size, what
                )
            except FormatError as e:
                broken = e
    try:
        if broken is not None:
            raise broken
        if inflater is not None:
            n = _write_pieces(out, n, inflater.finish(), size, what)
    except FormatError as e:
        raise RepositoryError(errno.EIO, str(e)) from None
    if n != size:
        raise RepositoryError(errno.EIO, f"{what}: object has {n} bytes, catalog says {size}")


def _write_pieces(
    out: RamFileWriter, offset: int, pieces: Iterable[bytes], end: int, what: str
) -> int:
    """Write ``pieces`` from ``offset`` on, never past ``end``; the offset after them."""
    for piece in pieces:
        if offset + len(piece) > end:
            raise FormatError(f"{what}: object has more bytes than the catalog says")
        out.write_at(offset, piece)
        offset += len(piece)
    return offset


def write_object(
    stored: bytes, compressed: bool, size: int, what: str, out: RamFileWriter, offset: int = 0
) -> None:
    """Write verified stored bytes, decompressed, at ``offset`` of a RAM file (in pieces: see
    cvmfs_format.objects.inflate_pieces); RepositoryError (EIO) unless they make exactly
    ``size`` bytes, the catalog's."""
    if not compressed and len(stored) != size:
        raise RepositoryError(
            errno.EIO, f"{what}: object has {len(stored)} bytes, catalog says {size}"
        )
    pieces = inflate_pieces(stored, what, size) if compressed else (stored,)
    try:  # the limit stops a stream that inflates to more than the catalog says
        n = _write_pieces(out, offset, pieces, offset + size, what) - offset
    except FormatError as e:
        raise RepositoryError(errno.EIO, str(e)) from None
    if n != size:
        raise RepositoryError(errno.EIO, f"{what}: object has {n} bytes, catalog says {size}")


CHUNKS_AHEAD = 4  # chunk fetches in flight while one is inflated and written


def fill_chunks(
    fetcher: ObjectSource,
    fqrn: str,
    path: str,
    chunks: Sequence[Chunk],
    compressed: bool,
    size: int,
    out: RamFileWriter,
    ahead: int = CHUNKS_AHEAD,
) -> None:
    """Write a chunked file into its RAM file, one verified, decompressed chunk at a time.

    ``ahead`` chunks are fetched concurrently (each under the fetcher's own timeouts and
    retries) while the oldest is inflated, written at its offset and dropped: memory holds a
    few chunks, never the file. Any failure raises RepositoryError (EIO) and the caller
    throws the partial file away.
    """
    what = f"{fqrn}:{path}"
    expect = 0
    for c in chunks:
        if c.offset != expect:
            raise RepositoryError(errno.EIO, f"{what}: chunk list has a gap at {expect}")
        expect += c.size
    if expect != size:
        raise RepositoryError(errno.EIO, f"{what}: chunks cover {expect} of {size}")

    def start(c: Chunk) -> tuple[Chunk, Future[bytes]]:
        url = object_url(fqrn, c.hash.object_path(Suffix.PARTIAL))
        return c, fetcher.submit(url, c.hash, f"{what} chunk @{c.offset}", size=c.size)

    todo = iter(chunks)
    # a failed load leaves at most ``ahead`` fetches running; their bytes are dropped
    in_flight = deque(start(c) for c in itertools.islice(todo, max(1, ahead)))
    while in_flight:
        c, future = in_flight.popleft()
        try:
            stored = future.result()
        except NotFound as e:
            raise NotOnServers.of(f"{what} chunk @{c.offset}", e) from None
        except Exception as e:  # FetchError, or the fetcher closing under us
            raise RepositoryError(errno.EIO, str(e) or type(e).__name__) from None
        del future  # it holds the stored bytes too: let them go with ``stored``
        following = next(todo, None)
        if following is not None:
            in_flight.append(start(following))
        write_object(stored, compressed, c.size, f"{what} chunk @{c.offset}", out, c.offset)
        del stored


def manifest_check(raw: bytes) -> None:
    """Raises FormatError for bytes that are no manifest (fetch them elsewhere)."""
    parse_manifest(raw)


REPOSITORY_NAME = re.compile(r"(?:[A-Za-z0-9_-]+\.)+[A-Za-z][A-Za-z0-9-]*")


class Repositories:
    """The repositories under /cvmfs: configured ones, or any the proxy serves (on first touch)."""

    def __init__(
        self,
        fetcher: RepositorySource,
        master_keys: Sequence[RsaPublicKey] = (),
        cache: RamCache | None = None,
        configured: Sequence[str] = (),
        keys_for: Callable[[str], Sequence[RsaPublicKey]] | None = None,
        voucher: Voucher | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.voucher = voucher
        self.master_keys = master_keys  # parsed on the first mount (MasterKeys)
        self.keys_for = keys_for  # a repository's own keys (the site's domain.d/, config.d/)
        self.cache = cache if cache is not None else RamCache(1 << 30)
        self.configured = tuple(configured)
        self._mounted: dict[str, MountedRepository] = {}
        self._failed: dict[str, tuple[RepositoryError, float]] = {}
        self._lock = threading.Lock()
        self._mounting: dict[str, threading.Lock] = {}
        # told of each mount (worker.trace.node_answers: the node's answers for that revision),
        # and as it begins
        self.on_mount: Callable[[MountedRepository], None] | None = None
        self.on_mounting: Callable[[str], None] | None = None
        self.on_root: Callable[[str, str], None] | None = None  # its root catalog, unverified

    def _keys(self, fqrn: str) -> Sequence[RsaPublicKey]:
        if self.keys_for is None:
            return self.master_keys
        try:
            return self.keys_for(fqrn)
        except (ConfigError, FormatError, OSError) as e:  # one line each
            raise RepositoryError(errno.EIO, f"/cvmfs/{fqrn}: {e}") from None

    def checks_signatures(self, fqrn: str) -> bool:
        """Does a mount of ``fqrn`` check its signatures (it has master keys), and so read
        its whitelist?  False also where its keys cannot be had (its mount says why)."""
        try:
            return bool(self._keys(fqrn))
        except RepositoryError:
            return False

    def names(self) -> list[str]:
        """What ``ls /cvmfs`` shows: configured names, else the repositories mounted so far."""
        if self.configured:
            return list(self.configured)
        return sorted(self._mounted)

    def mounted(self) -> dict[str, MountedRepository]:
        return dict(self._mounted)

    def get(self, fqrn: str) -> MountedRepository:
        """Mount on first use (once, even when asked from several threads).

        Raises RepositoryError: ENOENT for names not configured or not served, EIO for
        repositories that fail verification; failures are remembered (one log line each).
        """
        repo = self._mounted.get(fqrn)
        if repo is not None:
            return repo
        self._raise_if_failed(fqrn)
        if fqrn not in self.configured and not REPOSITORY_NAME.fullmatch(fqrn):
            # repositories are named like hosts (sft.cern.ch): a program probing /cvmfs/lib
            # or /cvmfs/python3.11 gets ENOENT with no request and no line in its stderr
            err = RepositoryError(errno.ENOENT, f"/cvmfs/{fqrn}: not a repository name", True)
            log.debug("%s", err)
            self._failed[fqrn] = (err, math.inf)
            raise err
        if self.configured and fqrn not in self.configured:
            err = RepositoryError(errno.ENOENT, f"/cvmfs/{fqrn}: repository not configured", True)
            log.warning("%s", err)
            self._failed[fqrn] = (err, math.inf)
            raise err
        with self._lock:
            lock = self._mounting.setdefault(fqrn, threading.Lock())
        with lock:
            repo = self._mounted.get(fqrn)
            if repo is not None:
                return repo
            self._raise_if_failed(fqrn)
            if self.on_mounting is not None:
                self.on_mounting(fqrn)
            try:
                repo = MountedRepository(
                    fqrn,
                    self.fetcher,
                    self._keys(fqrn),
                    self.cache,
                    voucher=self.voucher,
                    on_root=self.on_root,
                )
            except RepositoryError as e:
                # said by whoever came to it (worker.repo.namespace: with the path it asked for)
                log.debug("/cvmfs/%s: cannot mount: %s", fqrn, e)
                # a name the proxy does not serve stays unknown; I/O trouble may pass
                retry_at = math.inf if e.errno == errno.ENOENT else time.monotonic() + 30
                self._failed[fqrn] = (e, retry_at)
                raise
            self._mounted[fqrn] = repo
        if self.on_mount is not None:
            try:
                self.on_mount(repo)
            except Exception as e:  # a helper's trouble never fails the mount
                log.warning("/cvmfs/%s: after mounting: %r", fqrn, e)
        return repo

    def settled(self, fqrn: str) -> None:
        """Return once no thread is mounting ``fqrn`` (see :meth:`get`)."""
        lock = self._mounting.get(fqrn)
        if lock is not None:
            with lock:
                pass

    def _raise_if_failed(self, fqrn: str) -> None:
        failed = self._failed.get(fqrn)
        if failed is not None:
            if time.monotonic() < failed[1]:
                raise failed[0]
            del self._failed[fqrn]
