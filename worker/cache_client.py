"""Client of the node's cache service, as WorkerSession uses it.

``CacheClient.connect`` finds (or starts) the service of this user; ``open`` returns a
:class:`SharedObject` whose fd is our own copy of the service's memfd, so nothing the service
does later (eviction, a crash) can take it away. When the service is gone, ``open`` returns None
(after one log line) and the session falls back to its private RAM cache: never a failed job.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvmfs_format.catalog import DirEntry
from worker.cache_protocol import (
    MAX_MESSAGE,
    PREFETCH_BATCH,
    VERSION,
    ObjectSpec,
    ProtocolError,
    decode,
    encode,
)
from worker.cache_service import (
    SOCKET_NAME,
    CacheDirError,
    default_runtime_dir,
    ensure_private_dir,
    peer_credentials,
)
from worker.config import ExecConfig
from worker.ramcache import CachedObject
from worker.repository import MountedRepository, RepositoryError

log = logging.getLogger("hep_exec.cache_client")
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
_START_TIMEOUT = 30.0


def object_spec(repo: MountedRepository, relpath: str) -> ObjectSpec | None:
    """How to load the file at ``relpath`` now; None for anything but a plain regular file."""
    entry = repo.lookup(relpath)
    if entry is None or not entry.is_regular or entry.is_external:
        return None
    chunks = tuple(repo.chunks(entry.path)) if entry.is_chunked else ()
    if not chunks and entry.hash is None:
        return None
    return ObjectSpec.of_entry(repo.fqrn, entry, chunks)


def open_shared(
    client: CacheClient, repo: MountedRepository, entry: DirEntry
) -> SharedObject | None:
    """The object from the service, or None: then the caller loads it privately.

    A service that cannot load an object (its proxies fail, say) is not the job's problem:
    the private path fetches it through the job's own proxies. Only ENOMEM is final.
    """
    spec = object_spec(repo, entry.path)
    if spec is None:
        return None
    try:
        return client.open(spec)
    except RepositoryError as e:
        if e.errno == errno.ENOMEM:
            raise
        log.warning("%s:%s: cache service: %s; fetching it here", repo.fqrn, entry.path, e)
        return None


class SharedObject(CachedObject):
    """An object from the cache service: ``fd`` is ours, ``refs`` counts our own pins."""

    __slots__ = ()


class ServiceGone(Exception):
    """The connection to the service broke (it died, or exited while we connected)."""


def service_args(config: ExecConfig, directory: Path) -> list[str]:
    """hep-exec options that rebuild the parts of ``config`` the service uses."""
    return [
        "--proxy",
        str(config.proxies),
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
    ]


def start_service(config: ExecConfig, directory: Path) -> None:
    """Start a background service (returns once it listens); OSError with one line otherwise."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HEP_EXEC_CONFIG", "HEP_EXEC_RECORD", "HEP_EXEC_PREFETCH")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_ROOT, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "worker.cache_service", "--background"]
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


