"""The RAM files the cache keeps objects in: sealed memfds, or a private huge-page tmpfs.

A tracee reads a /cvmfs file through its own fd on one of these files, so their read speed is
the job's.  memfds live on the kernel's internal shmem mount and follow the node's
``transparent_hugepage/shmem_enabled`` (``never`` on most nodes): 4 KiB pages, and a 1 MiB
read runs at ~0.6 of one from ext4's page cache, which uses large folios.  A tmpfs mounted
with ``huge=within_size`` gets folios sized to each file whatever that setting says, and an
unprivileged user can mount one in a user + mount namespace of its own (worker/trace/_tmpfs.c):
reads then match or beat the page cache.  Objects there are created under the read-write
mount and handed out through a read-only bind of it, so nothing a tracee does can change
them (EROFS), as with sealed memfds.  ``auto`` uses the tmpfs where shmem_enabled would give
memfds small pages and user namespaces are allowed, memfds otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

log = logging.getLogger("hep_exec.cache")

BACKINGS = ("auto", "tmpfs", "memfd")
# unshare(CLONE_NEWUSER) where user namespaces are off: max_user_namespaces 0 (ENOSPC),
# a container's seccomp profile or kernel.unprivileged_userns_clone=0 (EPERM), no CONFIG (EINVAL)
NO_USERNS = (errno.ENOSPC, errno.EPERM, errno.EUSERS, errno.EINVAL)
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
# size=0, nr_inodes=0: no limits of its own (the cache's byte limit is the limit)
TMPFS_OPTIONS = b"huge=within_size,size=0,nr_inodes=0,mode=0700"

Data = bytes | bytearray | memoryview | Sequence[bytes]


class RamFile(NamedTuple):
    """One object's file: ``path`` is what a tracee opens to get its own read-only fd."""

    fd: int
    size: int
    path: str
    name: str | None = None  # its name on our tmpfs (None: a memfd, reached by fd number)


def fd_path(fd: int) -> str:
    """The /proc path of one of our fds: opening it gives a new open file description."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def named_path(dir_fd: int, name: str) -> str:
    """A file by name in a directory we hold an fd of: valid while the name exists, so it can
    never lead to another object; the tracer opens it with openat(dir_fd, name), which is
    2 µs cheaper than reopening an fd through /proc."""
    return f"/proc/{os.getpid()}/fd/{dir_fd}/{name}"


class RamFilesError(Exception):
    """The tmpfs was asked for and cannot be had; ``str()`` is one line."""


def shmem_setting(text: str) -> str:
    """The selected value of a sysfs THP setting: ``always [never] deny`` -> ``never``."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip()


def choose_backing(requested: str, shmem_enabled: str | None) -> tuple[str, str]:
    """(backing to try, why) for a requested backing and the node's shmem_enabled setting
    (None: no transparent huge pages in this kernel)."""
    if requested not in BACKINGS:
        raise ValueError(f"{requested!r}: expected one of {', '.join(BACKINGS)}")
    if requested != "auto":
        return requested, f"{requested} requested"
    if shmem_enabled is None:
        return "memfd", "no transparent huge pages in this kernel"
    setting = shmem_setting(shmem_enabled)
    if setting in ("never", "advise"):
        return "tmpfs", f"memfds get 4 KiB pages here (shmem_enabled={setting})"
    if setting == "deny":
        return "memfd", "huge pages denied to tmpfs too (shmem_enabled=deny)"
    return "memfd", f"memfds get huge pages already (shmem_enabled={setting})"


def _pieces(data: Data) -> Sequence[bytes | bytearray | memoryview]:
    return [data] if isinstance(data, bytes | bytearray | memoryview) else data


