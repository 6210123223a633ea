"""What /proc/<pid>/maps and smaps say of /cvmfs files under hep-exec: their /cvmfs paths, as
under the real client, not the names of the RAM files that hold their bytes.

Why: the kernel names a mapping by the file mapped, and an open /cvmfs file is one of the
cache's RAM files: a library of the stack showed as ``/6a9ecf61…`` (a file of a tmpfs that
no path reaches) or ``/memfd:… (deleted)``.  A program that finds its own files through its
maps (its directory, next to its library; a profiler or crash handler naming libraries)
found names that lead nowhere.  :func:`with_cvmfs_paths` is the table (bytes in, bytes out);
:class:`OpenedFiles` knows which /cvmfs path each RAM file stands for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection

MAX_MAPS = 16 << 20  # a table larger than this is not read: the kernel's is answered
DELETED = b" (deleted)"  # the kernel's mark on a file unlinked while mapped


def _is_range(field: bytes) -> bool:
    lo, sep, hi = field.partition(b"-")
    return bool(sep and lo and hi) and all(c in b"0123456789abcdef" for c in lo + hi)


def with_cvmfs_paths(
    real: bytes, path_of: Callable[[int, bytes], bytes | None], marks: Collection[bytes]
) -> bytes | None:
    """``real`` (a maps or smaps table) with each mapping ``path_of(st_dev, name)`` knows
    named by the /cvmfs path it gives, the columns before the name kept; None where no
    mapping's name changed (the kernel's own table is then the answer).  Only lines holding
    one of ``marks`` are looked at (a program's table is read at every open of it: most
    lines, and most tables, name none of our files)."""
    if not any(mark in real for mark in marks):
        return None
    out: list[bytes] = []
    changed = False
    for line in real.splitlines(keepends=True):
        if not any(mark in line for mark in marks):
            out.append(line)
            continue
        fields = line.split(None, 5)  # range, perms, offset, device, inode, name
        if len(fields) == 6 and _is_range(fields[0]):
            end = b"\n" if line.endswith(b"\n") else b""
            name = fields[5][: len(fields[5]) - len(end)]
            major, colon, minor = fields[3].partition(b":")
            try:
                dev = os.makedev(int(major, 16), int(minor, 16)) if colon else -1
            except ValueError:
                dev = -1
            path = path_of(dev, name) if dev >= 0 else None
            if path is not None:
                start = len(line) - len(fields[5])  # where the name begins
                line = line[:start] + path.replace(b"\n", b"\\012") + end
                changed = True
        out.append(line)
    return b"".join(out) if changed else None


class OpenedFiles:
    """Which /cvmfs path each RAM file was handed out for (the last: paths with the same
    bytes share one file).  /proc/<pid>/exe of a program run through an fd on one (fexecve)
    and the maps of a program that mapped one name the RAM file; the program expects the
    /cvmfs path."""

    def __init__(self) -> None:
        self.by_name: dict[bytes, bytes] = {}  # as /proc names the file -> /cvmfs path
        self._dirs: dict[bytes, int | None] = {}  # /proc/P/fd/DIR of files by name -> st_dev
        self._memfds = False  # memfds among them

    def note(self, target: bytes, path: bytes) -> None:
        """``target``: the RAM file an open of ``path`` was answered with."""
        parts = target.split(b"/")
        if len(parts) == 6 and parts[1] == b"proc" and parts[3] == b"fd":
            self.by_name[b"/" + parts[5]] = path  # a file by name: /proc/P/fd/DIR/NAME
            self._dirs.setdefault(b"/".join(parts[:5]), None)
        elif len(parts) == 5 and parts[1] == b"proc" and parts[3] == b"fd":
            with contextlib.suppress(OSError):  # a memfd: /proc/P/fd/N
                self.by_name[os.readlink(target)] = path
                self._memfds = True

    def mapped(self, dev: int, name: bytes) -> bytes | None:
        """The /cvmfs path of a mapping of ``name`` on device ``dev`` (a maps line's), or
        None: not one of our RAM files."""
        if name.startswith(b"/memfd:"):
            return self.by_name.get(name)
        path = self.by_name.get(name.removesuffix(DELETED))
        return path if path is not None and dev in self._devices() else None

    def marks(self) -> list[bytes]:
        """What a maps line of one of these files holds: its device, or a memfd's name."""
        devs = [b" %02x:%02x " % (os.major(d), os.minor(d)) for d in self._devices()]
        return [*devs, b" /memfd:"] if self._memfds else devs

    def _devices(self) -> set[int]:
        """The file systems of the RAM files handed out by name (each directory's, once)."""
        for d, dev in self._dirs.items():
            if dev is None:
                with contextlib.suppress(OSError):
                    self._dirs[d] = os.stat(d).st_dev
        return {dev for dev in self._dirs.values() if dev is not None}


def maps_with_cvmfs_paths(table: bytes, opened: OpenedFiles) -> bytes | None:
    """The process's table (``/proc/<pid>/maps`` or ``smaps``) as :func:`with_cvmfs_paths`
    makes it; None where it names none of our RAM files or cannot be read."""
    parts: list[bytes] = []
    size = 0
    try:
        fd = os.open(table, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:  # (read by chunks: a read of MAX_MAPS at once costs the allocation of that much)
        while size <= MAX_MAPS and (chunk := os.read(fd, 1 << 16)):
            parts.append(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    if size > MAX_MAPS:
        return None
    return with_cvmfs_paths(b"".join(parts), opened.mapped, opened.marks())
