"""Writes to /cvmfs fail as they do on a read-only mount: the kernel's errno, in the kernel's
order (ENOENT, ENOTDIR, EEXIST, EISDIR, EXDEV, EBUSY ... before EROFS), and an open with
O_CREAT of a file that is there opens it.

The oracle is the kernel itself: the same probe runs over a read-only bind mount of the
published source tree (in a user and mount namespace of its own) and under hep-exec over the
repository, and must print the same lines.  Before trap/readonly.c every such write was
EROFS: ``except FileExistsError`` around an ``os.mkdir`` of a directory that is there failed,
``chmod`` of a missing file said EROFS, and ``open(f, O_RDONLY | O_CREAT)`` failed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import hep_exec, serving
from tests.support.read_only_mount import make_probe_tree, on_a_read_only_mount
from tests.support.tracing import ensure_built

pytestmark = pytest.mark.slow  # real servers and traced programs

FQRN = "readonly.test.org"

# Every write the kernel checks, on every kind of path: each line "<call> <path> <result>".
PROBE = r"""
import errno, os, stat, sys
root, host = sys.argv[1], sys.argv[2]

def row(label, f):
    try:
        f()
        out = "ok"
    except OSError as e:
        out = errno.errorcode.get(e.errno, str(e.errno))
    print(label, out)

def opened(path, flags, **kw):
    os.close(os.open(path, flags, 0o644, **kw))

OPENS = {
    "RDONLY": os.O_RDONLY, "WRONLY": os.O_WRONLY, "RDWR": os.O_RDWR,
    "RDONLY|CREAT": os.O_RDONLY | os.O_CREAT, "WRONLY|CREAT": os.O_WRONLY | os.O_CREAT,
    "CREAT|EXCL": os.O_WRONLY | os.O_CREAT | os.O_EXCL, "RDONLY|TRUNC": os.O_RDONLY | os.O_TRUNC,
    "WRONLY|TRUNC": os.O_WRONLY | os.O_TRUNC,
    "CREAT|NOFOLLOW": os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW,
    "TRUNC|NOFOLLOW": os.O_RDONLY | os.O_TRUNC | os.O_NOFOLLOW,
    "CREAT|DIRECTORY|EXCL": os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECTORY,
    "TRUNC|DIRECTORY": os.O_RDONLY | os.O_TRUNC | os.O_DIRECTORY,
    "WRONLY|DIRECTORY": os.O_WRONLY | os.O_DIRECTORY, "PATH|CREAT": os.O_PATH | os.O_CREAT,
    "TMPFILE": os.O_WRONLY | os.O_TMPFILE, "TMPFILE|RDONLY": os.O_RDONLY | os.O_TMPFILE,
}
PATHS = ["f", "d", "e", "f/", "d/", "d/.", "d/..", "d/inner", "d/nothere", "nothere",
         "nothere/", "nothere/deeper", "f/x", "link_f", "link_d", "dangling", "link_f/"]
for rel in PATHS:
    p = os.path.join(root, rel)
    for name, flags in OPENS.items():
        row(f"open {rel} {name}", lambda: opened(p, flags))
    row(f"mkdir {rel}", lambda: os.mkdir(p))
    row(f"rmdir {rel}", lambda: os.rmdir(p))
    row(f"unlink {rel}", lambda: os.unlink(p))
    row(f"mknod {rel}", lambda: os.mknod(p, 0o600 | stat.S_IFREG))
    row(f"mkfifo {rel}", lambda: os.mkfifo(p))
    row(f"mknod-dir {rel}", lambda: os.mknod(p, 0o600 | stat.S_IFDIR))
    row(f"symlink {rel}", lambda: os.symlink("t", p))
    row(f"chmod {rel}", lambda: os.chmod(p, 0o700))
    row(f"chown {rel}", lambda: os.chown(p, -1, -1))
    row(f"lchown {rel}", lambda: os.lchown(p, -1, -1))
    row(f"utime {rel}", lambda: os.utime(p))
    row(f"lutime {rel}", lambda: os.utime(p, follow_symlinks=False))
    row(f"truncate {rel}", lambda: os.truncate(p, 0))
    row(f"setxattr {rel}", lambda: os.setxattr(p, "user.x", b"1"))
    row(f"lremovexattr {rel}", lambda: os.removexattr(p, "user.x", follow_symlinks=False))
    row(f"rename {rel} d/new", lambda: os.rename(p, os.path.join(root, "d/new")))
    row(f"rename f {rel}", lambda: os.rename(os.path.join(root, "f"), p))
    row(f"rename {rel} host/new", lambda: os.rename(p, host + "/new"))
    row(f"rename {rel} host/missing/x", lambda: os.rename(p, host + "/missing/x"))
    row(f"rename host/exists {rel}", lambda: os.rename(host + "/exists", p))
    row(f"link {rel} d/new", lambda: os.link(p, os.path.join(root, "d/new")))
    row(f"link f {rel}", lambda: os.link(os.path.join(root, "f"), p))
    row(f"link {rel} host/new", lambda: os.link(p, host + "/new"))
    row(f"link {rel} host/exists", lambda: os.link(p, host + "/exists"))
    row(f"link -L {rel} host/new", lambda: os.link(p, host + "/new", follow_symlinks=True))
    row(f"link host/exists {rel}", lambda: os.link(host + "/exists", p))