class RamFileWriter:
    """A RAM file being filled, piece by piece at its offsets, before anyone can see it.

    Loaders of big objects (chunked files) write each piece as soon as it is verified and
    drop it, so a file never has to sit in Python memory whole; the file is only handed out
    (sealed, or reopened read-only) once the fill returned and every byte was written.
    """

    __slots__ = ("fd", "size", "written")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.written = 0

    def start_over(self) -> None:
        """What was written is to be written again, from the first byte (a download that
        starts again from another server): every byte must be written anew."""
        self.written = 0

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (pieces must not overlap: ``written`` counts bytes)."""
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise ValueError(f"{len(view)} bytes at {offset} outside a file of {self.size}")
        while view:
            n = os.pwrite(self.fd, view, offset)
            offset += n
            self.written += n
            view = view[n:]


Fill = Callable[[RamFileWriter], None]


def _fill(fd: int, size: int, fill: Fill) -> None:
    """Size the file first (so the tmpfs picks folios for its whole size), then fill it."""
    if size:
        os.ftruncate(fd, size)
    writer = RamFileWriter(fd, size)
    fill(writer)
    if writer.written != size:
        raise ValueError(f"RAM file filled with {writer.written} of {size} bytes")


def _writing(data: Data) -> tuple[int, Fill]:
    """(size, fill) of data given whole or as pieces in order."""
    pieces = _pieces(data)

    def fill(out: RamFileWriter) -> None:
        offset = 0
        for piece in pieces:
            out.write_at(offset, piece)
            offset += len(piece)

    return sum(len(p) for p in pieces), fill


def make_sealed_memfd(name: str, data: Data) -> tuple[int, int]:
    """Write ``data`` (one buffer or pieces in order) into a new memfd and seal it."""
    size, fill = _writing(data)
    return fill_sealed_memfd(name, size, fill), size


def fill_sealed_memfd(name: str, size: int, fill: Fill) -> int:
    """A new memfd of ``size`` bytes written by ``fill``, sealed; closed if ``fill`` raises."""
    fd = os.memfd_create(name[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _fill(fd, size, fill)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _plain_name(name: str) -> bool:
    return 0 < len(name) <= 200 and "/" not in name and name not in (".", "..")


def _names_file(dir_fd: int, name: str, fd: int) -> bool:
    """Does ``name`` in ``dir_fd`` still name the file open as ``fd``?  (A key's name may
    have gone to a newer copy of the same object.)"""
    try:
        a, b = os.stat(name, dir_fd=dir_fd, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class RamFiles:
    """Makes the cache's object files: ``make(name, data) -> RamFile``, ``discard`` after.

    The tmpfs is mounted on first use (a fork and two namespaces, a few milliseconds), so a
    process that never caches a file never pays for it.  Its files keep their (never reused)
    names until discarded, so tracees can open them by name; the mounts, and whatever is
    still on them, go when the last fd of them closes (at the latest when we exit).
    """

    def __init__(
        self, requested: str = "auto", shmem_enabled: str | None = "", *, by_key: bool = False
    ) -> None:
        """``shmem_enabled``: the sysfs text, None for no THP, "" to read it here.

        ``by_key`` (a node's cache service): a finished tmpfs file is named by its object's
        key alone, so a job finds an object the node holds with one stat, asking nobody.
        Keys name content, so whatever a name leads to, now or after the object was
        evicted and loaded again, has the same bytes."""
        if shmem_enabled == "":
            try:
                with open(SHMEM_ENABLED) as f:
                    shmem_enabled = f.read()
            except OSError:
                shmem_enabled = None
        self.requested = requested
        self.by_key = by_key
        self._try, self.reason = choose_backing(requested, shmem_enabled)
        self._lock = threading.Lock()
        self._dirs: tuple[int, int] | None = None  # (read-write, read-only) mount dirfds
        self._names = itertools.count()
        self._backing: str | None = None if self._try == "tmpfs" else "memfd"
        if requested == "tmpfs":
            self._resolve()  # refuse now, not at the first open

    @property
    def backing(self) -> str:
        """``tmpfs`` or ``memfd``: what objects are made of (mounts the tmpfs if need be)."""
        return self._backing or self._resolve()

    def _resolve(self) -> str:
        with self._lock:
            if self._backing is None:
                self._backing = self._mount()
            return self._backing

    def _mount(self) -> str:
        from worker.trace import _tmpfs
        from worker.trace.tracer import tmpfs_mount_dir

        try:
            rw, ro, _ = _tmpfs.mount(tmpfs_mount_dir(), TMPFS_OPTIONS)
            self._dirs = (rw, ro)
        except OSError as e:
            why = f"private tmpfs refused: {e.filename}: {e.strerror}"
            if str(e.filename).startswith("unshare") and e.errno in NO_USERNS:
                why += " (user namespaces disabled on this node?)"
            if self.requested == "tmpfs":
                raise RamFilesError(f"--ram-files tmpfs: {why}") from None
            self.reason = why
            log.info("RAM cache: %s; sealed memfds instead", why)
            return "memfd"
        log.debug("RAM cache: private tmpfs with huge=within_size (%s)", self.reason)
        return "tmpfs"

    @property
    def writable_path(self) -> str | None:
        """The writable mount, as a path of ours (after :attr:`backing` says tmpfs), else
        None: where a cache service makes other files that want its huge pages."""
        return f"/proc/self/fd/{self._dirs[0]}" if self.backing == "tmpfs" and self._dirs else None

    @property
    def shared_dir(self) -> int | None:
        """The read-only mount's dirfd (after :attr:`backing` says tmpfs), else None: what a
        cache service sends its clients so they open its files by name."""
        return self._dirs[1] if self.backing == "tmpfs" and self._dirs else None

    def make(self, name: str, data: Data) -> RamFile:
        """A new read-only file holding ``data``; give it back with :meth:`discard`."""
        size, fill = _writing(data)
        return self.make_filled(name, size, fill)

    def make_filled(self, name: str, size: int, fill: Fill) -> RamFile:
        """A new read-only file of ``size`` bytes that ``fill`` writes (every byte, or it
        raises); nobody can open it before this returns, and nothing is left if it raises."""
        if self.backing == "memfd":
            fd = fill_sealed_memfd(name, size, fill)
            return RamFile(fd, size, fd_path(fd))
        assert self._dirs is not None
        rw_dir, ro_dir = self._dirs
        leaf = ""
        while True:
            leaf = f"{name[:160]}.{os.getpid()}.{next(self._names)}"
            try:
                wfd = os.open(
                    leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o555, dir_fd=rw_dir
                )
                break
            except FileExistsError:  # a fork of ours counts from the same number
                continue
        try:
            try:
                _fill(wfd, size, fill)
            finally:
                os.close(wfd)
            fd = os.open(leaf, os.O_RDONLY | os.O_CLOEXEC, dir_fd=ro_dir)
        except BaseException:
            os.unlink(leaf, dir_fd=rw_dir)
            raise
        if self.by_key and _plain_name(name):
            # complete: only now may it be found by its key (replacing an older copy's name)
            try:
                os.rename(leaf, name, src_dir_fd=rw_dir, dst_dir_fd=rw_dir)
                leaf = name
            except OSError as e:
                log.debug("RAM cache: %s stays unnamed by key: %s", name, e.strerror)
        return RamFile(fd, size, named_path(ro_dir, leaf), leaf)

    def discard(self, fd: int, name: str | None) -> None:
        """Close a file of ours; its name goes with it (its memory once no tracee holds it)."""
        try:
            if name is not None:
                with self._lock:
                    if self._dirs is not None and _names_file(self._dirs[0], name, fd):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=self._dirs[0])
        finally:
            os.close(fd)

    def describe(self) -> str:
        """One line for ``hep-exec --check``."""
        if self.backing == "tmpfs":
            return f"private tmpfs, huge=within_size ({self.reason})"
        return f"sealed memfds ({self.reason})"

    def close(self) -> None:
        with self._lock:
            if self._dirs is not None:
                for fd in self._dirs:
                    os.close(fd)
                self._dirs = None
                self._backing = None if self._try == "tmpfs" else "memfd"


_default: RamFiles | None = None
_default_lock = threading.Lock()


def default_ram_files() -> RamFiles:
    """The process-wide ``auto`` RamFiles of caches made without one (one mount each)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RamFiles()
        return _default
