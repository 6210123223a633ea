"""The node's service makes the next job's in-process answers table ahead, while it is idle.

Why: a warm job puts the node's answers into a table of its own as it mounts a repository
(worker/trace/node_answers.py), and on a VM whose idle memory goes back to the host each fresh
page of that table then costs a fault on the host too: the put of this project's benchmark
tree's 9 MiB of answers took 3.8 ms back to back and 24 ms after 3 s idle, all of it before
the job's first /cvmfs call could go on.  A table file made by the service (the same size,
never written: all zeros) has its pages already; the service hands one to a job in its hello
and makes the next one when no job runs (worker/trace/_fastopen.c, fo_make_table).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("hep_exec.cache_service")

MIN_BYTES = 256 << 10  # below this many bytes of the node's answers, a job makes its own
MAX_BYTES = 64 << 20  # what one table made ahead holds at most (the arena's part)
ANSWER_BYTES = 170  # an answer's bytes, packed: how many slots a table needs


class TablePool:
    """One table file ready for the next job; ``take`` it at hello, ``refill`` when no job
    runs (making it costs a CPU a few ms, and on this project's 2-vCPU test VM a job that
    shared its second CPU with it started slower), ``close`` at the end."""

    def __init__(self, directory: Callable[[], str | None], expected: Callable[[], int]) -> None:
        self._directory = directory  # where to make it (a huge-page tmpfs), or None: a memfd
        self._expected = expected  # bytes of answers the next job will likely put
        self._lock = threading.Lock()
        self._ready: int | None = None
        self._making = False
        self._closed = False
        self.made = 0
        self.given = 0

    def take(self) -> int | None:
        """The ready table's fd (the caller's to close), or None."""
        with self._lock:
            fd, self._ready = self._ready, None
            if fd is not None:
                self.given += 1
        return fd

    def refill(self) -> None:
        """Make a table in the background unless one is ready or being made."""
        with self._lock:
            if self._ready is not None or self._making or self._closed:
                return
            nbytes = self._expected()
            if nbytes < MIN_BYTES:
                return
            self._making = True
        threading.Thread(
            target=self._make, args=(min(nbytes, MAX_BYTES),), name="hep-exec-cache-table",
            daemon=True,
        ).start()  # fmt: skip

    def _make(self, nbytes: int) -> None:
        from worker.trace import _trap

        fd: int | None = None
        try:
            fd = _trap.make_table(self._directory(), nbytes // ANSWER_BYTES, nbytes)
        except OSError as e:
            log.debug("a table ahead for the next job: %s", e.strerror)
        finally:
            with self._lock:
                self._making = False
                if fd is not None and (self._ready is not None or self._closed):
                    os.close(fd)
                elif fd is not None:
                    self._ready = fd
                    self.made += 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fd, self._ready = self._ready, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
