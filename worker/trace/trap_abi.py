"""What worker/trace/_trap.c and Python say to each other: the classes of calls, the kinds of
answer and their flags (the numbers must match the C side's), and the C side's handling of the
answers shared with the node's jobs (:class:`NodeOps`)."""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from worker.trace.node_answers import Buffer


class Cls(IntEnum):
    """Syscall classes (worker/trace/_trap.c)."""

    OPEN = 1
    STAT = 2
    ACCESS = 3
    READLINK = 4
    EXEC = 5
    CHDIR = 6
    STATFS = 7
    XATTR_GET = 8
    XATTR_LIST = 9
    WATCH = 12  # inotify_add_watch (10, 11: writes and getcwd, answered in C)
    LISTED = 30  # markers for worker.trace._trap.put: a directory whose entries are all known,
    NAMED = 31  # and each of its entries (anything else there is ENOENT, answered in C)
    NOXATTR = 32  # a listed directory: entries without an XATTRS answer have no xattrs


class Act(IntEnum):
    """Answer kinds (worker/trace/_trap.c)."""

    PASS = 0
    RETURN = 1
    REDIRECT = 2
    STAT = 3
    READLINK = 4
    EXEC = 5
    XATTRS = 6  # bval: a CVMFS xattr blob; C answers getxattr/listxattr from it


F_NOFOLLOW = 0x100
F_OPATH = 0x200
F_PROCEXE = 0x400  # readlink of /proc/<pid>/exe
F_WRITE = 0x800  # open for writing (nothing created or truncated): EROFS, but a FIFO opens
F_USERXATTR = 0x1000  # getxattr of a user.* name: CernVM-FS's magic ones are among them
F_MOUNTS = 0x2000  # an open of a mount table (/proc/<pid>/mountinfo ...): worker/trace/mount_table
F_MAPS = 0x4000  # an open of /proc/<pid>/maps or smaps: worker/trace/proc_maps
MAX_AHEAD = 4096  # entries of a directory answered ahead on its first open (if not listed)
SAFE = 1  # REDIRECT ival: target never blocks or restarts, no need to restore the register

# (cacheable, kind, ival, bval, stat tuple, argv prefix)
Action = tuple[bool, int, int, bytes | None, tuple[int, ...] | None, list[bytes] | None]


Put = tuple[int, list[bytes], list[tuple[bytes, bytes]]]


class NodeOps(NamedTuple):
    """The C side's handling of answers shared with the node's jobs (worker/trace/_trap.c)."""

    pack: Callable[[list[tuple[int, int, bytes, Action]], bytes, int, int, int], bytes]
    # a revision's table: (table, within, eager bytes, prefix, uid, gid, dev, dirfd) -> the
    # answers put, the directories listed and the opens put; None: not frames
    put_table: Callable[[Buffer, bytes, int, bytes, int, int, int, int], Put | None]
    put_staged: Callable[[bytes], Put | None]
    take_notes: Callable[[], list[tuple[bytes, bytes]]]
    node_listing: Callable[[bytes], bytes | None]  # a directory's, as the node's jobs saw it
    opens_looked: Callable[[bytes], bool]  # an earlier job looked for its opens ahead
    # the directories the C side mirrors and opens with no upcall (from the node's listings)
    mirrored: Callable[[bytes], None]  # Python made a mirror
    take_mirrored: Callable[[], list[bytes]]  # those the C side made since the last call
    expect: Callable[[int], None]  # the in-process table is sized for so many bytes of them
    # fn() called holding the lock of the threads answering calls (None, not called: no run)
    holding: Callable[[Callable[[], None]], None]
    running: Callable[[], bool]  # a run is on (else the C side's answers are for no one)
