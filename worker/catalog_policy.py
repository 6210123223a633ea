"""The tracer's policy backed by the real data side: catalogs, fetcher and RAM cache.

Opens hand the tracee the path of the object's RAM file: ``/proc/<pid>/fd/<dir>/<name>`` on
the private tmpfs, ``/proc/<pid>/fd/<n>`` of a sealed memfd. Such an answer is marked
``stable`` so the C side can repeat it without asking Python, which is only safe while the
object stays pinned: the policy keeps what it handed out pinned up to a budget (half the RAM
limit), and beyond it unpins the least recently handed-out objects, first withdrawing their
cached answers with :func:`worker.trace.tracer.forget`.

A tracee thread that was answered but has not run its open yet must never open a different
object. A tmpfs name is never reused (it fails with ENOENT once the object is evicted); an fd
number is, so for memfds the policy hands out its own duplicate, and on unpinning puts a
*tombstone* (a socket: opening it through /proc fails with ENXIO) on that number instead of
closing it; the memfd's memory is freed at once, the number is reused only
``grace`` seconds later. Unpinning prefers objects handed out more than ``grace`` ago; when
the cache is full it unpins younger ones too and retries (a late opener then gets an error,
never wrong bytes) rather than failing every later open with ENOMEM.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Sequence

from lru import LRU

from cvmfs_format.magic_xattrs import magic_xattrs
from cvmfs_format.xattrs import decode_xattrs, encode_xattrs
from worker.ram.ramcache import CachedObject
from worker.ram.ramfiles import fd_path, named_path
from worker.repo.namespace import Node as NsNode
from worker.repo.namespace import is_normal_path
from worker.session import WorkerSession
from worker.trace.policy import Entry, Kind, Node, Opened, repository_dev
from worker.trace.tracee_env import LazyEnviron
from worker.trace.tracer import forget

log = logging.getLogger("hep_exec.policy")


class _Pin:
    """An object handed out to tracees.  Not a dataclass: every job's start defines it, and the
    generated methods of one cost ~0.5 ms there."""

    __slots__ = ("fd", "handed_out", "obj", "paths")

    def __init__(self, obj: CachedObject, fd: int, paths: set[bytes], handed_out: float) -> None:
        self.obj = obj
        self.fd = fd  # our duplicate of obj.fd: the number tracees open through /proc (-1: by name)
        self.paths = paths
        self.handed_out = handed_out


class CatalogPolicy:
    """Answers the tracer from a :class:`WorkerSession` (one call at a time, tracer thread)."""

    def __init__(self, session: WorkerSession, grace: float = 1.0) -> None:
        self.session = session
        self.namespace = session.namespace
        self.grace = grace
        self.budget = session.config.ram_bytes // 2
        self._pins: OrderedDict[str, _Pin] = OrderedDict()  # by cache key, LRU first
        self._pinned_bytes = 0
        self._tomb = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._tombs: deque[tuple[int, float]] = deque()  # fd numbers held by a tombstone
        self.unpinned = 0  # objects unpinned while the command ran (--stats)
        self._listings: LRU[bytes, list[Entry]] = LRU(1024)
        self._known: LRU[bytes, Node] = LRU(1 << 17)

    def _resolve(self, pid: int, path: bytes) -> NsNode | int:
        return self.namespace.resolve(path, False, LazyEnviron(pid))

    def lookup(self, pid: int, path: bytes) -> Node | int:
        known = self._known.get(path)  # an entry of a directory listed already
        if known is not None:
            return known
        ns = self._resolve(pid, path)
        if isinstance(ns, int):
            return ns
        if ns.kind == "outside":  # the tracer walks symlinks itself; not expected here
            log.warning("%s: resolves outside the mount", os.fsdecode(path))
            return errno.ENOENT
        return _policy_node(ns)

    def listdir(self, path: bytes) -> Sequence[Entry] | int:
        # asked twice per directory (its mirror, then its entries answered ahead); the job
        # sees one revision, so a listing never changes
        hit = self._listings.get(path)
        if hit is not None:
            return hit
        if path == self.namespace.mount:
            listing = self.namespace.listdir(path)
            if isinstance(listing, int):
                return listing
            entries = [Entry(n, Kind.DIR, ino) for n, _, ino in listing if n not in (b".", b"..")]
            self._listings[path] = entries
            return entries
        got = self.namespace.children(path)
        if isinstance(got, int):
            return got
        parent, kids = got
        # the entries' answers, for the look-ups that follow (ls -l, the tracer's answers
        # ahead): not when they depend on who asks
        keep = not parent.env_dependent and is_normal_path(path)
        entries = []
        for name, kid in kids:
            node = _policy_node(kid)
            entries.append(Entry(name, node.kind, node.ino))
            if keep and not node.volatile:
                self._known[path + b"/" + name] = node
        self._listings[path] = entries
        return entries

    def open(self, pid: int, path: bytes, node: Node) -> Opened | int:
        ns = self._resolve(pid, path)
        if isinstance(ns, int):
            return ns
        now = time.monotonic()
        self._close_old_tombs(now)
        cache = self.session.cache
        if self.session.shared is None and cache.pinned_bytes + ns.size > cache.limit:
            self._unpin(now, cache.limit - ns.size - cache.pinned_bytes + self._pinned_bytes, 0.0)
        obj = self.session.open_file(ns)
        if obj == errno.ENOMEM and self._pins:
            self._unpin(now, self.budget // 2, grace=0.0)  # make room, then one more try
            obj = self.session.open_file(ns)
        if isinstance(obj, int):
            return obj
        pin = self._pins.get(obj.key)
        if pin is None:
            pin = _Pin(obj, -1 if obj.by_name else os.dup(obj.fd), set(), now)
            self._pins[obj.key] = pin
            self._pinned_bytes += obj.size
        else:
            self.session.release(obj)  # already pinned: one reference per object is enough
        pin.paths.add(path)
        pin.handed_out = now
        self._pins.move_to_end(pin.obj.key)
        self._unpin(now, self.budget, self.grace)
        target = pin.obj.path if pin.fd < 0 else fd_path(pin.fd)
        return Opened(target.encode(), stable=True)

    def opens_ahead(self, pid: int, paths: Sequence[bytes]) -> dict[bytes, Opened]:
        """Opens that can be answered before they are asked, costing nothing: those of
        ``paths`` whose objects the node's cache service holds, found by their keys in its
        directory (a stat each, no request).  Nothing is pinned; when the service evicts
        one, the tracer finds its name gone and asks :meth:`open` (worker/trace/_trap.c,
        stale_open).  None while recording an access list, which must see every first open.
        """
        shared = self.session.shared
        names = None if shared is None else shared.names_dir
        if names is None or self.session.recorder is not None:
            return {}
        out: dict[bytes, Opened] = {}
        for path in paths:
            ns = self._resolve(pid, path)
            if isinstance(ns, int) or ns.kind != "file" or ns.entry is None or ns.repo is None:
                continue
            entry = ns.entry
            if not entry.is_regular or entry.is_external:
                continue
            try:  # the service's key: the content hash, or the chunk list's digest
                key = self.session.repos.get(ns.repo).object_key(entry)
                st = os.stat(key, dir_fd=names)
            except OSError:  # RepositoryError too; or not on this node (yet): the open fetches
                continue
            if st.st_size == entry.size:
                out[path] = Opened(named_path(names, key).encode(), stable=True)
        return out

    def _unpin(self, now: float, budget: int, grace: float) -> None:
        """Unpin least recently handed-out objects until at most ``budget`` bytes are pinned,
        sparing those handed out less than ``grace`` seconds ago."""
        while self._pinned_bytes > budget and self._pins:
            key, pin = next(iter(self._pins.items()))
            if now - pin.handed_out < grace:
                return  # everything newer may still be in flight; retry at the next open
            del self._pins[key]
            for p in pin.paths:
                forget(p)
            if pin.fd >= 0:
                os.dup2(self._tomb.fileno(), pin.fd)  # frees the memfd, keeps the number
                self._tombs.append((pin.fd, now))
            self._pinned_bytes -= pin.obj.size
            self.session.release(pin.obj)
            self.unpinned += 1

    def _close_old_tombs(self, now: float) -> None:
        while self._tombs and now - self._tombs[0][1] >= self.grace:
            os.close(self._tombs.popleft()[0])

    def mounted(self) -> Sequence[str]:
        return list(self.session.repos.mounted())

    def magic_xattrs(self, pid: int, path: bytes) -> bytes:
        ns = self._resolve(pid, path)
        if isinstance(ns, int) or ns.repo is None or ns.kind == "outside":
            return b""
        entry, repo = ns.entry, self.session.repos.get(ns.repo)  # (mounted: the walk came here)
        chunked = entry is not None and entry.is_regular and entry.is_chunked
        manifest = repo.manifest
        attrs = magic_xattrs(
            repo.fqrn, manifest.revision, manifest.root_catalog.hex, entry,
            len(repo.chunks(entry.path)) if entry is not None and chunked else 1,
        )  # fmt: skip
        published = decode_xattrs(entry.xattr_blob) if entry is not None else {}
        return encode_xattrs({**published, **attrs}) or b""

    def close(self) -> None:
        for pin in self._pins.values():
            if pin.fd >= 0:
                os.close(pin.fd)
            self.session.release(pin.obj)
        self._pins.clear()
        self._pinned_bytes = 0
        while self._tombs:
            os.close(self._tombs.popleft()[0])
        self._tomb.close()


_KINDS = {k.value: k for k in Kind}


def _policy_node(ns: NsNode) -> Node:
    """The tracer's view of a name-space node (positional: a listing makes one per entry)."""
    entry = ns.entry
    mode = ns.mode
    return Node(
        _KINDS[mode & 0o170000],  # (stat.S_IFMT)
        mode & 0o7777,  # (stat.S_IMODE)
        ns.size,
        ns.ino,
        ns.nlink,
        ns.mtime * 1_000_000_000 + ns.mtime_ns,
        None,
        ns.rdev,
        ns.target or b"",
        ns.env_dependent,
        (entry.xattr_blob or b"") if entry is not None else b"",
        repository_dev(ns.repo) if ns.repo else 0,
    )
