"""The node's shared RAM cache: one process per user and node, serving RAM files over a socket.

All hep-exec runs of one user on a node connect to it, so each object is fetched and held once
per node however many jobs ask (concurrent requests for one object share one fetch: the RAM
cache's single-flight). It listens on an AF_UNIX SOCK_SEQPACKET socket in a private runtime
directory (ours, mode 0700, checked, refused otherwise), checks every peer with SO_PEERCRED
(same uid only), and hands each object's read-only RAM file (worker.ram.ramfiles) to the client
with SCM_RIGHTS, plus its name in our read-only tmpfs directory (sent once per connection),
which the client's tracees open it by; the client then holds a real fd that stays valid
whatever happens to this process. Pins are counted per
connection and dropped when the connection closes, so a dead client never pins forever. The
service exits ``cache_idle`` seconds after its last client left.

Started on demand by the first client, as a fork of that hep-exec (:func:`fork_service`: no
interpreter start, so the job waits milliseconds, not the second a fresh Python with aiohttp
takes), or by a fresh interpreter (``--background``) when the client already runs threads;
either way the socket is bound before the fork, so it listens before the starter returns, and
a lock file makes racing starters safe. Or explicitly with ``python -m worker.node.cache_service
[hep-exec options]`` (= ``hep-exec --cache-daemon``).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.config import ConfigError, ExecConfig, parse_exec_args
from worker.node.cache_protocol import (
    MAX_FDS,
    VERSION,
    ObjectSpec,
    ProtocolError,
    decode,
    encode,
    fetch_settings,
    recv_message,
)
from worker.node.rendezvous import (
    LOCK_NAME,
    LOG_NAME,
    SOCKET_NAME,
    CacheDirError,
    bind_service,
    daemonize,
    default_runtime_dir,
    ensure_private_dir,
    peer_credentials,
)
from worker.node.table_pool import TablePool
from worker.ram.ramcache import CachedObject, CacheFull, RamCache, raise_fd_limit
from worker.ram.ramfiles import RamFiles, RamFilesError, RamFileWriter, fill_sealed_memfd
from worker.repo.fetcher import Fetcher, FetchError, object_url
from worker.repo.repository import (
    NotOnServers,
    RepositoryError,
    fill_chunks,
    fill_whole,
    write_object,
)
from worker.repo.repository_files import RepositoryFiles
from worker.trace.node_answers import AnswerTables, FrameError, valid_table_name

log = logging.getLogger("hep_exec.cache_service")

MAX_VOUCHED = 1024  # ensembles vouched for (one per repository revision and key set)
HELLO_VOUCHED = 64  # the newest of them, told to each job as it connects
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class _Fetch:
    """A prefetch whose bytes are on their way (or here)."""

    spec: ObjectSpec
    push: _Conn | None
    future: Future[Any]


class _Conn:
    """One client connection and the pins it holds; ``lock`` guards pins and sending."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.held: Counter[str] = Counter()
        self.objects: dict[str, CachedObject] = {}
        self.lock = threading.Lock()
        self.closed = False
        self.outbox: list[CachedObject] = []  # pushed objects waiting to be sent (pinned)
        self.send_lock = threading.Lock()  # whoever holds it drains the outbox


