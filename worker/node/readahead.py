"""Reading a directory ahead on a cold node: once a file the job opened had to be fetched,
its small siblings are fetched too, in parallel, while the program works on the first.

A program that opens one file of a directory the node has never seen usually opens more of
them soon (a Python package's modules, a ``__pycache__``'s ``.pyc`` files). Fetched as they
are opened, each waits a whole round trip to the proxy, one after another; asked for
together, most are in RAM before they are opened. A cold import of a real Python stack
opens 1,731 objects in 220 directories, 59 % of the regular files of those directories.
Bounded per directory (files, each file's size, bytes) and done once per directory per job;
a file the node already holds starts nothing, so a warm node never reads ahead. The node's
cache service fetches them and pushes them to the job (as for ``--prefetch``). Not with a
private cache: loading them there costs the job's own process the time it saves (threads of
the tracer's process inflating beside it; a cold import 4.3-4.9 s either way).
"""

from __future__ import annotations

import itertools
import logging
import posixpath
import queue
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from cvmfs_format.catalog import DirEntry
from worker.node.cache_protocol import ObjectSpec
from worker.repo.repository import Repositories, RepositoryError

log = logging.getLogger("hep_exec.readahead")

# Bigger files are fetched when opened (streamed, in chunks): a directory of shared libraries
# must not cost their transfer because one of them was opened.
MAX_FILE_BYTES = 256 << 10
MAX_DIR_BYTES = 4 << 20


class Limits(NamedTuple):
    """How much one directory's read-ahead may ask for."""

    files: int = 64
    file_bytes: int = MAX_FILE_BYTES
    bytes: int = MAX_DIR_BYTES


def siblings_to_fetch(entries: Sequence[DirEntry], opened: str, limits: Limits) -> list[DirEntry]:
    """The files of a directory (``entries``, in name order) worth fetching with ``opened``, a
    path in it: plain regular files with a content hash, none bigger than
    ``limits.file_bytes``, at most ``limits.files`` of them and ``limits.bytes`` in all; those
    after ``opened`` first (a program reading a directory in order reads those next), then
    from the top."""
    at = next((i + 1 for i, e in enumerate(entries) if e.path == opened), 0)
    picked: list[DirEntry] = []
    total = 0
    for e in itertools.chain(entries[at:], entries[:at]):
        if len(picked) >= limits.files:
            break
        if (
            e.path == opened
            or not e.is_regular
            or e.is_chunked
            or e.is_external
            or e.hash is None
            or e.size > limits.file_bytes
        ):
            continue
        if total + e.size > limits.bytes:
            break
        picked.append(e)
        total += e.size
    return picked


class DirReadahead:
    """A job's read-ahead. ``fetched(fqrn, path)`` is called by the thread whose open had to
    fetch ``path`` (it only queues the directory, once); a thread of its own lists the
    directory in the catalog and hands the siblings to ``load`` (False: it cannot)."""

    def __init__(
        self,
        repos: Repositories,
        load: Callable[[Sequence[ObjectSpec]], bool],
        limits: Limits,
    ) -> None:
        self.repos = repos
        self.load = load
        self.limits = limits
        self.directories = 0  # read ahead
        self.asked = 0  # objects asked for
        self._seen: set[tuple[str, str]] = set()
        self._queue: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def fetched(self, fqrn: str, path: str) -> None:
        directory = (fqrn, posixpath.dirname(path))
        with self._lock:
            if directory in self._seen or self._closed:
                return
            self._seen.add(directory)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hep-exec-readahead")
                self._thread.daemon = True
                self._thread.start()
        self._queue.put((fqrn, path))

    def close(self) -> None:
        """No more reading ahead: what is queued is dropped, the directory being listed is the
        last (waited for briefly: the job's catalogs close after this)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(1.0)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None and not self._closed:
            fqrn, opened = item
            try:
                entries = self.repos.get(fqrn).listing(posixpath.dirname(opened))
            except (RepositoryError, OSError) as e:  # the program's own calls say it
                log.debug("read-ahead of %s:%s: %s", fqrn, posixpath.dirname(opened), e)
                continue
            picked = siblings_to_fetch(entries, opened, self.limits)
            specs = [ObjectSpec.of_entry(fqrn, e) for e in picked]
            if specs and not self._closed and self.load(specs):
                self.directories += 1
                self.asked += len(specs)
