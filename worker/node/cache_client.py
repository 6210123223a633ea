"""Client of the node's cache service, as WorkerSession uses it.

``CacheClient.connect`` finds (or starts) the service of this user; ``open`` returns a
:class:`SharedObject` whose fd is our own copy of the service's RAM file, so nothing the service
does later (eviction, a crash) can take it away. When the service is gone, ``open`` returns None
(after one log line) and the session falls back to its private RAM cache: never a failed job.
"""

from __future__ import annotations

import array
import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cvmfs_format.catalog import MAX_CATALOG_BYTES
from worker.config import ExecConfig
from worker.node.cache_protocol import (
    PREFETCH_BATCH,
    VERSION,
    ObjectSpec,
    ProtocolError,
    decode,
    encode,
    fetch_settings,
    recv_message,
)
from worker.node.rendezvous import (
    SOCKET_NAME,
    CacheDirError,
    default_runtime_dir,
    ensure_private_dir,
    peer_credentials,
)
from worker.ram.ramcache import CachedObject
from worker.ram.ramfiles import fill_sealed_memfd, named_path
from worker.repo.repository import NotOnServers, RepositoryError
from worker.trace.node_answers import MAX_TABLE_BYTES

log = logging.getLogger("hep_exec.cache_client")
_META_TIMEOUT = 60.0  # a catalog may be large and its fetch slow; the service bounds it too
_META_MAX = 1 << 30  # bytes of one repository file handed over as stored
_ANSWERS_TIMEOUT = 10.0  # a revision's answers ahead: a memfd the service has at hand
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
_START_TIMEOUT = 30.0
# A table of the node's answers or a catalog, mapped with its pages (MAP_POPULATE): the
# receiving thread maps the ~2,300 pages of a 9 MiB table in one call while the mount goes on,
# rather than the program's first call faulting them in one by one as it puts the table
# (_trap.put_table 3.3-3.4 -> 2.9 ms here).  Either is read whole, so no page is mapped in vain.
_MAP_FLAGS = mmap.MAP_SHARED | mmap.MAP_POPULATE


class _MetaWait:
    """A ``meta`` request's reply: the file's bytes (an answer table: mapped), or why not."""

    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes | mmap.mmap | None = None
        self.error: str | None = None


class SharedObject(CachedObject):
    """An object from the cache service: ``fd`` is ours, ``refs`` counts our own pins."""

    __slots__ = ()


class ServiceGone(Exception):
    """The connection to the service broke (it died, or exited while we connected)."""


class OtherSettings(Exception):
    """The service fetches with other servers, proxies or timeouts than this job."""


def settings_dir(base: Path, settings: str) -> Path:
    """Where the service of other settings lives, beside the first one."""
    return base / ("s-" + hashlib.sha256(settings.encode()).hexdigest()[:12])  # short: AF_UNIX


def _difference(ours: str, theirs: Any) -> str:
    try:
        a, b = json.loads(ours), json.loads(str(theirs))
    except ValueError:
        return "settings unknown"
    return ", ".join(f"its {k} {b.get(k)!r}, ours {a[k]!r}" for k in a if a[k] != b.get(k))


def service_args(config: ExecConfig, directory: Path) -> list[str]:
    """hep-exec options that rebuild the parts of ``config`` the service uses."""
    own = [
        ("--server", ";".join("|".join(g) for g in config.servers), "servers"),
        ("--proxy", str(config.proxies), "proxies"),
    ]
    return [
        *(
            x
            for flag, value, name in own
            if value and name not in config.site_filled
            for x in (flag, value)
        ),
        "--cvmfs-config",
        str(config.cvmfs_config or "none"),
        "--ram",
        str(config.ram_bytes),
        "--timeout",
        repr(config.timeout),
        "--connect-timeout",
        repr(config.connect_timeout),
        "--retries",
        str(config.retries),
        "--proxy-reset-after",
        repr(config.proxy_reset_after),
        "--log-level",
        config.log_level,
        "--cache-dir",
        str(directory),
        "--cache-idle",
        repr(config.cache_idle),
        "--prefetch-concurrency",
        str(config.prefetch_concurrency),
        "--ram-files",
        config.ram_files,
    ]


