"""``--prefetch FILE``: fetch what an access list names, in parallel, while the command starts.

A background thread looks each path up in the *current* catalogs (so a list recorded against
an older revision still fetches what the job will open now), then hands the objects to the
shared cache service in batches: it fetches them with bounded concurrency and pushes each fd
to us as soon as the object is in RAM, so the job's opens are answered without a round trip.
With a private cache, a bounded thread pool loads them here. Prefetched objects are not pinned
by the job until it opens them (pushed ones stay within the client's idle budget). Errors are
counted and logged, never raised.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cvmfs_format.access_list import AccessEntry
from worker.node.cache_client import CacheClient
from worker.node.cache_protocol import PREFETCH_BATCH, ObjectSpec
from worker.node.service_source import object_spec
from worker.ram.ramcache import CacheFull
from worker.repo.repository import Repositories, RepositoryError

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("hep_exec.prefetch")


class Prefetch:
    """One prefetch run; ``start()``, then ``wait()`` or ``cancel()``; ``counts`` for --stats."""

    def __init__(
        self,
        entries: Sequence[AccessEntry],
        repos: Repositories,
        shared: CacheClient | None,
        concurrency: int = 16,
    ) -> None:
        self.entries = list(entries)
        self.repos = repos
        self.shared = shared
        self.concurrency = concurrency
        self.counts: Counter[str] = Counter()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hep-exec-prefetch", daemon=True)

    def start(self) -> Prefetch:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def cancel(self) -> None:
        self._cancel.set()

    def _run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor  # (this thread's: not on the start)

        t0 = time.monotonic()
        pool = None if self.shared is not None else ThreadPoolExecutor(self.concurrency)
        batch: list[ObjectSpec] = []
        try:
            for i, e in enumerate(self.entries):
                if self._cancel.is_set():
                    break
                if i % 8 == 7:
                    time.sleep(0)  # let go of the GIL: the tracer's upcalls must not wait
                spec = self._resolve(e)
                if spec is None:
                    continue
                if pool is not None:
                    pool.submit(self._load_private, spec)
                    continue
                batch.append(spec)
                # small first batch: the service starts fetching while we resolve the rest
                if len(batch) >= (16 if self.counts["queued"] == 0 else PREFETCH_BATCH):
                    pool = self._flush(batch)
                    batch = []
            if batch:
                if pool is None:
                    pool = self._flush(batch)
                else:
                    for spec in batch:
                        pool.submit(self._load_private, spec)
        finally:
            if pool is not None:
                pool.shutdown(wait=not self._cancel.is_set(), cancel_futures=self._cancel.is_set())
        log.info("prefetch done in %.3f s: %s", time.monotonic() - t0, dict(self.counts))

    def _flush(self, batch: list[ObjectSpec]) -> ThreadPoolExecutor | None:
        """Send a batch to the service; if it is gone, continue privately."""
        assert self.shared is not None
        if self.shared.prefetch(batch):
            self.counts["queued"] += len(batch)
            return None
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(self.concurrency)
        self.shared = None
        for spec in batch:
            pool.submit(self._load_private, spec)
        return pool

    def _resolve(self, e: AccessEntry) -> ObjectSpec | None:
        try:
            spec = object_spec(self.repos.get(e.fqrn), e.path)
        except (RepositoryError, OSError) as err:
            self.counts["failed"] += 1
            log.info("prefetch %s:%s: %s", e.fqrn, e.path, err)
            return None
        if spec is None:
            self.counts["gone"] += 1
        elif spec.key != e.key:
            self.counts["changed"] += 1
        return spec

    def _load_private(self, spec: ObjectSpec) -> None:
        if self._cancel.is_set():
            return
        repo = self.repos.get(spec.fqrn)
        cache = repo.cache
        if spec.key in cache:
            self.counts["cached"] += 1
            return
        if spec.size > cache.limit - cache.pinned_bytes:
            self.counts["skipped"] += 1
            return
        entry = repo.lookup(spec.path)
        if entry is None:
            return
        try:
            cache.release(repo.open_object(entry))
            self.counts["loaded"] += 1
        except (CacheFull, RepositoryError) as err:
            self.counts["failed"] += 1
            log.info("prefetch %s:%s: %s", spec.fqrn, spec.path, err)
