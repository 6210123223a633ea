"""RAM cache of read-only RAM files: LRU by bytes, reference counts, single-flight loads.

Objects are decompressed into files no one can change (worker.ram.ramfiles: a private huge-page
tmpfs or sealed memfds), so the tracer can hand a tracee the file's ``path`` and every read,
mmap and fstat is native. Objects
a tracee holds open are pinned (reference count > 0) and never evicted; only unpinned objects
live in the LRU, so eviction is O(1) from its tail.
"""

from __future__ import annotations

import errno
import logging
import resource
import threading
from collections.abc import Callable, Sequence

from lru import LRU

from worker.ram.ramfiles import Fill, RamFile, RamFiles, default_ram_files, fd_path

log = logging.getLogger("hep_exec.cache")

Loader = Callable[[], "bytes | Sequence[bytes]"]
Make = Callable[[], RamFile]


class CacheFull(MemoryError):
    """No room for an object although everything evictable was evicted (all pinned)."""

    errno = errno.ENOMEM


class CachedObject:
    """One read-only RAM file; ``path`` is what a tracee opens to get its own read-only fd.

    ``by_name``: ``path`` names the file in a directory (a tmpfs object) rather than reopening
    our fd number, so it stays right as long as the object lives and fails (ENOENT), never
    leads elsewhere, after; ``name``: that name when it is ours to remove on eviction.
    """

    __slots__ = ("by_name", "fd", "key", "name", "path", "refs", "size")

    def __init__(
        self, key: str, fd: int, size: int, path: str | None = None, name: str | None = None
    ) -> None:
        self.key = key
        self.fd = fd
        self.size = size
        self.refs = 0
        by_fd = fd_path(fd)
        self.path = path or by_fd
        self.by_name = self.path != by_fd
        self.name = name

    def __repr__(self) -> str:
        return f"CachedObject({self.key!r}, fd={self.fd}, size={self.size}, refs={self.refs})"


class CacheStats:
    """Counters of a RAM cache.  Not a dataclass: every job's start defines it, and the
    generated methods of one cost ~0.5 ms there."""

    __slots__ = ("bytes_evicted", "bytes_loaded", "evictions", "full", "hits", "load_errors",
                 "misses", "waits")  # fmt: skip

    def __init__(self) -> None:
        self.hits = self.misses = self.waits = self.bytes_loaded = 0
        self.evictions = self.bytes_evicted = self.full = self.load_errors = 0