def start_service(config: ExecConfig, directory: Path) -> None:
    """Start a background service (returns once it listens); OSError with one line otherwise."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HEP_EXEC_CONFIG", "HEP_EXEC_RECORD", "HEP_EXEC_PREFETCH")
    }
    if not getattr(sys, "frozen", False):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_ROOT, env.get("PYTHONPATH")]))
    # the same command from a venv and from the worker bundle (scripts/bundle), whose one
    # program is sys.executable there and runs this module for ``-m worker.node.cache_service``
    # (scripts/bundle_entry.py): keep the two in step
    cmd = [sys.executable, "-m", "worker.node.cache_service", "--background"]
    import subprocess  # (only when a job starts the service: not on a warm node's path)

    try:
        done = subprocess.run(
            [*cmd, *service_args(config, directory)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            timeout=_START_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise OSError(f"cache service did not start within {_START_TIMEOUT:g} s") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(lines[-1] if lines else f"cache service exited {done.returncode}")


class _Wait:
    """Threads waiting for one key's ``open`` reply (or push): how many, and the outcome."""

    __slots__ = ("count", "done", "error", "fetched", "obj")

    def __init__(self) -> None:
        self.count = 0
        self.fetched = False  # the service had to fetch it (not cached on this node)
        self.done = threading.Event()
        self.obj: SharedObject | None = None
        self.error: tuple[int, str, bool] | None = None