# relative to the working directory and to a directory's fd
os.chdir(os.path.join(root, "d"))
for rel in [".", "..", "inner", "new"]:
    row(f"cwd mkdir {rel}", lambda: os.mkdir(rel))
    row(f"cwd rmdir {rel}", lambda: os.rmdir(rel))
    row(f"cwd unlink {rel}", lambda: os.unlink(rel))
    row(f"cwd open-creat {rel}", lambda: opened(rel, os.O_RDONLY | os.O_CREAT))
    row(f"cwd rename {rel} x", lambda: os.rename(rel, "x"))
    row(f"cwd rename inner {rel}", lambda: os.rename("inner", rel))
fd = os.open(os.path.join(root, "d"), os.O_RDONLY | os.O_DIRECTORY)
for rel in ["inner", "new", "..", "inner/x"]:
    row(f"at mkdir {rel}", lambda: os.mkdir(rel, dir_fd=fd))
    row(f"at unlink {rel}", lambda: os.unlink(rel, dir_fd=fd))
    row(f"at rmdir {rel}", lambda: os.rmdir(rel, dir_fd=fd))
    row(f"at open-creat {rel}", lambda: opened(rel, os.O_RDONLY | os.O_CREAT, dir_fd=fd))
    row(f"at chmod {rel}", lambda: os.chmod(rel, 0o700, dir_fd=fd))
# an fd of a file of the tree, linked elsewhere (linkat AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH:
# through /proc/self/fd, as unprivileged programs do)
ffd = f"/proc/self/fd/{os.open(os.path.join(root, 'f'), os.O_RDONLY)}"
row("link-fd host/new", lambda: os.link(ffd, host + "/new", follow_symlinks=True))
row("link-fd d/new", lambda: os.link(ffd, os.path.join(root, "d/new"), follow_symlinks=True))
"""


@dataclass(frozen=True)
class Tree:
    proxy: str
    key: Path
    src: Path
    host: Path  # a host directory the probe's renames and links point into


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    ensure_built()
    base = tmp_path_factory.mktemp("readonly")
    src = base / "src"
    make_probe_tree(src)
    host = base / "host"
    host.mkdir()
    (host / "exists").write_bytes(b"a host file\n")
    with serving(src, FQRN, base) as (proxy, repo):
        yield Tree(proxy, repo.master_pub, src, host)


def test_writes_fail_as_on_a_read_only_mount(
    tree: Tree, tmp_path: Path, trap_mode: str, ram_files: str
) -> None:
    native = on_a_read_only_mount(
        tree.src, tmp_path / "mnt", ["python3", "-c", PROBE, "{mnt}", str(tree.host)]
    )
    lines = native.splitlines()
    # what the kernel says, so that the oracle is known to be one
    for expected in [
        "mkdir d EEXIST", "mkdir nothere EROFS", "mkdir nothere/deeper ENOENT",
        "chmod nothere ENOENT", "open f RDONLY|CREAT ok", "open f CREAT|EXCL EEXIST",
        "open d WRONLY EISDIR", "truncate d EISDIR", "rename f host/new EXDEV",
        "link f host/exists EEXIST", "cwd rmdir . EINVAL", "cwd rmdir .. ENOTEMPTY",
        "link-fd host/new EXDEV", "open link_f RDONLY|CREAT ok", "mkdir f/x ENOTDIR",
    ]:  # fmt: skip
        assert expected in lines, expected
    assert len(lines) > 700
    root = f"/cvmfs/{FQRN}"
    twice = f'python3 -c "$0" {root} {tree.host} && python3 -c "$0" {root} {tree.host}'
    r = hep_exec(tree.proxy, ["sh", "-c", twice, PROBE], keys=tree.key)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout[: len(r.stdout) // 2], r.stdout[len(r.stdout) // 2 :]
    wrong = [(a, b) for a, b in zip(native.splitlines(), first.splitlines(), strict=True) if a != b]
    assert not wrong, wrong
    assert first == native  # every line
    assert second == native  # the second time, from the answers at hand
    assert sorted(os.listdir(tree.host)) == ["exists"]  # nothing made on the host either


TOP = r"""
import errno, os, sys
for path in sys.argv[1:]:
    try:
        os.mkdir(path)
    except OSError as e:
        print(path, errno.errorcode[e.errno])
"""


def test_mkdir_of_the_mount_and_its_names(tree: Tree) -> None:
    """/cvmfs and a repository's root are there (EEXIST, as mkdir -p and os.makedirs expect);
    a new name in /cvmfs is autofs's to refuse: EACCES, or EROFS to root."""
    names = ["/cvmfs", f"/cvmfs/{FQRN}", "/cvmfs/no-such.org"]
    r = hep_exec(tree.proxy, ["python3", "-c", TOP, *names], keys=tree.key)
    assert r.returncode == 0, r.stderr
    new = "EROFS" if os.geteuid() == 0 else "EACCES"
    assert r.stdout.splitlines() == [
        "/cvmfs EEXIST", f"/cvmfs/{FQRN} EEXIST", f"/cvmfs/no-such.org {new}"
    ]  # fmt: skip
