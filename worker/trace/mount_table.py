"""The mount tables a job reads (/proc/<pid>/mountinfo, /proc/<pid>/mounts, /proc/mounts,
/etc/mtab) as under the real client: the host's, with /cvmfs an autofs mount and each
repository mounted so far a FUSE mount of cvmfs2 on it, with the device numbers stat says.

Why: mountpoint(1), findmnt, df, ``mount | grep cvmfs`` and libmount read these tables, not
stat: ``mountpoint -q /cvmfs/cms.cern.ch`` said no, and df named / as the file system of
every /cvmfs path.  :func:`with_cvmfs` is the table (bytes in, bytes out);
:class:`MountTables` hands the tracer a file holding it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from worker.trace.table_files import TableFiles

AUTOFS = b"/etc/auto.cvmfs"  # the map a site's autofs mounts /cvmfs with
FUSE_OPTIONS = b"ro,nosuid,nodev,relatime"  # the mount's (mountinfo's 6th field)
FUSE_PRIVATE = b"user_id=0,group_id=0,default_permissions,allow_other"  # FUSE's own
FUSE_SUPER = b"ro," + FUSE_PRIVATE  # the super block's (mountinfo's last field)
MAX_TABLE = 16 << 20  # a mount table larger than this is not read: the host's is answered


def _escape(path: bytes) -> bytes:
    """A path as the kernel writes it in a mount table (space, tab, newline, backslash)."""
    for ch, esc in ((b"\\", b"\\134"), (b" ", b"\\040"), (b"\t", b"\\011"), (b"\n", b"\\012")):
        path = path.replace(ch, esc)
    return path


def _below(point: bytes, mount: bytes) -> bool:
    return point == mount or point.startswith(mount + b"/")


def with_cvmfs(
    real: bytes, mountinfo: bool, mount: bytes, mount_dev: int, repos: Sequence[tuple[str, int]]
) -> bytes:
    """``real`` (a mountinfo table if ``mountinfo``, else a mounts one) without whatever it
    had at or below ``mount``, with ``mount`` (device ``mount_dev``) and each of ``repos``
    ((name, st_dev)) mounted on it after the mount it stands on."""
    point_at = 4 if mountinfo else 1
    lines, ids, parent, parent_len = [], [0], 0, -1
    escaped = _escape(mount)
    for line in real.splitlines():
        fields = line.split(b" ")
        if len(fields) <= point_at or _below(fields[point_at], escaped):
            continue
        lines.append(line)
        if mountinfo and fields[0].isdigit():
            ids.append(int(fields[0]))
            point = fields[point_at]
            if (point == b"/" or _below(escaped, point)) and len(point) >= parent_len:
                parent, parent_len = int(fields[0]), len(point)
    top = max(ids) + 1
    if mountinfo:
        dev = b"%d:%d" % (os.major(mount_dev), os.minor(mount_dev))
        autofs = (top, parent, dev, escaped, AUTOFS)
        lines.append(b"%d %d %s / %s rw,relatime - autofs %s rw,indirect" % autofs)
    else:
        lines.append(b"%s %s autofs rw,relatime,indirect 0 0" % (AUTOFS, escaped))
    for i, (name, st_dev) in enumerate(repos, 1):
        point = escaped + b"/" + _escape(os.fsencode(name))
        if mountinfo:
            dev = b"%d:%d" % (os.major(st_dev), os.minor(st_dev))
            fuse = (top + i, top, dev, point, FUSE_OPTIONS, FUSE_SUPER)
            lines.append(b"%d %d %s / %s %s - fuse cvmfs2 %s" % fuse)
        else:
            lines.append(b"cvmfs2 %s fuse %s,%s 0 0" % (point, FUSE_OPTIONS, FUSE_PRIVATE))
    return b"".join(line + b"\n" for line in lines)


class MountTables:
    """Files holding a process's mount table as :func:`with_cvmfs` makes it, one per open
    (worker.trace.table_files)."""

    def __init__(
        self,
        mount: bytes,
        mount_dev: int,
        mounted: Callable[[], Sequence[tuple[str, int]]],
        files: TableFiles,
    ) -> None:
        self.mount, self.mount_dev, self.mounted = mount, mount_dev, mounted
        self.files = files

    def file_for(self, table: bytes) -> bytes | None:
        """``table`` (``/proc/<pid>/mountinfo`` or ``…/mounts``) with /cvmfs in it: the path
        of a file holding it, or None where the host's cannot be read (the kernel answers)."""
        try:
            with open(table, "rb") as f:
                real = f.read(MAX_TABLE + 1)
        except OSError:
            return None
        if len(real) > MAX_TABLE:
            return None
        data = with_cvmfs(
            real, table.endswith(b"/mountinfo"), self.mount, self.mount_dev, self.mounted()
        )
        return self.files.file_of(data, "mount-table")