class CacheClient:
    """One connection to the service; thread-safe, several requests in flight.

    A receiver thread reads everything the service sends: ``open`` replies, objects pushed by
    a prefetch, stats. Objects we hold but nobody uses (released, or pushed and not yet
    opened) stay here, fds open and pinned at the service, up to ``idle_budget`` bytes (least
    recently used beyond it are handed back), so opening them again costs no round trip.
    """

    def __init__(
        self,
        sock: socket.socket,
        server_pid: int,
        directory: Path,
        idle_budget: int = 0,
        names_dir: int | None = None,
    ) -> None:
        self.sock = sock
        # the service's read-only tmpfs directory: its objects opened by name (see
        # worker.ram.ramfiles.named_path); kept while any object handed out through it is pinned
        self.names_dir = names_dir
        self.server_pid = server_pid
        self.directory = directory
        self.idle_budget = idle_budget
        self.gone = False
        self.opens = 0  # objects received from the service
        self.local_hits = 0  # opens answered from what we held already
        self.pushed = 0  # objects received from a prefetch
        # told of each object the service had to fetch for our open (worker.node.readahead)
        self.on_fetched: Callable[[ObjectSpec], None] | None = None
        self.fallbacks = 0
        self._lock = threading.Lock()
        self._objects: dict[str, SharedObject] = {}  # every object we hold an fd of
        self._idle: OrderedDict[str, SharedObject] = OrderedDict()  # refs == 0, LRU first
        self._idle_bytes = 0
        self._waits: dict[str, _Wait] = {}
        self._releases: list[str] = []
        self._stats_lock = threading.Lock()
        self._stats_reply: dict[str, Any] | None = None
        self._stats_done = threading.Event()
        self._meta_waits: dict[str, _MetaWait] = {}
        self._ahead: dict[str, _MetaWait] = {}  # asked for before meta() wants them
        self._receiver: threading.Thread | None = None
        # bytes of each repository's answers the service held at hello (node_answers.py)
        self.answer_bytes: dict[str, int] = {}
        # a file for the in-process table the service made ahead (worker/node/table_pool.py)
        self.table_fd: int | None = None
        self.disposes = False  # the service closes what we hand it (dispose)
        # ensembles the node's jobs had vouched for when we connected (the newest; see vouched)
        self.vouched_at_hello: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ connecting

    @classmethod
    def connect(cls, config: ExecConfig, start: bool = True) -> CacheClient | None:
        """Connect to this user's service, starting it if absent; None (one log line) if not."""
        settings = fetch_settings(config)
        try:
            directory = ensure_private_dir(config.cache_dir or default_runtime_dir())
        except CacheDirError as e:
            log.warning("shared RAM cache unusable (%s); using a private RAM cache", e)
            return None
        problem = "not running"
        for attempt in range(3):
            try:
                client = cls.attach(directory, config.ram_bytes // 4, settings)
                return client.start()
            except OtherSettings as e:
                if config.cache_dir is not None:  # the one the user named: not ours to use
                    log.warning(
                        "shared RAM cache service at %s fetches with other settings (%s, "
                        "started by another job); using a private RAM cache",
                        directory / SOCKET_NAME,
                        e,
                    )
                    return None
                try:  # jobs with other settings share a service of their own
                    directory = ensure_private_dir(settings_dir(directory, settings))
                except CacheDirError as err:
                    problem = str(err)
                    break
                continue
            except (OSError, ServiceGone, ProtocolError) as e:
                problem = str(e) or type(e).__name__
            if not start:
                break
            try:
                if threading.active_count() == 1:
                    from worker.node.cache_service import fork_service  # (a cold node's)

                    fork_service(config, directory)
                else:
                    start_service(config, directory)
            except OSError as e:
                problem = f"cannot start it: {e}"
                if attempt:
                    break
        log.warning(
            "shared RAM cache service at %s: %s; using a private RAM cache",
            directory / SOCKET_NAME,
            problem,
        )
        return None

    @classmethod
    def attach(
        cls, directory: Path, idle_budget: int = 0, settings: str | None = None
    ) -> CacheClient:
        """Connect to a running service and check who it is (and, given ``settings``, that
        it fetches as we would); raises OSError/ServiceGone/OtherSettings.

        The client is not yet receiving: call :meth:`start` (or only :meth:`close` it).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(10)
            sock.connect(str(directory / SOCKET_NAME))
            _pid, uid, _gid = peer_credentials(sock)
            if uid != os.getuid():
                raise OSError(f"service runs as uid {uid}, not as us (uid {os.getuid()})")
            sock.send(encode({"op": "hello", "version": VERSION}))
            data, fds = recv_message(sock)
            if not data:
                raise ServiceGone("connection closed")
            reply = decode(data)
            if reply.get("version") != VERSION:
                for fd in fds:
                    os.close(fd)
                raise OSError(f"service speaks protocol {reply.get('version')}, not {VERSION}")
            # the fds: the named objects' directory, then a table made ahead, each if said
            wanted = [k for k in ("named", "table") if reply.get(k) is True]
            given = dict(zip(wanted, fds, strict=True)) if len(fds) == len(wanted) else {}
            for fd in fds if not given else []:
                os.close(fd)
            names_dir, table_fd = given.get("named"), given.get("table")
            if settings is not None and reply.get("settings") != settings:
                for fd in given.values():
                    os.close(fd)
                raise OtherSettings(_difference(settings, reply.get("settings")))
            sock.settimeout(None)
            client = cls(sock, int(reply["pid"]), directory, idle_budget, names_dir)
            client.table_fd = table_fd
            client.disposes = reply.get("dispose") is True
            vouched = reply.get("vouched")
            if isinstance(vouched, list):
                client.vouched_at_hello = frozenset(d for d in vouched if isinstance(d, str))
            sizes = reply.get("answer_bytes")
            if isinstance(sizes, dict):
                client.answer_bytes = {
                    str(k): v for k, v in sizes.items() if isinstance(v, int) and v > 0
                }
            return client
        except BaseException:
            sock.close()
            raise

    def start(self) -> CacheClient:
        """Start the receiver thread."""
        self._receiver = threading.Thread(
            target=self._receive, name="hep-exec-cache-client", daemon=True
        )
        self._receiver.start()
        return self

    # ------------------------------------------------------------------ objects

    def open(self, spec: ObjectSpec) -> SharedObject | None:
        """Pin an object (fetched by the service at most once per node); None if it is gone.

        Raises RepositoryError with the service's errno (EIO, ENOMEM …) for objects it could
        not load.
        """
        key = spec.key
        with self._lock:
            obj = self._objects.get(key)
            if obj is not None:
                if obj.refs == 0:
                    del self._idle[key]
                    self._idle_bytes -= obj.size
                obj.refs += 1
                self.local_hits += 1
                return obj
            if self.gone:
                self.fallbacks += 1
                return None
            wait = self._waits.get(key)
            ask = wait is None
            if wait is None:
                wait = self._waits[key] = _Wait()
            wait.count += 1
            releases, self._releases = self._releases, []
        if ask:
            try:
                if releases:
                    self.sock.send(encode({"op": "release", "keys": releases}))
                self.sock.send(encode({"op": "open", "object": spec.to_wire()}))
            except OSError as e:
                self._mark_gone(e)
        wait.done.wait()
        if ask and wait.fetched and self.on_fetched is not None:
            self.on_fetched(spec)
        if wait.error is not None:
            err, message, missing = wait.error
            if missing:  # the service asked the same servers as ours: no use asking again
                raise NotOnServers(message)
            raise RepositoryError(err, message)
        if wait.obj is None:
            with self._lock:
                self.fallbacks += 1
            return None
        return wait.obj

    def release(self, obj: SharedObject) -> None:
        """Drop one pin; unused objects stay idle here up to the budget."""
        with self._lock:
            if obj.refs <= 0:
                raise ValueError(f"release of unpinned shared object {obj.key}")
            obj.refs -= 1
            if obj.refs:
                return
            if self._objects.get(obj.key) is not obj:  # closed meanwhile
                os.close(obj.fd)
                return
            self._idle[obj.key] = obj
            self._idle_bytes += obj.size
            flush = self._trim_idle()
        if flush:
            self._send_releases()

    def prefetch(self, specs: Sequence[ObjectSpec], push: bool = True) -> bool:
        """Ask the service to fetch these (and push them to us); False if it is gone."""
        with self._lock:
            todo = [s for s in specs if s.key not in self._objects and s.key not in self._waits]
        if self.gone:
            return False
        try:
            for i in range(0, len(todo), PREFETCH_BATCH):
                batch = [s.to_wire() for s in todo[i : i + PREFETCH_BATCH]]
                self.sock.send(encode({"op": "prefetch", "objects": batch, "push": push}))
        except OSError as e:
            self._mark_gone(e)
            return False
        return True

    def meta(self, fqrn: str, path: str) -> bytes | None:
        """A repository file through the service (worker.repo.repository_files); None when the
        service is gone or cannot give it (the caller fetches it itself)."""
        data = self._ask(
            f"{fqrn}/{path}", {"op": "meta", "fqrn": fqrn, "path": path}, _META_TIMEOUT
        )
        return data if isinstance(data, bytes) else None

    def meta_ahead(self, fqrn: str, path: str) -> None:
        """Ask now for a repository file that :meth:`meta` will want soon (its reply is kept
        for it): a mount asks for the whitelist with the manifest, and for the root catalog
        and the node's answers for it as soon as the manifest names them, so that its round
        trips to the service overlap (after idle seconds each costs milliseconds)."""
        self._ask_ahead(f"{fqrn}/{path}", {"op": "meta", "fqrn": fqrn, "path": path})

    def catalog_ahead(self, fqrn: str, path: str) -> None:
        """:meth:`meta_ahead` for :meth:`catalog`."""
        self._ask_ahead(f"catalog\0{fqrn}/{path}", {"op": "catalog", "fqrn": fqrn, "path": path})

    def answers_ahead(self, fqrn: str, root: str) -> None:
        """:meth:`meta_ahead` for :meth:`answers`."""
        self._ask_ahead(f"answers\0{fqrn}\0{root}", {"op": "answers", "fqrn": fqrn, "root": root})

    def _ask_ahead(self, key: str, msg: dict[str, Any]) -> None:
        if self.gone:
            return
        with self._lock:
            if key in self._meta_waits or key in self._ahead:
                return
            self._ahead[key] = self._meta_waits[key] = _MetaWait()
        try:
            self.sock.send(encode(msg))
        except OSError as e:
            self._mark_gone(e)

    def catalog(self, fqrn: str, path: str) -> mmap.mmap | None:
        """A catalog the service inflated once for the node's jobs, mapped read-only; None
        when the service is gone or cannot give it (the caller fetches it itself)."""
        msg = {"op": "catalog", "fqrn": fqrn, "path": path}
        data = self._ask(f"catalog\0{fqrn}/{path}", msg, _META_TIMEOUT)
        return data if isinstance(data, mmap.mmap) else None

    def vouched(self, digest: str) -> bool:
        """Did a job of the node verify the repository ensemble known by ``digest``
        (worker.repo.repository.ensemble_digest)?  False when the service cannot say.  One
        the service named at hello needs no round trip (a mount's 0.6-2 ms here): a vouch is
        never withdrawn, and what time changes (expiry) the caller rechecks itself."""
        if digest in self.vouched_at_hello:
            return True
        msg = {"op": "vouched", "digest": digest}
        return self._ask(f"vouched\0{digest}", msg, _META_TIMEOUT) == b"1"

    def vouch(self, digest: str) -> None:
        """Tell the node's next jobs this ensemble verified (no reply)."""
        if self.gone:
            return
        try:
            self.sock.send(encode({"op": "vouch", "digest": digest}))
        except OSError as e:
            self._mark_gone(e)

    def answers(self, fqrn: str, root: str) -> bytes | mmap.mmap | None:
        """The answers ahead the node's earlier jobs learnt for this revision of a
        repository (worker.trace.node_answers); None when there are none or the service is gone."""
        msg = {"op": "answers", "fqrn": fqrn, "root": root}
        return self._ask(f"answers\0{fqrn}\0{root}", msg, _ANSWERS_TIMEOUT) or None

    def _ask(self, key: str, msg: dict[str, Any], timeout: float) -> bytes | mmap.mmap | None:
        """Send a request whose reply the receiver hands over under ``key`` (_answered), and
        wait for it; None if the service is gone or does not answer in time."""
        if self.gone:
            return None
        with self._lock:  # asked for already (_ask_ahead, or another thread): that reply
            wait = self._ahead.pop(key, None) or self._meta_waits.get(key)
            ask = wait is None
            if wait is None:
                wait = self._meta_waits[key] = _MetaWait()
        if ask:
            try:
                self.sock.send(encode(msg))
            except OSError as e:
                self._mark_gone(e)
        if not wait.done.wait(timeout):
            with self._lock:
                if self._meta_waits.get(key) is wait:
                    del self._meta_waits[key]
            return None
        if wait.error is not None:
            log.debug("%s: cache service: %s", key.replace("\0", " "), wait.error)
        return wait.data

    def add_answers(self, fqrn: str, root: str, data: bytes) -> bool:
        """Hand this job's answers ahead for one revision to the service (no reply)."""
        if self.gone or not data:
            return False
        try:
            fd = fill_sealed_memfd(f"answers {fqrn}", len(data), lambda o: o.write_at(0, data))
        except OSError as e:
            log.debug("answers ahead for %s: %s", fqrn, e)
            return False
        try:
            msg = {"op": "answers_add", "fqrn": fqrn, "root": root, "size": len(data)}
            return self._send_with_fd(msg, fd)
        finally:
            os.close(fd)

    def dispose(self, fd: int) -> bool:
        """Hand the service the last reference to ``fd`` to close off our exit (no reply);
        False if it cannot take it (the caller closes it)."""
        return not self.gone and self.disposes and self._send_with_fd({"op": "dispose"}, fd)

    def _send_with_fd(self, msg: dict[str, Any], fd: int) -> bool:
        """A request that needs no reply, with one fd; False (and the service gone) if the
        send failed."""
        try:
            self.sock.sendmsg(
                [encode(msg)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            )
        except OSError as e:
            self._mark_gone(e)
            return False
        return True

    def holds(self, key: str) -> bool:
        """Whether we hold an fd of this object (pinned or idle)."""
        with self._lock:
            return key in self._objects

    def stats(self) -> dict[str, Any] | None:
        with self._stats_lock:
            if self.gone:
                return None
            self._stats_done.clear()
            try:
                self.sock.send(encode({"op": "stats"}))
            except OSError as e:
                self._mark_gone(e)
                return None
            if not self._stats_done.wait(10):
                return None
            return self._stats_reply

    def take_table(self) -> int:
        """The table file the service made ahead (-1: none), now the caller's to close."""
        fd, self.table_fd = self.table_fd, None
        return -1 if fd is None else fd

    def close(self) -> None:
        """Disconnect (the service drops our pins); objects in use keep their fds."""
        if self.table_fd is not None:  # (not given to a run)
            os.close(self.table_fd)
            self.table_fd = None
        with self._lock:
            gone, self.gone = self.gone, True
            for obj in self._idle.values():
                os.close(obj.fd)
            for key in self._idle:
                del self._objects[key]
            self._idle.clear()
            self._idle_bytes = 0
            pinned = bool(self._objects)
            self._objects.clear()  # pinned ones close on their last release
            if self.names_dir is not None and not pinned:
                os.close(self.names_dir)  # else kept: tracees may still open through it
                self.names_dir = None
        if not gone:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._wake_all()

    # ------------------------------------------------------------------ internals

    def _trim_idle(self, batch: int = 1) -> bool:
        """With the lock: hand back least recently used idle objects beyond the budget.

        True when ``batch`` or more releases wait to be sent (pushes arriving in bursts
        collect theirs; a job's own release sends at once, so the service may evict soon).
        """
        while self._idle_bytes > self.idle_budget and self._idle:
            key, obj = self._idle.popitem(last=False)
            self._idle_bytes -= obj.size
            del self._objects[key]
            os.close(obj.fd)
            if not self.gone:
                self._releases.append(key)
        return len(self._releases) >= batch

    def _send_releases(self) -> None:
        with self._lock:
            releases, self._releases = self._releases, []
        if releases and not self.gone:
            try:
                self.sock.send(encode({"op": "release", "keys": releases}))
            except OSError as e:
                self._mark_gone(e)

    def _receive(self) -> None:
        """Receiver thread: dispatch every message until the connection ends."""
        try:
            while True:
                data, fds = recv_message(self.sock)
                if not data:
                    for fd in fds:
                        os.close(fd)
                    raise ServiceGone("connection closed")
                self._dispatch(decode(data), fds)
        except (OSError, ServiceGone, ProtocolError, KeyError, TypeError, ValueError) as e:
            self._mark_gone(e)

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "ready":
            items = msg.get("objects")
            if not isinstance(items, list) or len(items) != len(fds):
                for fd in fds:
                    os.close(fd)
                raise ProtocolError("ready: one fd per object expected")
            for (key, size, name), fd in zip(items, fds, strict=True):
                self._received(str(key), int(size), fd, name, pushed=True)
            return
        if op == "meta":
            self._meta_reply(msg, fds, f"{msg.get('fqrn')}/{msg.get('path')}", _META_MAX)
            return
        if op == "answers":
            key = f"answers\0{msg.get('fqrn')}\0{msg.get('root')}"
            self._meta_reply(msg, fds, key, MAX_TABLE_BYTES, mapped=True)
            return
        if op == "catalog":
            key = f"catalog\0{msg.get('fqrn')}/{msg.get('path')}"
            self._meta_reply(msg, fds, key, MAX_CATALOG_BYTES, mapped=True)
            return
        if op == "open" and msg.get("ok") and len(fds) == 1:
            key, size, fetched = str(msg["key"]), int(msg["size"]), msg.get("fetched") is True
            self._received(key, size, fds[0], msg.get("name"), False, fetched)
            return
        for fd in fds:
            os.close(fd)
        if op == "stats":
            self._stats_reply = msg
            self._stats_done.set()
        elif op == "vouched":
            known = b"1" if msg.get("known") is True else b""
            self._answered(f"vouched\0{msg.get('digest')}", known, None)
        elif op == "open" and not msg.get("ok"):
            err = msg.get("errno")
            with self._lock:
                wait = self._waits.pop(str(msg["key"]), None)
            if wait is not None:
                wait.error = (
                    err if isinstance(err, int) else errno.EIO,
                    str(msg.get("error", "cache service")),
                    bool(msg.get("missing")),
                )
                wait.done.set()
        else:
            raise ProtocolError(f"unexpected message {op!r} with {len(fds)} fds")

    def _meta_reply(
        self, msg: dict[str, Any], fds: list[int], key: str, limit: int, mapped: bool = False
    ) -> None:
        """A reply of bytes in a memfd for whoever waits on ``key``: read (``meta``), or
        (``mapped``, an answer table) mapped read-only: one sealed memfd shared by the node's
        jobs, so a job copies nothing and parses only views into it."""
        data: bytes | mmap.mmap | None = None
        error = None if msg.get("ok") else str(msg.get("error", "cache service"))
        try:
            size = msg.get("size")
            if error is None and size == 0 and not fds:
                data = b""
            elif error is None:
                if len(fds) != 1 or not isinstance(size, int) or not 0 <= size <= limit:
                    raise ProtocolError(f"{msg.get('op')}: one fd and a size expected")
                if not mapped:
                    data = os.pread(fds[0], size + 1, 0)
                    if len(data) != size:
                        raise ProtocolError(f"{msg.get('op')}: {len(data)} bytes, not {size}")
                elif os.fstat(fds[0]).st_size != size:  # sealed: it cannot change after this
                    raise ProtocolError(f"{msg.get('op')}: the memfd does not hold {size} bytes")
                else:  # its pages mapped now, on this thread (see _MAP_FLAGS)
                    data = mmap.mmap(fds[0], size, _MAP_FLAGS, mmap.PROT_READ) if size else b""
        finally:
            for fd in fds:
                os.close(fd)
        self._answered(key, data, error)

    def _answered(self, key: str, data: bytes | mmap.mmap | None, error: str | None) -> None:
        """Hand a reply to whoever waits on ``key`` (nobody, if it gave up)."""
        with self._lock:
            wait = self._meta_waits.pop(key, None)
        if wait is not None:
            wait.data, wait.error = data, error
            wait.done.set()

    def _received(
        self, key: str, size: int, fd: int, name: object, pushed: bool, fetched: bool = False
    ) -> None:
        """An object's fd arrived: hand it to whoever waits, or keep it idle."""
        path = None
        if isinstance(name, str) and self.names_dir is not None:
            if "/" in name or name in ("", ".", ".."):
                os.close(fd)
                raise ProtocolError(f"object name {name!r}")
            path = named_path(self.names_dir, name)
        flush = False
        with self._lock:
            if key in self._objects or self.gone:  # a push and a reply crossed: keep one
                os.close(fd)
                if not self.gone:
                    self._releases.append(key)
                    flush = len(self._releases) >= PREFETCH_BATCH // 4
            else:
                obj = SharedObject(key, fd, size, path)
                self._objects[key] = obj
                if pushed:
                    self.pushed += 1
                else:
                    self.opens += 1
                wait = self._waits.pop(key, None)
                if wait is not None:
                    obj.refs = wait.count
                    wait.obj = obj
                    wait.fetched = fetched
                    wait.done.set()
                else:
                    self._idle[key] = obj
                    self._idle_bytes += obj.size
                    flush = self._trim_idle(PREFETCH_BATCH // 4)
        if flush:
            self._send_releases()

    def _wake_all(self) -> None:
        with self._lock:
            waits = list(self._waits.values())
            self._waits.clear()
            metas = list(self._meta_waits.values())
            self._meta_waits.clear()
        for wait in waits:
            wait.done.set()
        for meta in metas:
            meta.done.set()
        self._stats_reply = None
        self._stats_done.set()

    def _mark_gone(self, why: BaseException) -> None:
        with self._lock:
            was, self.gone = self.gone, True
        if not was:
            log.warning(
                "shared RAM cache service (pid %d) gone (%s); new opens use a private RAM cache",
                self.server_pid,
                why or type(why).__name__,
            )
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self._wake_all()