class CacheService:
    """RamCache + Fetcher behind a listening socket; ``serve_forever()`` until idle or stopped."""

    def __init__(self, config: ExecConfig, listener: socket.socket, directory: Path) -> None:
        self.config = config
        self.settings = fetch_settings(config)  # jobs with other settings use another service
        self.directory = directory
        self.listener = listener
        st = os.stat(directory / SOCKET_NAME)
        self._socket_id = (st.st_dev, st.st_ino)
        self.fetcher = Fetcher.from_config(
            config, max_connections=max(32, config.prefetch_concurrency * 2)
        ).start()
        raise_fd_limit()
        self.cache = RamCache(config.ram_bytes, files=RamFiles(config.ram_files, by_key=True))
        self.meta = RepositoryFiles(self.fetcher)
        self.answers = AnswerTables()
        # the next job's in-process answers table, made ahead while we are idle
        self.tables = TablePool(self._table_dir, self._expected_answer_bytes)
        # repository ensembles (manifest, whitelist, keys) a job verified: the next jobs
        # recheck only their expiry (worker.repo.repository, MountedRepository._verify)
        self._vouched: OrderedDict[str, None] = OrderedDict()
        # the sealed memfd of each answer table as last handed out (the table's bytes, fd)
        self._answer_fds: dict[tuple[str, str], tuple[bytes, int]] = {}
        self._answer_fds_lock = threading.Lock()
        self._vouch_lock = threading.Lock()
        self.idle = config.cache_idle
        self._pool = ThreadPoolExecutor(config.prefetch_concurrency, "cache-prefetch")
        # misses of ``open`` wait for their fetch here, not on the connection's reader
        self._open_pool = ThreadPoolExecutor(32, "cache-open")
        # prefetch: a feeder starts fetches on the fetcher's event loop (at most
        # prefetch_concurrency in flight), a finisher turns their bytes into RAM files and pushes
        # them; no thread per fetch. Cache hits and chunked files go through ``_pool``.
        self._slots = threading.Semaphore(config.prefetch_concurrency)
        # prefetches on their way until their RAM file is made: an open waits for their bytes
        # (the download client collapses requests only while both are in flight)
        self._fetching: dict[str, Future[Any]] = {}
        self._feed: queue.SimpleQueue[tuple[ObjectSpec, _Conn | None] | None] = queue.SimpleQueue()
        self._fetched: queue.SimpleQueue[_Fetch | None] = queue.SimpleQueue()
        for target, name in ((self._feeder, "cache-feeder"), (self._finisher, "cache-finisher")):
            threading.Thread(target=target, name=name, daemon=True).start()
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._idle_since = time.monotonic()
        self._stop = threading.Event()
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        # a service is started by a job that is about to ask it for a repository: its
        # download client (asyncio, ~25 ms to import and start) and its tmpfs get ready
        # meanwhile, not on that first request
        threading.Thread(target=self._warm, name="cache-warm", daemon=True).start()
        self.listener.settimeout(0.2)
        log.info("cache service pid %d serving %s", os.getpid(), self.directory / SOCKET_NAME)
        try:
            while not self._stop.is_set():
                try:
                    sock, _ = self.listener.accept()
                except TimeoutError:
                    if self._idle_expired():
                        log.info("no client for %.0f s: exiting", self.idle)
                        break
                    continue
                except InterruptedError:
                    continue
                self._admit(sock)
        finally:
            self._shutdown()

    def _warm(self) -> None:
        try:
            self.fetcher.warm()
            _ = self.cache.files.backing
        except (RamFilesError, OSError) as e:  # said again by the first request that needs it
            log.debug("getting ready: %s", e)

    def _table_dir(self) -> str | None:
        try:
            return self.cache.files.writable_path
        except RamFilesError:
            return None

    def _expected_answer_bytes(self) -> int:
        """What a job will likely put: the node's answers for its biggest repository."""
        return max(self.answers.sizes().values(), default=0)

    def _idle_expired(self) -> bool:
        with self._lock:
            return not self._conns and time.monotonic() - self._idle_since >= self.idle

    def _shutdown(self) -> None:
        """Stop listening (removing our socket, not a successor's) under the start lock."""
        lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            path = self.directory / SOCKET_NAME
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self._socket_id:
                    os.unlink(path)
            self.listener.close()
        finally:
            os.close(lock_fd)
        self._feed.put(None)
        self._fetched.put(None)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._open_pool.shutdown(wait=False, cancel_futures=True)
        self.fetcher.close()
        self.cache.close()  # clients keep their own fds
        self.tables.close()
        self.meta.close()

    def _admit(self, sock: socket.socket) -> None:
        pid, uid, _gid = peer_credentials(sock)
        if uid != os.getuid():
            self.counters["refused"] += 1
            log.warning("refused connection from pid %d: uid %d is not %d", pid, uid, os.getuid())
            sock.close()
            return
        sock.setblocking(True)
        conn = _Conn(sock, pid)
        with self._lock:
            self._conns.add(conn)
            self.counters["connections"] += 1
        threading.Thread(
            target=self._serve, args=(conn,), name=f"client-{pid}", daemon=True
        ).start()

    # ------------------------------------------------------------------ one client

    def _serve(self, conn: _Conn) -> None:
        try:
            while True:
                data, fds = recv_message(conn.sock, 1)
                try:
                    if not data:
                        break
                    self._handle(conn, decode(data), fds)
                finally:
                    for fd in fds:
                        os.close(fd)
        except (OSError, ProtocolError) as e:
            log.debug("client pid %d: %s", conn.pid, e)
        finally:
            with conn.lock:
                conn.closed = True
                for obj in conn.outbox:
                    self.cache.release(obj)
                conn.outbox.clear()
                for key, n in conn.held.items():
                    for _ in range(n):
                        self.cache.release(conn.objects[key])
                conn.held.clear()
                conn.objects.clear()
            conn.sock.close()
            with self._lock:
                self._conns.discard(conn)
                idle = not self._conns
                if idle:
                    self._idle_since = time.monotonic()
            if idle:  # the next job's table, while no job runs (one would lose a CPU to it)
                self.tables.refill()

    def _handle(self, conn: _Conn, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        op = msg.get("op")
        if op == "open":
            spec = ObjectSpec.from_wire(msg.get("object"))
            self.counters["opens"] += 1
            # here, on the connection's own thread, hit or miss: a job asks for one object at
            # a time (its tracer answers one call at a time), so a pool thread bought no
            # parallelism, only one more wake-up per miss (a cold import of 2,000 modules
            # through the service, paired: 1,528 -> 1,489 ms)
            self._open(conn, spec)
        elif op == "release":
            keys = msg.get("keys")
            if not isinstance(keys, list):
                raise ProtocolError("release: keys must be a list")
            with conn.lock:
                for key in map(str, keys):
                    if conn.held[key] > 0:
                        conn.held[key] -= 1
                        self.cache.release(conn.objects[key])
                        if not conn.held[key]:
                            del conn.held[key], conn.objects[key]
        elif op == "prefetch":
            items = msg.get("objects")
            if not isinstance(items, list):
                raise ProtocolError("prefetch: objects must be a list")
            specs = [ObjectSpec.from_wire(i) for i in items]
            target = conn if msg.get("push") else None
            for spec in specs:
                self._feed.put((spec, target))
            self.counters["prefetch_queued"] += len(specs)
        elif op in ("meta", "catalog"):
            fqrn, path = msg.get("fqrn"), msg.get("path")
            if not isinstance(fqrn, str) or not isinstance(path, str):
                raise ProtocolError(f"{op}: fqrn and path must be strings")
            self.counters[op] += 1
            self._open_pool.submit(self._meta, conn, fqrn, path, op)
        elif op == "answers":
            fqrn, root = msg.get("fqrn"), msg.get("root")
            if not valid_table_name(fqrn, root):
                raise ProtocolError("answers: fqrn and root must name a revision")
            self.counters["answers_given"] += 1
            self._answers(conn, str(fqrn), str(root))
        elif op == "answers_add":
            fqrn, root, size = msg.get("fqrn"), msg.get("root"), msg.get("size")
            if not valid_table_name(fqrn, root) or len(fds) != 1 or not isinstance(size, int):
                raise ProtocolError("answers_add: a revision, a size and one fd expected")
            if 0 < size <= self.answers.max_table:
                data = os.pread(fds[0], size + 1, 0)
                try:
                    if len(data) != size:
                        raise FrameError(f"{len(data)} bytes, not {size}")
                    if self.answers.add(str(fqrn), str(root), data):
                        self._open_pool.submit(self._prepare_answers, str(fqrn), str(root))
                    self.counters["answers_taken"] += 1
                except FrameError as e:
                    log.debug("client pid %d: answers ahead: %s", conn.pid, e)
        elif op in ("vouch", "vouched"):
            digest = msg.get("digest")
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                raise ProtocolError(f"{op}: a sha256 digest expected")
            with self._vouch_lock:
                if op == "vouch":
                    self._vouched[digest] = None
                    while len(self._vouched) > MAX_VOUCHED:
                        self._vouched.popitem(last=False)
                    return
                known = digest in self._vouched
            self.counters["vouched_asked"] += 1
            self._send(conn, {"op": "vouched", "ok": True, "digest": digest, "known": known})
        elif op == "stats":
            self._send(conn, {"op": "stats", "ok": True, **self.stats()})
        elif op == "dispose":
            if len(fds) != 1:
                raise ProtocolError("dispose: one fd expected")
            self.counters["disposed"] += 1
            self._open_pool.submit(os.close, os.dup(fds[0]))  # (_serve closes the one it got)
        elif op == "hello":
            # the read-only tmpfs dir (if ours are tmpfs files): clients then open objects by
            # name, which the tracer does faster than reopening an fd number through /proc
            shared = self.cache.files.shared_dir
            table = self.tables.take()
            with self._vouch_lock:
                vouched = list(self._vouched)[-HELLO_VOUCHED:]
            hello = {
                "op": "hello",
                "ok": True,
                "pid": os.getpid(),
                "version": VERSION,
                "settings": self.settings,
                "answer_bytes": self.answers.sizes(),
                "named": shared is not None,
                "table": table is not None,
                "dispose": True,
                "vouched": vouched,  # (a job mounting one of these asks nothing more)
            }
            fds = [fd for fd in (shared, table) if fd is not None]
            try:
                with conn.lock:
                    if not conn.closed:
                        conn.sock.sendmsg(
                            [encode(hello)],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                            if fds
                            else [],
                        )
            finally:
                if table is not None:
                    os.close(table)
        else:
            raise ProtocolError(f"unknown op {op!r}")

    def _send(self, conn: _Conn, msg: dict[str, Any]) -> None:
        with conn.lock:
            if not conn.closed:
                conn.sock.send(encode(msg))

    def _hand_over(self, conn: _Conn, obj: CachedObject, op: str, fetched: bool = False) -> bool:
        """Send one pinned object's fd; the pin becomes the connection's (False: not sent)."""
        reply = {"op": op, "ok": True, "key": obj.key, "size": obj.size, "name": obj.name}
        if fetched:
            reply["fetched"] = True
        with conn.lock:
            if not conn.closed:
                try:
                    conn.sock.sendmsg(
                        [encode(reply)],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [obj.fd]))],
                    )
                except OSError as e:
                    log.debug("client pid %d: %s", conn.pid, e)
                else:
                    conn.held[obj.key] += 1
                    conn.objects[obj.key] = obj
                    return True
        self.cache.release(obj)
        return False

    def _meta(self, conn: _Conn, fqrn: str, path: str, op: str = "meta") -> None:
        """A repository's manifest, whitelist or certificate (``meta``: as stored) or catalog
        (``catalog``: inflated) for a job that mounts it: fetched by our warm HTTP client (the
        job then needs none of its own), catalogs and certificates kept (they are named by
        their content), the manifest always fresh."""
        try:
            if op == "catalog":
                fd, size = self.meta.catalog(fqrn, path)
            else:
                data = self.meta.get(fqrn, path)
                size = len(data)
                fd = fill_sealed_memfd(f"{fqrn}/{path}", size, lambda out: out.write_at(0, data))
        except OSError as e:  # RepositoryError too: the job then fetches it itself
            why = str(e) if isinstance(e, RepositoryError) else f"{fqrn}/{path}: {e.strerror}"
            with contextlib.suppress(OSError):
                self._send(
                    conn,
                    {"op": op, "ok": False, "fqrn": fqrn, "path": path, "errno": e.errno,
                     "error": why},
                )  # fmt: skip
            return
        try:
            reply = {"op": op, "ok": True, "fqrn": fqrn, "path": path, "size": size}
            with conn.lock:
                if not conn.closed:
                    conn.sock.sendmsg(
                        [encode(reply)],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                    )
        except OSError as e:
            log.debug("client pid %d: %s", conn.pid, e)
        finally:
            os.close(fd)

    def _answer_memfd(self, fqrn: str, root: str, dup: bool = True) -> tuple[bytes, int | None]:
        """A revision's table and (``dup``: a dup of) its sealed memfd, made if the table
        changed since the last one; (b"", None) for no table."""
        data = self.answers.get(fqrn, root)
        if not data:
            return data, None
        with self._answer_fds_lock:
            kept = self._answer_fds.get((fqrn, root))
            if kept is None or kept[0] is not data:
                if kept is not None:
                    os.close(kept[1])
                made = fill_sealed_memfd(
                    f"answers {fqrn}", len(data), lambda out: out.write_at(0, data)
                )
                kept = self._answer_fds[(fqrn, root)] = (data, made)
                for key, (joined, old) in list(self._answer_fds.items()):
                    if self.answers.given(*key) is not joined:  # changed or gone
                        os.close(old)
                        del self._answer_fds[key]
            # ours to close once sent, whatever happens to the table's
            return data, os.dup(kept[1]) if dup else None

    def _prepare_answers(self, fqrn: str, root: str) -> None:
        """Make a changed table's memfd now, off the path of the next job that mounts the
        revision (joining and writing a 10 MB table takes ~15 ms)."""
        try:
            self._answer_memfd(fqrn, root, dup=False)
        except OSError as e:
            log.debug("answers ahead for %s: %s", fqrn, e)

    def _answers(self, conn: _Conn, fqrn: str, root: str) -> None:
        """A revision's answers ahead for a job that has just mounted it
        (worker.trace.node_answers): one sealed memfd per table as it stands, handed to every job
        (each maps it: no copy)."""
        data, fd = self._answer_memfd(fqrn, root)
        reply = {"op": "answers", "ok": True, "fqrn": fqrn, "root": root, "size": len(data)}
        if fd is None:
            self._send(conn, reply)
            return
        try:
            with conn.lock:
                if not conn.closed:
                    conn.sock.sendmsg(
                        [encode(reply)],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                    )
        finally:
            os.close(fd)

    def _open(self, conn: _Conn, spec: ObjectSpec) -> None:
        if conn.closed:
            return
        fetched = spec.key not in self.cache  # (or on its way): the job may read ahead
        try:
            obj = self._acquire(spec)
        except (CacheFull, RepositoryError) as e:
            err = e.errno if isinstance(e.errno, int) else errno.EIO
            with contextlib.suppress(OSError):
                self._send(
                    conn,
                    {
                        "op": "open",
                        "ok": False,
                        "key": spec.key,
                        "errno": err,
                        "error": str(e),
                        "missing": isinstance(e, NotOnServers),
                    },
                )
            return
        self._hand_over(conn, obj, "open", fetched)

    def _acquire(self, spec: ObjectSpec) -> CachedObject:
        if spec.chunks:
            return self.cache.acquire_filled(
                spec.key,
                spec.size,
                lambda out: fill_chunks(
                    self.fetcher, spec.fqrn, spec.path, spec.chunks, spec.compressed, spec.size, out
                ),
            )
        assert spec.hash is not None
        content = spec.hash

        def fill(out: RamFileWriter) -> None:
            stored = self._prefetched_bytes(spec.key)  # a prefetch's, not fetched again
            if stored is not None:
                write_object(stored, spec.compressed, spec.size, f"{spec.fqrn}:{spec.path}", out)
                return
            fill_whole(self.fetcher, spec.fqrn, spec.path, content, spec.compressed, spec.size, out)

        return self.cache.acquire_filled(spec.key, spec.size, fill)

    def _prefetched_bytes(self, key: str) -> bytes | None:
        """The verified bytes of a prefetch of ``key`` on its way (waited for); None: fetch."""
        fetching = self._fetching.get(key)
        try:
            (stored,) = fetching.result() if fetching is not None else (None,)
        except CancelledError:  # the service stops
            return None
        return stored if isinstance(stored, bytes) else None

    def _prefetch_wanted(self, spec: ObjectSpec, push: _Conn | None) -> bool:
        """Worth loading: not held already, and room beside what clients hold; for a job that
        has ended, loaded for the node (its next job likely opens the same files)."""
        if self._stop.is_set():
            return False
        if push is None or push.closed:
            if spec.key in self.cache:
                return False
        elif spec.key in push.objects:
            return False
        if spec.key not in self.cache and spec.size > self.cache.limit - self.cache.pinned_bytes:
            self.counters["prefetch_skipped"] += 1
            return False
        return True

    def _feeder(self) -> None:
        """Start each prefetch's fetch on the event loop, prefetch_concurrency at a time."""
        while (item := self._feed.get()) is not None:
            spec, push = item
            if not self._prefetch_wanted(spec, push):
                continue
            if spec.chunks or spec.hash is None:
                self._pool.submit(self._prefetch_one, spec, push)
                continue
            on_its_way = self._fetching.get(spec.key)
            if on_its_way is not None:  # another job asked for it too: the same bytes for both
                on_its_way.add_done_callback(
                    lambda f, s=spec, c=push: self._fetched.put(_Fetch(s, c, f))  # type: ignore[misc]
                )
                continue
            # on its way before it is known not to be loading: an open from now on waits for
            # its bytes (_prefetched_bytes); one that began before is seen loading here
            fetch: Future[Any] = Future()
            self._fetching[spec.key] = fetch
            if self.cache.held_or_loading(spec.key):
                del self._fetching[spec.key]
                fetch.cancel()
                self._pool.submit(self._prefetch_one, spec, push)
                continue
            self._slots.acquire()
            url = object_url(spec.fqrn, spec.hash.object_path())
            wanted = (url, spec.hash, f"{spec.fqrn}:{spec.path}", spec.size)
            self.fetcher.prefetch([wanted], into=fetch).add_done_callback(
                lambda f, s=spec, c=push: self._fetch_done(_Fetch(s, c, f))  # type: ignore[misc]
            )

    def _fetch_done(self, fetch: _Fetch) -> None:
        """On the event loop: free the slot, leave the rest to the finisher."""
        self._slots.release()
        self._fetched.put(fetch)

    def _finisher(self) -> None:
        """Decompress fetched objects into RAM files (single-flight with opens) and push them."""
        while (fetch := self._fetched.get()) is not None:
            spec = fetch.spec
            try:
                obj = self._finish(fetch)
            except (CacheFull, RepositoryError, FetchError) as e:
                self.counters["prefetch_failed"] += 1
                log.info("prefetch %s:%s: %s", spec.fqrn, spec.path, e)
                continue
            except Exception as e:  # never let the finisher die
                self.counters["prefetch_failed"] += 1
                log.warning("prefetch %s:%s: %s: %s", spec.fqrn, spec.path, type(e).__name__, e)
                continue
            self._prefetched(obj, fetch.push)

    def _finish(self, fetch: _Fetch) -> CachedObject:
        spec = fetch.spec
        try:
            (stored,) = fetch.future.result()
            if isinstance(stored, BaseException):
                raise stored
            what = f"{spec.fqrn}:{spec.path}"
            return self.cache.acquire_filled(
                spec.key,
                spec.size,
                lambda out: write_object(stored, spec.compressed, spec.size, what, out),
            )
        finally:
            if self._fetching.get(spec.key) is fetch.future:
                del self._fetching[spec.key]

    def _prefetch_one(self, spec: ObjectSpec, push: _Conn | None) -> None:
        """Load (or find) one object in a pool thread: cache hits and chunked files."""
        if not self._prefetch_wanted(spec, push):
            return
        try:
            obj = self._acquire(spec)
        except (CacheFull, RepositoryError) as e:
            self.counters["prefetch_failed"] += 1
            log.info("prefetch %s:%s: %s", spec.fqrn, spec.path, e)
            return
        self._prefetched(obj, push)

    def _prefetched(self, obj: CachedObject, push: _Conn | None) -> None:
        self.counters["prefetched"] += 1
        if push is None:
            self.cache.release(obj)
        else:
            self._push(push, obj)

    def _push(self, conn: _Conn, obj: CachedObject) -> None:
        """Queue a pinned object for the client; whoever gets ``send_lock`` sends the queue.

        Objects that become ready while a message is being sent go out together in the next
        one (up to MAX_FDS fds per message), so a burst of pushes costs a few messages.
        """
        with conn.lock:
            if conn.closed or obj.key in conn.objects:
                self.cache.release(obj)
                return
            conn.outbox.append(obj)
        while True:
            if not conn.send_lock.acquire(blocking=False):
                return  # the holder re-checks the outbox after it lets go
            try:
                with conn.lock:
                    batch, conn.outbox = conn.outbox[:MAX_FDS], conn.outbox[MAX_FDS:]
                if batch:
                    self._send_batch(conn, batch)
            finally:
                conn.send_lock.release()
            with conn.lock:
                if not conn.outbox:
                    return

    def _send_batch(self, conn: _Conn, batch: list[CachedObject]) -> None:
        objects = [[o.key, o.size, o.name] for o in batch]
        msg = encode({"op": "ready", "ok": True, "objects": objects})
        fds = array.array("i", [o.fd for o in batch])
        try:
            conn.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            sent = True
        except OSError as e:
            log.debug("client pid %d: %s", conn.pid, e)
            sent = False
        with conn.lock:
            for obj in batch:
                if sent and not conn.closed and obj.key not in conn.objects:
                    conn.held[obj.key] += 1
                    conn.objects[obj.key] = obj
                elif sent and not conn.closed:  # an open reply crossed: the client returns it
                    conn.held[obj.key] += 1
                else:
                    self.cache.release(obj)
        if sent:
            self.counters["pushed"] += len(batch)

    def stats(self) -> dict[str, Any]:
        c, f = self.cache.stats, self.fetcher.stats
        with self._lock:
            clients = len(self._conns)
        return {
            "pid": os.getpid(),
            "clients": clients,
            "objects": len(self.cache),
            "used_bytes": self.cache.used_bytes,
            "pinned_bytes": self.cache.pinned_bytes,
            "limit": self.cache.limit,
            "hits": c.hits,
            "misses": c.misses,
            "waits": c.waits,
            "evictions": c.evictions,
            "requests": f.requests,
            "bytes_fetched": f.bytes_fetched,
            "collapsed": f.collapsed,
            "tables_made": self.tables.made,
            "tables_given": self.tables.given,
            **dict(self.counters),
        }