def default_max_objects() -> int:
    """Objects the cache may hold: the soft fd limit minus room for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, soft - max(64, soft // 8))


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (each cached object is one fd)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


class _Pending:
    """A load in progress: waiters block on ``done`` and share its result."""

    __slots__ = ("done", "error", "obj", "waiters")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.obj: CachedObject | None = None
        self.error: BaseException | None = None
        self.waiters = 0


class RamCache:
    """Byte-limited LRU of RAM files keyed by content hash, with pins and single-flight."""

    def __init__(
        self, limit_bytes: int, max_objects: int | None = None, files: RamFiles | None = None
    ) -> None:
        self.limit = limit_bytes
        self.files = files if files is not None else default_ram_files()
        # every object holds one fd in this process: stay below RLIMIT_NOFILE
        self.max_objects = max_objects if max_objects is not None else default_max_objects()
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._pinned: dict[str, CachedObject] = {}
        self._pinned_size = 0  # bytes of the pinned files, kept up to date (O(1) checks)
        # unpinned objects only (count unbounded: bytes are limited by hand)
        self._lru: LRU[str, CachedObject] = LRU(1 << 30)
        self._pending: dict[str, _Pending] = {}
        self._used = 0
        self._reserved = 0  # size hints of loads in progress (their files are filling)
        self._charged = 0  # residents that are not files (catalogs), never evicted

    # ------------------------------------------------------------------ public API

    def acquire(self, key: str, loader: Loader, size_hint: int | None = None) -> CachedObject:
        """Return the object pinned once more, loading it (once, whoever asks) if absent.

        Raises CacheFull when it cannot fit beside the pinned objects, or whatever the loader
        raised (every waiter of that load gets the same exception).
        """
        return self._acquire(key, lambda: self.files.make(key, loader()), size_hint)

    def acquire_filled(self, key: str, size: int, fill: Fill) -> CachedObject:
        """:meth:`acquire` for an object of known size that ``fill`` writes into its RAM file
        piece by piece (a chunked file): only the pieces in flight are in our memory, never
        the whole object; the file is published only once ``fill`` wrote all of it."""
        return self._acquire(key, lambda: self.files.make_filled(key, size, fill), size)

    def _acquire(self, key: str, make: Make, size_hint: int | None) -> CachedObject:
        with self._lock:
            obj = self._pinned.get(key)
            if obj is None:
                obj = self._lru.pop(key, None)
                if obj is not None:
                    self._pinned[key] = obj
                    self._pinned_size += obj.size
            if obj is not None:
                obj.refs += 1
                self.stats.hits += 1
                return obj
            pending = self._pending.get(key)
            if pending is not None:
                pending.waiters += 1
                self.stats.waits += 1
            else:
                if size_hint is not None and size_hint > self.limit - self._pinned_bytes():
                    self.stats.full += 1
                    raise self._full(key, size_hint)
                pending = self._pending[key] = _Pending()
                self.stats.misses += 1
                return self._load(key, make, pending, size_hint or 0)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.obj is not None
        return pending.obj

    def release(self, obj: CachedObject) -> None:
        """Drop one pin; an unpinned object becomes the most recently used LRU entry."""
        with self._lock:
            if obj.refs <= 0:
                raise ValueError(f"release of unpinned cache object {obj.key}")
            obj.refs -= 1
            if obj.refs == 0 and self._pinned.get(obj.key) is obj:
                del self._pinned[obj.key]
                self._pinned_size -= obj.size
                self._lru[obj.key] = obj
                self._evict_to(self.limit)

    def charge(self, nbytes: int) -> None:
        """Account resident data that is not a file (catalogs); may evict, never fails."""
        with self._lock:
            self._charged += nbytes
            self._used += nbytes
            self._evict_to(self.limit)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._pinned or key in self._lru

    def held_or_loading(self, key: str) -> bool:
        """In the cache, or being loaded into it now (an acquire of it waits, not loads)."""
        with self._lock:
            return key in self._pinned or key in self._lru or key in self._pending

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def pinned_bytes(self) -> int:
        with self._lock:
            return self._pinned_bytes()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pinned) + len(self._lru)

    def close(self) -> None:
        """Close every file (tracees that opened them keep their own fds)."""
        with self._lock:
            for obj in list(self._pinned.values()) + list(self._lru.values()):
                self.files.discard(obj.fd, obj.name)
            self._pinned.clear()
            self._pinned_size = 0
            self._lru.clear()
            self._used = self._charged

    # ------------------------------------------------------------------ internals

    def _pinned_bytes(self) -> int:
        return self._charged + self._pinned_size

    def _full(self, key: str, size: int) -> CacheFull:
        msg = (
            f"RAM cache full: object {key} needs {size} bytes, limit {self.limit}, "
            f"{self._pinned_bytes()} pinned by open files"
        )
        log.error("%s", msg)
        return CacheFull(msg)

    def _evict_to(self, target: int) -> None:
        while self._used > target and self._evict_one():
            pass

    def _evict_count(self, target: int) -> None:
        while len(self._pinned) + len(self._lru) > target and self._evict_one():
            pass

    def _evict_one(self) -> bool:
        """Drop the least recently used unpinned object; False when there is none."""
        last = self._lru.peek_last_item()
        if last is None:
            return False
        key, obj = last
        del self._lru[key]
        self.files.discard(obj.fd, obj.name)
        self._used -= obj.size
        self.stats.evictions += 1
        self.stats.bytes_evicted += obj.size
        return True

    def _load(self, key: str, make: Make, pending: _Pending, reserve: int) -> CachedObject:
        """Called with the lock held; makes the file without it.

        The file fills while the load runs, so unpinned objects make room for it first:
        ``_reserved`` holds the sizes of loads in progress until their objects count in
        ``_used`` (each object is counted once, by one or the other).
        """
        self._reserved += reserve
        self._evict_to(self.limit - self._reserved)
        self._lock.release()
        try:
            file = make()
        except BaseException as e:
            self._lock.acquire()
            self._reserved -= reserve
            del self._pending[key]
            self.stats.load_errors += 1
            pending.error = e
            pending.done.set()
            raise
        self._lock.acquire()
        try:
            self._reserved -= reserve
            del self._pending[key]
            size = file.size
            self._evict_to(self.limit - size)
            self._evict_count(self.max_objects - 1)
            if self._used + size > self.limit:
                self.files.discard(file.fd, file.name)
                self.stats.full += 1
                err = self._full(key, size)
                pending.error = err
                raise err
            obj = CachedObject(key, file.fd, size, file.path, file.name)
            obj.refs = 1 + pending.waiters
            self._pinned[key] = obj
            self._pinned_size += size
            self._used += size
            self.stats.bytes_loaded += size
            pending.obj = obj
            return obj
        finally:
            pending.done.set()
