"""The contract between the tracer and whatever knows the /cvmfs namespace.

The tracer (worker/trace/tracer.py + worker/trace/_trap.c) walks paths, follows symlinks,
handles ``..``, directories, ``#!`` scripts and EROFS itself; a policy only answers three small
questions about single entries.  The catalog-backed data side implements this protocol; tests
use a host-directory policy (worker/trace/hostpolicy.py).

Paths given to a policy are absolute, normalised, with no symlink in any parent component:
``b"/cvmfs"`` (the mount itself, which lists the repositories) or ``b"/cvmfs/<fqrn>/a/b"``.
Errors are plain ``errno`` integers (``errno.ENOENT``, ``errno.EIO``, ``errno.ENOMEM`` ...).
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Sequence
from contextvars import ContextVar
from enum import IntEnum
from typing import NamedTuple, Protocol


class Kind(IntEnum):
    """File type, as the ``S_IFMT`` bits of ``st_mode``."""

    REG = stat.S_IFREG
    DIR = stat.S_IFDIR
    LNK = stat.S_IFLNK
    FIFO = stat.S_IFIFO
    CHR = stat.S_IFCHR
    BLK = stat.S_IFBLK
    SOCK = stat.S_IFSOCK


class Node(NamedTuple):
    """One catalog entry, as stat(2) shows it (uid/gid are the caller's, st_dev the tracer's).

    ``target`` is the symlink target already expanded for the asking process (variant
    symlinks); set ``volatile`` when the answer depends on that process, so that the tracer
    never caches it.
    """

    kind: Kind
    mode: int  # permission bits (S_IMODE)
    size: int
    ino: int
    nlink: int = 1
    mtime_ns: int = 0
    ctime_ns: int | None = None  # None: same as mtime
    rdev: int = 0
    target: bytes = b""
    volatile: bool = False
    xattrs: bytes = b""  # published extended attributes: a CVMFS xattr blob (or empty)
    dev: int = 0  # st_dev: its repository's (repository_dev); 0: the tracer's (/cvmfs itself)


_DEVS: dict[str, int] = {}


def repository_dev(fqrn: str) -> int:
    """The st_dev of a repository's entries: one of its own, as each repository is a mount of
    its own under the real client (``mountpoint /cvmfs/<fqrn>``, ``os.path.ismount``, ``find
    -xdev`` and ``du -x`` see the boundary), the same in every job (the node's answers keep
    it), an anonymous device number above those the kernel hands out."""
    dev = _DEVS.get(fqrn)
    if dev is None:
        dev = _DEVS[fqrn] = os.makedev(0, 0x80000 | zlib.crc32(fqrn.encode()) & 0x7FFFF)
    return dev


def access_allowed(node: Node, want: int, uid: int) -> bool:
    """access(2) for the caller, who is shown as the owner of every /cvmfs entry."""
    if want & os.X_OK and not node.mode & 0o111 and node.kind != Kind.DIR:
        return False
    if uid == 0:
        return not (want & os.X_OK and not node.mode & 0o111)
    bits = (4 if want & os.R_OK else 0) | (1 if want & os.X_OK else 0)
    return (node.mode >> 6) & bits == bits


class Opened(NamedTuple):
    """Where the kernel can open a file's bytes, e.g. ``/proc/<pid>/fd/<n>`` of a memfd.

    ``stable`` promises that the same path stays valid (same content) for the rest of the
    run, so the C side may answer later opens of this /cvmfs path without asking again.
    """

    path: bytes
    stable: bool = True


class Entry(NamedTuple):
    """One directory entry for getdents64 (d_type comes from ``kind``)."""

    name: bytes
    kind: Kind
    ino: int


class Policy(Protocol):
    """What the tracer asks about /cvmfs.  Called on the tracer thread, one call at a time."""

    def lookup(self, pid: int, path: bytes) -> Node | int:
        """The entry at ``path`` itself (symlinks not followed), or an errno."""
        ...

    def listdir(self, path: bytes) -> Sequence[Entry] | int:
        """The entries of directory ``path`` (without ``.`` and ``..``), or an errno."""
        ...

    def open(self, pid: int, path: bytes, node: Node) -> Opened | int:
        """A kernel-openable path with the bytes of file ``path``, or an errno (EIO, ENOMEM)."""
        ...

    def opens_ahead(self, pid: int, paths: Sequence[bytes]) -> dict[bytes, Opened]:
        """Of regular files ``paths``, those whose open can be answered now at no cost (their
        bytes are already at hand, by a name that is never reused): offered before they are
        asked for.  The target may vanish later (an eviction): the tracer then asks
        :meth:`open`.  May return nothing."""
        ...

    def mounted(self) -> Sequence[str]:
        """The repositories mounted so far, in the order they were (the mount tables list
        them: worker/trace/mount_table.py)."""
        ...

    def magic_xattrs(self, pid: int, path: bytes) -> bytes:
        """The xattr blob getxattr of a ``user.*`` name reads at entry ``path`` (symlinks not
        followed): its published attributes and CernVM-FS's magic ones (``user.revision``,
        ``user.hash`` …, cvmfs_format.magic_xattrs); b"" where there are none."""
        ...


# The /cvmfs path the traced program asked for while its call is being answered: a policy's
# log line names it (the walk may be at one of its parents when something fails).
ASKED: ContextVar[bytes | None] = ContextVar("asked", default=None)


class Found(NamedTuple):
    """A path resolved to an entry inside the mount."""

    path: bytes
    node: Node


class Outside(NamedTuple):
    """A path that leaves the mount (``..`` or a symlink): the kernel resolves the rest."""

    path: bytes