# ---------------------------------------------------------------------- command line


def _run(config: ExecConfig, listener: socket.socket, lock_fd: int, directory: Path) -> None:
    """Serve until idle or signalled; the start lock is dropped once the service is built."""
    try:
        service = CacheService(config, listener, directory)
    finally:
        os.close(lock_fd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: service.stop())
    service.serve_forever()


def fork_service(config: ExecConfig, directory: Path) -> None:
    """Start the service as a fork of this (single-threaded) process: no interpreter start.

    Binding happens here, before the fork, so the socket accepts connections (they wait in
    its backlog) by the time this returns, a few milliseconds later. The service is
    double-forked into its own session, its standard streams go to ``cache.log``, and every
    other inherited descriptor is closed (a job's pipes must not stay open behind it).
    """
    if threading.active_count() != 1:
        raise RuntimeError("fork_service needs a single-threaded process")
    bound = bind_service(directory)
    if bound is None:
        return  # a racing starter won
    listener, lock_fd = bound
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked service
        code = 1
        try:
            daemonize(directory / LOG_NAME)
            keep = {listener.fileno(), lock_fd}
            low = 3
            for fd in sorted(keep):
                os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, 1 << 16)
            with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
                f.write("hep-exec-cache")
            with contextlib.suppress(Exception):  # ps: not the command line of the job
                from worker.trace import _trap

                _trap.set_cmdline(f"hep-exec-cache {directory}".encode())
            logging.basicConfig(
                level=config.log_level_number,
                format=f"%(asctime)s hep-exec cache[{os.getpid()}] %(levelname)s %(message)s",
                force=True,
            )
            _run(config, listener, lock_fd, directory)
            code = 0
        except BaseException:
            log.exception("cache service failed")
        finally:
            os._exit(code)
    listener.close()
    os.close(lock_fd)
    os.waitpid(pid, 0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m worker.node.cache_service [--background] [hep-exec options]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    background = "--background" in args
    args = [a for a in args if a != "--background"]
    try:
        config = parse_exec_args([*args, "--cache-daemon"])
        directory = ensure_private_dir(config.cache_dir or default_runtime_dir())
    except (ConfigError, CacheDirError) as e:
        print(f"hep-exec cache service: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level_number,
        format=f"%(asctime)s hep-exec cache[{os.getpid()}] %(levelname)s %(message)s",
    )
    bound = bind_service(directory)
    if bound is None:
        print(f"hep-exec cache service: already running at {directory / SOCKET_NAME}")
        return 0
    listener, lock_fd = bound
    if background:
        daemonize(directory / LOG_NAME)
    _run(config, listener, lock_fd, directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