class CacheClient:
    """One connection to the service; thread-safe (one request at a time)."""

    def __init__(self, sock: socket.socket, server_pid: int, directory: Path) -> None:
        self.sock = sock
        self.server_pid = server_pid
        self.directory = directory
        self.gone = False
        self.opens = 0
        self.fallbacks = 0
        self._lock = threading.Lock()
        self._objects: dict[str, SharedObject] = {}

    # ------------------------------------------------------------------ connecting

    @classmethod
    def connect(cls, config: ExecConfig, start: bool = True) -> CacheClient | None:
        """Connect to this user's service, starting it if absent; None (one log line) if not."""
        try:
            directory = ensure_private_dir(config.cache_dir or default_runtime_dir())
        except CacheDirError as e:
            log.warning("shared RAM cache unusable (%s); using a private RAM cache", e)
            return None
        problem = "not running"
        for attempt in range(3):
            try:
                return cls.attach(directory)
            except (OSError, ServiceGone, ProtocolError) as e:
                problem = str(e) or type(e).__name__
            if not start:
                break
            try:
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
    def attach(cls, directory: Path) -> CacheClient:
        """Connect to a running service and check who it is; raises OSError/ServiceGone."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(10)
            sock.connect(str(directory / SOCKET_NAME))
            _pid, uid, _gid = peer_credentials(sock)
            if uid != os.getuid():
                raise OSError(f"service runs as uid {uid}, not as us (uid {os.getuid()})")
            sock.settimeout(None)
            client = cls(sock, 0, directory)
            reply = client._request({"op": "hello", "version": VERSION})
            if reply.get("version") != VERSION:
                raise OSError(f"service speaks protocol {reply.get('version')}, not {VERSION}")
            client.server_pid = int(reply["pid"])
            return client
        except BaseException:
            sock.close()
            raise

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
                obj.refs += 1
                return obj
            if self.gone:
                self.fallbacks += 1
                return None
            try:
                reply, fd = self._exchange({"op": "open", "object": spec.to_wire()}, want_fd=True)
            except (OSError, ServiceGone, ProtocolError) as e:
                self._mark_gone(e)
                self.fallbacks += 1
                return None
            if not reply.get("ok"):
                err = reply.get("errno")
                raise RepositoryError(
                    err if isinstance(err, int) else errno.EIO,
                    str(reply.get("error", "cache service")),
                )
            if fd is None or reply.get("key") != key:
                self._mark_gone(ProtocolError("open reply without the object's fd"))
                if fd is not None:
                    os.close(fd)
                self.fallbacks += 1
                return None
            obj = SharedObject(key, fd, int(reply["size"]))
            obj.refs = 1
            self._objects[key] = obj
            self.opens += 1
            return obj

    def release(self, obj: SharedObject) -> None:
        """Drop one pin; the last one closes our fd and tells the service."""
        with self._lock:
            if obj.refs <= 0:
                raise ValueError(f"release of unpinned shared object {obj.key}")
            obj.refs -= 1
            if obj.refs:
                return
            if self._objects.get(obj.key) is obj:
                del self._objects[obj.key]
            os.close(obj.fd)
            if not self.gone:
                try:
                    self.sock.send(encode({"op": "release", "key": obj.key}))
                except OSError as e:
                    self._mark_gone(e)

    def prefetch(self, specs: Sequence[ObjectSpec]) -> bool:
        """Ask the service to fetch these in the background; False if it is gone."""
        with self._lock:
            if self.gone:
                return False
            try:
                for i in range(0, len(specs), PREFETCH_BATCH):
                    batch = [s.to_wire() for s in specs[i : i + PREFETCH_BATCH]]
                    self._exchange({"op": "prefetch", "objects": batch})
            except (OSError, ServiceGone, ProtocolError) as e:
                self._mark_gone(e)
                return False
            return True

    def stats(self) -> dict[str, Any] | None:
        with self._lock:
            if self.gone:
                return None
            try:
                return self._exchange({"op": "stats"})[0]
            except (OSError, ServiceGone, ProtocolError) as e:
                self._mark_gone(e)
                return None

    def close(self) -> None:
        """Disconnect (the service drops our pins); objects handed out keep their fds."""
        with self._lock:
            self.gone = True
            self.sock.close()

    # ------------------------------------------------------------------ internals

    def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return self._exchange(msg)[0]

    def _exchange(
        self, msg: dict[str, Any], want_fd: bool = False
    ) -> tuple[dict[str, Any], int | None]:
        self.sock.send(encode(msg))
        data, anc, flags, _ = self.sock.recvmsg(
            MAX_MESSAGE, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ServiceGone("connection closed")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) > (1 if want_fd else 0):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("unexpected reply")
        return decode(data), (fds[0] if fds else None)

    def _mark_gone(self, why: BaseException) -> None:
        if not self.gone:
            self.gone = True
            log.warning(
                "shared RAM cache service (pid %d) gone (%s); new opens use a private RAM cache",
                self.server_pid,
                why or type(why).__name__,
            )
            self.sock.close()
