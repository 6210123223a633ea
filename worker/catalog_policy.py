"""The tracer's policy backed by the real data side: catalogs, fetcher and RAM cache.

Opens hand the tracee ``/proc/<pid>/fd/<n>`` of a sealed memfd. Such an answer is marked
``stable`` so the C side can repeat it without asking Python, which is only safe while the
memfd stays pinned: the policy keeps what it handed out pinned up to a budget (half the RAM
limit), and beyond it unpins the least recently handed-out objects, first withdrawing their
cached answers with :func:`worker.tracer.forget`. An object handed out less than
``grace`` seconds ago is never unpinned, so a tracee thread that was answered but not yet
scheduled cannot open a recycled fd number.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from worker.namespace import DT_BLK, DT_CHR, DT_DIR, DT_FIFO, DT_LNK, DT_SOCK
from worker.namespace import Node as NsNode
from worker.policy import Entry, Kind, Node, Opened
from worker.ramcache import CachedObject
from worker.session import WorkerSession
from worker.tracee_env import LazyEnviron
from worker.tracer import forget

log = logging.getLogger("hep_exec.policy")

_KIND_OF_DTYPE = {
    DT_DIR: Kind.DIR,
    DT_LNK: Kind.LNK,
    DT_FIFO: Kind.FIFO,
    DT_CHR: Kind.CHR,
    DT_BLK: Kind.BLK,
    DT_SOCK: Kind.SOCK,
}


@dataclass
class _Pin:
    obj: CachedObject
    paths: set[bytes]
    handed_out: float


class CatalogPolicy:
    """Answers the tracer from a :class:`WorkerSession` (one call at a time, tracer thread)."""

    def __init__(self, session: WorkerSession, grace: float = 1.0) -> None:
        self.session = session
        self.namespace = session.namespace
        self.grace = grace
        self.budget = session.config.ram_bytes // 2
        self._pins: OrderedDict[str, _Pin] = OrderedDict()  # by cache key, LRU first
        self._pinned_bytes = 0

    def _resolve(self, pid: int, path: bytes) -> NsNode | int:
        return self.namespace.resolve(path, False, LazyEnviron(pid))

    def lookup(self, pid: int, path: bytes) -> Node | int:
        ns = self._resolve(pid, path)
        if isinstance(ns, int):
            return ns
        if ns.kind == "outside":  # the tracer walks symlinks itself; not expected here
            log.warning("%s: resolves outside the mount", os.fsdecode(path))
            return errno.ENOENT
        target = ns.target or b""
        return Node(
            kind=Kind(stat.S_IFMT(ns.mode)),
            mode=stat.S_IMODE(ns.mode),
            size=ns.size,
            ino=ns.ino,
            nlink=ns.nlink,
            mtime_ns=ns.mtime * 1_000_000_000 + ns.mtime_ns,
            rdev=ns.rdev,
            target=target,
            volatile=ns.env_dependent,
        )

    def listdir(self, path: bytes) -> Sequence[Entry] | int:
        listing = self.namespace.listdir(path)
        if isinstance(listing, int):
            return listing
        return [
            Entry(name, _KIND_OF_DTYPE.get(d_type, Kind.REG), ino)
            for name, d_type, ino in listing
            if name not in (b".", b"..")
        ]

    def open(self, pid: int, path: bytes, node: Node) -> Opened | int:
        ns = self._resolve(pid, path)
        if isinstance(ns, int):
            return ns
        obj = self.session.open_file(ns)
        if isinstance(obj, int):
            return obj
        now = time.monotonic()
        pin = self._pins.get(obj.key)
        if pin is None:
            pin = _Pin(obj, set(), now)
            self._pins[obj.key] = pin
            self._pinned_bytes += obj.size
        else:
            self.session.release(obj)  # already pinned: one reference per object is enough
        pin.paths.add(path)
        pin.handed_out = now
        self._pins.move_to_end(pin.obj.key)
        self._unpin_over_budget(now)
        return Opened(os.fsencode(pin.obj.path), stable=True)

    def _unpin_over_budget(self, now: float) -> None:
        while self._pinned_bytes > self.budget and self._pins:
            key, pin = next(iter(self._pins.items()))
            if now - pin.handed_out < self.grace:
                return  # everything older is still in flight; retry at the next open
            del self._pins[key]
            for p in pin.paths:
                forget(p)
            self._pinned_bytes -= pin.obj.size
            self.session.release(pin.obj)

    def close(self) -> None:
        for pin in self._pins.values():
            self.session.release(pin.obj)
        self._pins.clear()
        self._pinned_bytes = 0
