"""The data side of one hep-exec run, built from an ExecConfig: what the tracer's policy calls.

Joins fetcher, RAM cache, repositories and name space, and turns their exceptions into the
errno a tracee must see (with one log line naming the path). Also produces the ``--check`` and
``--stats`` reports.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from cvmfs_format.access_list import AccessListError, AccessRecorder, read_access_list
from worker.config import ConfigError, ExecConfig
from worker.node.cache_client import CacheClient, SharedObject
from worker.node.prefetch import Prefetch
from worker.node.readahead import DirReadahead, Limits
from worker.node.service_source import ServiceFirst, open_shared
from worker.ram.ramcache import CachedObject, CacheFull, RamCache, raise_fd_limit
from worker.ram.ramfiles import RamFiles, RamFilesError, named_path
from worker.repo.fetcher import Fetcher, object_url
from worker.repo.keys import MasterKeys, load_master_keys
from worker.repo.namespace import Namespace, Node
from worker.repo.repository import MountedRepository, Repositories, RepositoryError
from worker.trace.node_answers import NodeAnswers

log = logging.getLogger("hep_exec.session")


class CheckLine(NamedTuple):
    ok: bool
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.what}: {self.detail}"


REPOSITORY_LIST = "/cvmfs/info/v1/repositories.json"  # hep-proxy and Stratum-1s serve it


class WorkerSession:
    """Fetcher thread + RAM cache + repositories + name space; ``close()`` when done."""

    def __init__(self, config: ExecConfig) -> None:
        self.config = config
        self.master_keys = load_master_keys(config.keys)
        try:
            prefetch_list = read_access_list(config.prefetch_path) if config.prefetch_path else []
        except AccessListError as e:
            raise ConfigError(str(e)) from None
        self.prefetch: Prefetch | None = None
        try:
            files = RamFiles(config.ram_files)
        except RamFilesError as e:
            raise ConfigError(str(e)) from None
        # before any thread of ours exists: a service we start is then a cheap fork of us
        self.shared = CacheClient.connect(config) if config.shared_cache else None
        self.fetcher = Fetcher.from_config(config).start()
        raise_fd_limit()
        self.cache = RamCache(config.ram_bytes, files=files)
        # with a node service, a repository's own files come through it (no HTTP client here)
        self.service_first = ServiceFirst(self.shared, self.fetcher) if self.shared else None
        source = self.service_first or self.fetcher
        self.repos = Repositories(
            source,
            self.master_keys,
            self.cache,
            config.repositories,
            _site_keys(config),
            voucher=self.shared,
        )
        self.namespace = Namespace(self.repos, os.fsencode(config.mount))
        self.syscalls: Counter[str] = Counter()  # the tracer counts trapped calls here
        self.mounted_ahead: set[str] = set()  # named by the command: mounted as it started
        self._mounting_ahead: frozenset[str] = frozenset()
        # node-level pieces: access list recording and prefetch (into the shared service and
        # pushed to us, or into our private cache)
        self.recorder = AccessRecorder() if config.record_path else None
        # answers ahead shared with the node's other jobs; not while recording an access
        # list, which must see every first open
        self.node_answers: NodeAnswers | None = None
        if self.shared is not None and self.recorder is None:
            names = self.shared.names_dir
            self.node_answers = NodeAnswers(
                os.fsencode(config.mount),
                named_path(names, "").encode() if names is not None else b"",
                self.shared.answers,
                self.shared.add_answers,
                names if names is not None else -1,
                self.shared.answers_ahead,
            )
            self.node_answers.eager_bytes = config.eager_answers
            self.node_answers.expected = self.shared.answer_bytes
            self.repos.on_mount = self._mounted
            self.repos.on_mounting = self.node_answers.mounting_soon
            self.repos.on_root = self.node_answers.ahead
            self.node_answers.settle = self._settle
        # a cold file's siblings fetched with it, by the service
        self.readahead: DirReadahead | None = None
        if config.dir_readahead and self.shared is not None:
            limits = Limits(files=config.dir_readahead)
            ra = self.readahead = DirReadahead(self.repos, self.shared.prefetch, limits)
            self.shared.on_fetched = lambda spec: ra.fetched(spec.fqrn, spec.path)
        if prefetch_list:
            self.prefetch = Prefetch(
                prefetch_list, self.repos, self.shared, config.prefetch_concurrency
            ).start()

    def dispose(self, fd: int) -> bool:
        """Hand the node's service the last reference to ``fd`` (the shadow tree's tmpfs, whose
        teardown then happens there, not in our exit); False: ours to close."""
        return self.shared is not None and self.shared.dispose(fd)

    def object_dirs(self) -> list[bytes]:
        """The directory of this job's own RAM files as open answers name it, for the run's
        tracees to open them with openat on an fd of their own (1.3 µs less per open than the
        walk through /proc).  Without a node service every object is one of these: the tmpfs
        is then mounted now, before the command, which is the process that opens them most."""
        files = self.cache.files
        if self.shared is not None or files.backing != "tmpfs" or files.shared_dir is None:
            return []
        return [os.fsencode(named_path(files.shared_dir, "")).rstrip(b"/")]

    def take_table(self) -> int:
        """The in-process table's file the node's service made ahead, for the run (-1: none;
        the run closes it)."""
        return self.shared.take_table() if self.shared is not None else -1

    def ask_ahead(self, names: Sequence[str]) -> None:
        """Ask the node's service now for the first files a mount of ``names`` reads (each
        manifest, fetched fresh from the server, and whitelist), so that :meth:`mount_ahead`
        finds the replies waiting: their round trips overlap the rest of the start.  On
        loopback this gained nothing measurable (the command's first call comes after the
        mount anyway); the round trip it hides grows with the proxy's distance.  Asked after
        the job started, so a revision published before it is still the one it mounts."""
        if self.service_first is None:
            return
        for name in names:
            self.service_first.ahead(object_url(name, ".cvmfspublished"))
            if self.repos.checks_signatures(name):
                self.service_first.ahead(object_url(name, ".cvmfswhitelist"))

    def mount_ahead(self, names: Sequence[str]) -> None:
        """Mount the repositories the job names (worker.repo.named) while its command starts
        (on a thread of its own, which may outlast the run); a failure is remembered and said
        by the call that needs the repository, as before."""
        self._mounting_ahead = frozenset(names)
        try:
            for name in names:
                if name in self.repos.mounted():
                    continue
                try:
                    self.repos.get(name)
                # said by the call that needs it; or the job is over, its fetches cancelled
                # (asyncio's CancelledError is no Exception)
                except BaseException as e:
                    log.debug("/cvmfs/%s: not mounted ahead: %s", name, e)
                else:
                    self.mounted_ahead.add(name)  # (or by the command's first call, racing us)
                    if self.node_answers is not None:
                        self.node_answers.put_ahead()  # (the mount is over: nobody waits for it)
        finally:
            self._mounting_ahead = frozenset()

    def _settle(self, path: bytes) -> None:
        """Before a call on ``path`` is answered: its repository's mount ahead, if one is
        under way, ends first, so that its node answers are put before the call's own."""
        head = self.namespace.mount + b"/"
        if self._mounting_ahead and path.startswith(head):
            name = path[len(head) :].split(b"/", 1)[0].decode(errors="replace")
            if name in self._mounting_ahead:
                self.repos.settled(name)

    def _mounted(self, repo: MountedRepository) -> None:
        if self.node_answers is not None:
            self.node_answers.mounted(repo.fqrn, repo.manifest.root_catalog.hex)

    def open_file(self, node: Node) -> CachedObject | int:
        """Pin a file's object for an open(); errno (ENOMEM, EIO …) with one log line otherwise."""
        if node.kind != "file" or node.entry is None or node.repo is None:
            return errno.EINVAL
        try:
            repo = self.repos.get(node.repo)
            obj: CachedObject | None = None
            if self.shared is not None:
                obj = open_shared(self.shared, repo, node.entry)
            if obj is None:  # no service (or it died): private cache
                obj = repo.open_object(node.entry)
        except CacheFull:
            return errno.ENOMEM  # the cache logged the line
        except RepositoryError as e:
            if not e.reported:
                log.error("%s: %s", os.fsdecode(node.path), e)
            return e.errno or errno.EIO
        if self.recorder is not None:
            self.recorder.add(node.repo, node.entry.path, obj.key, obj.size)
        return obj

    def release(self, obj: CachedObject) -> None:
        if isinstance(obj, SharedObject) and self.shared is not None:
            self.shared.release(obj)
        else:
            self.cache.release(obj)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.cancel()
        if self.readahead is not None:
            self.readahead.close()
        if self.recorder is not None and self.config.record_path is not None:
            try:
                self.recorder.write(self.config.record_path)
            except OSError as e:
                log.error("%s: cannot write access list (%s)", self.config.record_path, e)
        if self.node_answers is not None:
            self.node_answers.send()
        if self.shared is not None:
            self.shared.close()
        self.fetcher.close()
        self.cache.close()

    def __enter__(self) -> WorkerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reports

    def check(self, now: dt.datetime | None = None) -> list[CheckLine]:
        """``--check``: proxies reachable, repositories mountable and fresh, RAM limit."""
        now = now or dt.datetime.now(dt.UTC)
        lines: list[CheckLine] = []
        names = list(self.config.repositories)
        probe_path = object_url(names[0], ".cvmfspublished") if names else REPOSITORY_LIST
        for url, ok, detail in self.fetcher.probe(probe_path):
            if not names and detail.startswith("HTTP ") and not ok:
                ok = True  # any HTTP answer means the server is up
                detail = (
                    f"answers ({detail} for its list of repositories; --repositories NAME "
                    "checks a repository)"
                )
            elif not names and ok:
                detail += " (its list of repositories)"
            lines.append(CheckLine(ok, f"server {url}", detail))
        for name in names:
            try:
                repo = self.repos.get(name)
            except RepositoryError as e:
                lines.append(CheckLine(False, f"repository {name}", str(e)))
                continue
            age = now - dt.datetime.fromtimestamp(repo.manifest.timestamp, dt.UTC)
            signed = "signature verified" if repo.verified else "no keys: signature not checked"
            lines.append(
                CheckLine(
                    True,
                    f"repository {name}",
                    f"revision {repo.revision}, published {_age(age)} ago, {signed}",
                )
            )
        if not names:
            lines.append(
                CheckLine(True, "repositories", "none configured: mounted on first access")
            )
        avail = _mem_available()
        ram_ok = avail is None or self.config.ram_bytes <= avail
        detail = f"{_size(self.config.ram_bytes)}"
        if avail is not None:
            detail += f" ({_size(avail)} available now)"
        lines.append(CheckLine(ram_ok, "RAM cache limit", detail))
        lines.append(CheckLine(True, "RAM files", self.cache.files.describe()))
        if self.shared is not None:
            lines.append(
                CheckLine(
                    True,
                    "shared cache",
                    f"service pid {self.shared.server_pid} at {self.shared.directory}, "
                    "fetching with these servers, proxies and timeouts",
                )
            )
        return lines

    def stats_lines(self, internals: bool = False) -> list[str]:
        """``--stats``: cache and fetch counters; ``internals``: the node answers' and the
        trapped calls' counters too."""
        c, f = self.cache.stats, self.fetcher.stats
        out = [
            f"cache: {c.hits} hits, {c.misses} misses, {c.waits} waits, "
            f"{_size(c.bytes_loaded)} loaded, {c.evictions} evictions "
            f"({_size(c.bytes_evicted)}), {c.full} cache-full, "
            f"{_size(self.cache.used_bytes)} of {_size(self.cache.limit)} used"
            + (f", in {self.cache.files.backing} files" if c.misses else ""),
            f"fetch: {f.requests} requests, {_size(f.bytes_fetched)} fetched, "
            f"{f.failures} failures, {f.corrupt} corrupt, {f.not_found} not found, "
            f"{f.collapsed} collapsed",
        ]
        if self.shared is not None:
            svc = self.shared.stats()
            out.append(
                f"shared cache: {self.shared.opens} objects received, "
                f"{self.service_first.from_service if self.service_first else 0} repository "
                "files handed over, "
                f"{self.shared.pushed} pushed by prefetch, {self.shared.local_hits} local hits, "
                f"{self.shared.fallbacks} private fallbacks, "
                f"{'tmpfs files opened by name' if self.shared.names_dir is not None else 'memfds'}"
                + (
                    f"; service pid {svc['pid']} at {self.shared.directory}: "
                    f"{svc['objects']} objects, "
                    f"{_size(svc['used_bytes'])} of {_size(svc['limit'])}, "
                    f"{svc['requests']} fetches, {svc['clients']} clients"
                    if svc
                    else "; service gone"
                )
            )
        if self.node_answers is not None and internals:
            na = self.node_answers
            out.append(
                f"answers ahead from the node: {na.put} put ({_size(na.received)}); "
                f"{na.kept} directories' answers to hand over"
            )
        if self.prefetch is not None:
            out.append(f"prefetch: {dict(self.prefetch.counts)}")
        if self.readahead is not None and self.readahead.directories:
            ra = self.readahead
            out.append(
                f"read ahead: {ra.asked} objects of {ra.directories} directories "
                "(a file there had to be fetched)"
            )
        for name, repo in sorted(self.repos.mounted().items()):
            out.append(
                f"repository {name}: revision {repo.revision}, "
                f"{repo.catalogs_loaded} catalogs loaded"
                + (
                    ", mounted as the command started (it names it)"
                    if name in self.mounted_ahead
                    else ""
                )
            )
        if self.syscalls and internals:
            calls = ", ".join(f"{k} {n}" for k, n in self.syscalls.most_common())
            out.append(f"trapped syscalls: {calls}")
        return out


def _site_keys(config: ExecConfig) -> Callable[[str], MasterKeys] | None:
    """Each repository's master keys from the site's configuration (a domain's keys
    directory), unless hep-exec's own ``--keys`` say which."""
    if config.cvmfs_config is None or (
        "keys" in config.sources and "keys" not in config.site_filled
    ):
        return None
    from worker.sites import keys_for

    loaded: dict[tuple[Path, ...], MasterKeys] = {}

    def keys(fqrn: str) -> MasterKeys:
        paths = keys_for(config, fqrn)
        if paths not in loaded:
            loaded[paths] = load_master_keys(paths)
        return loaded[paths]

    return keys


def _age(delta: dt.timedelta) -> str:
    s = int(delta.total_seconds())
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} days"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
