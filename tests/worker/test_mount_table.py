"""The mount tables a job reads list /cvmfs (autofs) and each repository it mounted (FUSE,
cvmfs2) with the device numbers stat says, as under the real client: mountpoint(1), findmnt,
df and libmount see the repositories (before: ``mountpoint /cvmfs/<fqrn>`` said no, and df
named / for every /cvmfs path)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import hep_exec, serving
from tests.support.tracing import compile_c, ensure_built
from worker.trace.mount_table import with_cvmfs
from worker.trace.policy import repository_dev

FQRN = "tables.test.org"
ROOT = f"/cvmfs/{FQRN}"

HOST_MOUNTINFO = b"""\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
24 22 0:30 / /cvmfs rw,relatime shared:9 - autofs systemd-1 rw,fd=5,indirect
25 24 0:31 / /cvmfs/old.example.org ro,relatime - fuse cvmfs2 ro
26 22 0:32 / /tmp/with\\040space rw - tmpfs tmpfs rw
27 22 0:33 / /cvmfsx rw - tmpfs tmpfs rw
"""
HOST_MOUNTS = b"""\
/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
cvmfs2 /cvmfs/old.example.org fuse ro 0 0
"""


def test_mountinfo_gets_the_mount_and_the_repositories_on_it() -> None:
    """The host's lines at or below /cvmfs give way (a node's own cvmfs is not ours to show);
    /cvmfs stands on the mount of its longest parent; each repository on /cvmfs, with its
    st_dev as major:minor; the other lines as they were, in order."""
    repos = [("a.example.org", repository_dev("a.example.org")), ("b.org", os.makedev(0, 7))]
    out = with_cvmfs(HOST_MOUNTINFO, True, b"/cvmfs", os.makedev(0, 42), repos).splitlines()
    assert out[:4] == [
        b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
        b"23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw",
        b"26 22 0:32 / /tmp/with\\040space rw - tmpfs tmpfs rw",
        b"27 22 0:33 / /cvmfsx rw - tmpfs tmpfs rw",
    ]
    assert out[4] == b"28 22 0:42 / /cvmfs rw,relatime - autofs /etc/auto.cvmfs rw,indirect"
    dev = repository_dev("a.example.org")
    assert out[5] == (
        b"29 28 %d:%d / /cvmfs/a.example.org ro,nosuid,nodev,relatime - fuse cvmfs2 "
        b"ro,user_id=0,group_id=0,default_permissions,allow_other" % (os.major(dev), os.minor(dev))
    )
    assert out[6].startswith(b"30 28 0:7 / /cvmfs/b.org ") and len(out) == 7


def test_mounts_gets_them_in_its_own_format() -> None:
    out = with_cvmfs(HOST_MOUNTS, False, b"/cvmfs", 1, [("a.org", 5)]).splitlines()
    assert out == [
        b"/dev/vda / ext4 rw,relatime 0 0",
        b"proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0",
        b"/etc/auto.cvmfs /cvmfs autofs rw,relatime,indirect 0 0",
        b"cvmfs2 /cvmfs/a.org fuse ro,nosuid,nodev,relatime,user_id=0,group_id=0,"
        b"default_permissions,allow_other 0 0",
    ]


@dataclass(frozen=True)
class Served:
    proxy: str
    key: Path
    statx: Path  # prints whether statx says a path is a mount's root


STATX = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        struct statx x;
        if (statx(AT_FDCWD, argv[i], 0, STATX_BASIC_STATS, &x) != 0)
            return 1;
        printf("statx mount-root %d %d\n", !!(x.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT),
               !!(x.stx_attributes & STATX_ATTR_MOUNT_ROOT));
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    ensure_built()
    base = tmp_path_factory.mktemp("tables")
    src = base / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"in a repository\n")
    statx = compile_c(STATX, base / "statx")
    with serving(src, FQRN, base) as (proxy, repo):
        yield Served(proxy, repo.master_pub, statx)


# util-linux's and coreutils' own answers, and what a Python program would look at
PROBE = f"""
mountpoint -q {ROOT} && echo mountpoint yes || echo mountpoint no
mountpoint -q {ROOT}/d && echo d-mountpoint yes || echo d-mountpoint no
findmnt -rn -o TARGET,FSTYPE,SOURCE -T {ROOT}/d/f
findmnt -rn -o TARGET,FSTYPE /cvmfs
df --output=target {ROOT}/d/f | tail -1
stat -f -c %T {ROOT}/d/f
grep -c " {ROOT} fuse " /proc/mounts /etc/mtab /proc/self/mounts
python3 -c "
import os
st = os.stat('{ROOT}/d/f')
line = [ln for ln in open('/proc/self/mountinfo') if ' {ROOT} ' in ln][0]
print('same device', line.split()[2] == '%d:%d' % (os.major(st.st_dev), os.minor(st.st_dev)))
print('ismount', os.path.ismount('{ROOT}'), os.path.ismount('{ROOT}/d'))
"
$0 {ROOT} {ROOT}/d {ROOT}/d/f
"""


@pytest.mark.slow
def test_tools_see_the_repository_mounted(served: Served, trap_mode: str) -> None:
    if not (shutil.which("findmnt") and shutil.which("mountpoint")):
        pytest.skip("util-linux's findmnt and mountpoint are not installed")
    r = hep_exec(served.proxy, ["sh", "-c", PROBE, str(served.statx)], keys=served.key)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "mountpoint yes",
        "d-mountpoint no",
        f"{ROOT} fuse cvmfs2",
        "/cvmfs autofs",
        ROOT,
        "fuseblk",  # (coreutils' name for FUSE_SUPER_MAGIC)
        "/proc/mounts:1",
        "/etc/mtab:1",
        "/proc/self/mounts:1",
        "same device True",
        "ismount True False",
        "statx mount-root 1 1",
        "statx mount-root 1 0",
        "statx mount-root 1 0",
    ], r.stdout
