"""Where a node's jobs meet their cache service: a private runtime directory, its socket and lock.

The directory must be ours and mode 0700 (refused otherwise), so only the same user's jobs
reach the socket; the lock makes racing starters safe; SO_PEERCRED names each peer.  Shared by
the service (worker.node.cache_service) and its clients (worker.node.cache_client).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "cache.sock"
LOCK_NAME = "cache.lock"
LOG_NAME = "cache.log"


class CacheDirError(OSError):
    """The runtime directory is missing, not ours or not private; ``str()`` says which."""

    def __str__(self) -> str:
        return str(self.args[0])


def default_runtime_dir(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """``$XDG_RUNTIME_DIR/hep-exec`` when that directory exists, else ``/dev/shm/hep-exec-UID``."""
    environ = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/") and os.path.isdir(xdg):
        return Path(xdg) / "hep-exec"
    return Path(f"/dev/shm/hep-exec-{uid}")


def ensure_private_dir(path: Path, uid: int | None = None) -> Path:
    """Create ``path`` (mode 0700) or check that it is a real directory of ours, mode 0700.

    Another user who created the directory first, a symlink, or loose permissions make us
    refuse: the socket and lock inside must be reachable by us alone.
    """
    uid = os.getuid() if uid is None else uid
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CacheDirError(
            f"{path}: cannot create cache service directory ({e.strerror})"
        ) from None
    try:
        st = os.lstat(path)
    except OSError as e:
        raise CacheDirError(f"{path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"{path}: not a directory (refusing a symlink or file)")
    if st.st_uid != uid:
        raise CacheDirError(f"{path}: owned by uid {st.st_uid}, not by us (uid {uid})")
    if st.st_mode & 0o077:
        raise CacheDirError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, must be 0700")
    return path


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def bind_service(directory: Path) -> tuple[socket.socket, int] | None:
    """Under the directory's lock: None if a live service answers, else (listener, lock fd).

    The caller unlocks (``os.close(lock fd)``) once it is ready to accept.
    """
    lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        path = str(directory / SOCKET_NAME)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
            return_none = True
        except OSError:
            return_none = False
        finally:
            probe.close()
        if return_none:
            os.close(lock_fd)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        listener.listen(256)
        return listener, lock_fd
    except BaseException:
        os.close(lock_fd)
        raise


def daemonize(log_path: Path) -> None:
    """Second half of the double fork: the starter's child exits, we live on in a new session."""
    if os.fork():
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(logfd, 2)
    os.close(null)
    os.close(logfd)
