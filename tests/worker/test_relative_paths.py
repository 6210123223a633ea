"""Relative paths answered inside the program: to the working directory or to a dirfd, in
/cvmfs (as the absolute path would be) and on the host (made as given, where the tracer would
let them through).  The oracle is the tracer's own answer (``--no-in-process``) and the
published tree; the counts say the calls no longer stop the program."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hep_exec import (
    CLI,
    World,
    cvmfs_stops,
    hep_exec,
    hep_exec_cmd,
    in_and_out_of_process,
    stops,
    world_of,
)
from tests.support.tracing import ensure_built, env_with, needs_ptrace, ram_dir

pytestmark = [needs_ptrace, pytest.mark.slow]

FQRN = "relative.test.org"
MOUNT = f"/cvmfs/{FQRN}"
ROUNDS = 20  # each call this often: the first ones stop (their call sites get patched)

# argv: the host area, the mount.  Every call is made ROUNDS times; one line per call.
SCRIPT = r"""
import os, sys
area, mount, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])

def ask(what, call):
    for _ in range(rounds):
        try:
            r = call()
            out = r.st_size if hasattr(r, "st_size") else r
        except OSError as e:
            out = os.strerror(e.errno)
    print(what, out)

def read(path, **kw):
    fd = os.open(path, os.O_RDONLY, **kw)
    try:
        return os.read(fd, 1 << 20).hex()[:40] + f" {os.fstat(fd).st_size}"
    finally:
        os.close(fd)

PLAIN = ["f00", "sub/g", "link", "missing", "f00/below", "sub/up/f00", "file", "deep/er/file"]
names = PLAIN if sys.argv[4:] == ["plain"] else PLAIN + ["sub/../f00", ".", "..", "sub/",
                                                         "into/f00", "into/nosuch"]

def ops(where, dir_fd=None):
    kw = {} if dir_fd is None else {"dir_fd": dir_fd}
    for name in names:
        ask(f"{where} stat {name}", lambda: os.stat(name, **kw))
        ask(f"{where} lstat {name}", lambda: os.lstat(name, **kw))
        ask(f"{where} access {name}", lambda: os.access(name, os.R_OK, **kw))
        ask(f"{where} open {name}", lambda: read(name, **kw))
    ask(f"{where} readlink link", lambda: os.readlink("link", **kw))
    if names is PLAIN:
        return
    ask(f"{where} readlink into", lambda: os.readlink("into", **kw))
    ask(f"{where} write f00", lambda: os.open("f00", os.O_WRONLY, **kw))
    ask(f"{where} create new", lambda: os.open("new", os.O_WRONLY | os.O_CREAT, 0o644, **kw))

os.chdir(mount)
ops("cvmfs-cwd")
os.chdir(mount + "/sub")
ask("cvmfs-sub-cwd stat g", lambda: os.stat("g"))
ask("cvmfs-sub-cwd stat ../f00", lambda: os.stat("../f00"))
os.chdir(area)
ops("host-cwd")
os.chdir("/")
fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
ops("cvmfs-dirfd", fd)
os.close(fd)
fd = os.open(area, os.O_RDONLY | os.O_DIRECTORY)
ops("host-dirfd", fd)
os.close(fd)
if names is not PLAIN:  # a directory reached through a symlink: ".." is its real parent's
    fd = os.open(mount + "/dlink", os.O_RDONLY | os.O_DIRECTORY)
    ask("cvmfs-linked-dirfd stat ../f01", lambda: os.stat("../f01", dir_fd=fd))
    ask("cvmfs-linked-dirfd stat file", lambda: os.stat("file", dir_fd=fd))
    ask("cvmfs-linked-dirfd open ../f01", lambda: read("../f01", dir_fd=fd))
    ask("cvmfs-linked-dirfd listdir .", lambda: sorted(os.listdir(fd)))
    os.close(fd)
    os.chdir(mount + "/dlink")
    ask("cvmfs-linked-cwd stat ../f01", lambda: os.stat("../f01"))
    ask("cvmfs-linked-cwd getcwd .", lambda: os.getcwd())
    # from the host directories whose entries lead to the tracer's files: "/", /etc, /proc
    def lists(name, **kw):
        with open(os.open(name, os.O_RDONLY, **kw)) as f:
            return mount in f.read()
    os.chdir("/")
    ask("root-cwd lists etc/mtab", lambda: lists("etc/mtab"))
    ask("root-cwd lists proc/self/mounts", lambda: lists("proc/self/mounts"))
    ask("root-cwd stat repository-f00", lambda: os.stat(mount[1:] + "/f00"))
    etc = os.open("/etc", os.O_RDONLY | os.O_DIRECTORY)
    ask("etc-dirfd lists mtab", lambda: lists("mtab", dir_fd=etc))
    proc = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
    ask("proc-dirfd lists mounts", lambda: lists("mounts", dir_fd=proc))
    # leading ".." from a host directory, up to "/" and down again
    os.chdir(area + "/deep")
    up = "../" * len(os.getcwd().strip("/").split("/"))
    ask("host-up stat ../file", lambda: os.stat("../file"))
    ask("host-up stat ../into/f00", lambda: os.stat("../into/f00"))
    ask("host-up stat ../missing", lambda: os.stat("../missing"))
    ask("host-up lists mounts", lambda: lists(up + "proc/self/mounts"))
    ask("host-up lists mtab", lambda: lists(up + "etc/mtab"))
    ask("host-up stat repository-f00", lambda: os.stat(up + mount[1:] + "/f00"))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ensure_built()
    with ram_dir() as src:
        top = src / "tree"
        (top / "sub").mkdir(parents=True)
        (top / "deep" / "er").mkdir(parents=True)
        (top / "f00").write_bytes(os.urandom(5000))
        (top / "sub" / "g").write_bytes(os.urandom(300))
        (top / "deep" / "er" / "file").write_bytes(b"in the repository\n")
        (top / "link").symlink_to("f00")
        (top / "sub" / "up").symlink_to("..")
        (top / "deep" / "f01").write_bytes(os.urandom(777))
        (top / "f01").write_bytes(os.urandom(111))  # where a ".." taken lexically would go
        (top / "dlink").symlink_to("deep/er")
        with world_of(top, FQRN, tmp_path_factory.mktemp("relative")) as world:
            yield world


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """A host directory with files, a missing name, and a symlink into the repository."""
    a = tmp_path / "area"
    (a / "deep" / "er").mkdir(parents=True)
    (a / "file").write_bytes(b"host file\n")
    (a / "deep" / "er" / "file").write_bytes(b"on the host\n")
    (a / "into").symlink_to(MOUNT)
    return a


def test_relative_paths_get_the_tracer_s_answers_without_stopping(world: World, area: Path) -> None:
    """The same answers in-process as from the tracer, for relative paths from a /cvmfs
    directory and from a host one, to the cwd and to a dirfd: files, symlinks, a missing name,
    a name below a file, ".." (also through a symlink in the repository, and from a directory
    opened or entered through one: its real parent's, as the kernel's), a host symlink into
    the repository, writes (EROFS in /cvmfs), the mount tables and the repository named from
    "/", /etc and /proc, or climbing there with ".." from a host directory (the tracer's,
    however named); and far fewer stops."""
    lines, _ = in_and_out_of_process(
        world.proxy, [sys.executable, "-c", SCRIPT, str(area), MOUNT, str(ROUNDS)]
    )
    said = {" ".join(ln.split(" ")[:3]): ln.split(" ", 3)[3] for ln in lines}
    size = {p: (world.src / p).stat().st_size for p in ("f00", "sub/g", "deep/er/file")}
    for where in ("cvmfs-cwd", "cvmfs-dirfd"):
        assert said[f"{where} stat f00"] == str(size["f00"])
        assert said[f"{where} stat sub/g"] == str(size["sub/g"])
        assert said[f"{where} stat sub/../f00"] == str(size["f00"])
        assert said[f"{where} stat sub/up/f00"] == str(size["f00"])
        assert said[f"{where} stat deep/er/file"] == str(size["deep/er/file"])
        assert said[f"{where} stat missing"] == os.strerror(2)
        assert said[f"{where} stat f00/below"] == os.strerror(20)
        assert said[f"{where} readlink link"] == "f00"
        assert said[f"{where} open f00"].endswith(f" {size['f00']}")
        assert said[f"{where} write f00"] == os.strerror(30)  # EROFS
        assert said[f"{where} create new"] == os.strerror(30)
    for where in ("host-cwd", "host-dirfd"):
        assert said[f"{where} stat file"] == str(len(b"host file\n"))
        assert said[f"{where} stat deep/er/file"] == str(len(b"on the host\n"))
        assert said[f"{where} stat into/f00"] == str(size["f00"])  # through the host link
        assert said[f"{where} open into/f00"].endswith(f" {size['f00']}")
        assert said[f"{where} stat into/nosuch"] == os.strerror(2)
        assert said[f"{where} stat missing"] == os.strerror(2)
        assert said[f"{where} readlink into"] == MOUNT
    assert said["cvmfs-sub-cwd stat g"] == str(size["sub/g"])
    assert said["cvmfs-sub-cwd stat ../f00"] == str(size["f00"])
    deep_f01 = str((world.src / "deep" / "f01").stat().st_size)
    assert said["cvmfs-linked-dirfd stat ../f01"] == deep_f01
    assert said["cvmfs-linked-dirfd open ../f01"].endswith(f" {deep_f01}")
    assert said["cvmfs-linked-dirfd stat file"] == str(size["deep/er/file"])
    assert said["cvmfs-linked-dirfd listdir ."] == "['file']"
    assert said["cvmfs-linked-cwd stat ../f01"] == deep_f01
    assert said["cvmfs-linked-cwd getcwd ."] == f"{MOUNT}/deep/er"
    for line in ("root-cwd lists etc/mtab", "root-cwd lists proc/self/mounts",
                 "etc-dirfd lists mtab", "proc-dirfd lists mounts"):  # fmt: skip
        assert said[line] == "True", line
    assert said["root-cwd stat repository-f00"] == str(size["f00"])
    assert said["host-up stat ../file"] == str(len(b"host file\n"))
    assert said["host-up stat ../into/f00"] == str(size["f00"])  # (ENOENT from the kernel)
    assert said["host-up stat ../missing"] == os.strerror(2)
    assert said["host-up lists mounts"] == said["host-up lists mtab"] == "True"
    assert said["host-up stat repository-f00"] == str(size["f00"])
    assert (area / "new").exists(), "a create on the host is the kernel's"


def test_relative_paths_of_plain_names_do_not_stop_the_program(world: World, area: Path) -> None:
    """Relative paths of plain names (no ".", "..", "//"), from /cvmfs and from the host, to
    the cwd and to a dirfd: after each call site's first stops, answered inside the program
    (with ".." or through a host symlink into the repository they still stop, as before)."""
    argv = [sys.executable, "-c", SCRIPT, str(area), MOUNT, str(ROUNDS), "plain"]
    counts = {}
    for opt in ("--stats-internals", "--no-in-process"):
        r = hep_exec(world.proxy, argv, options=[opt, "--stats-internals"])
        assert r.returncode == 0, r.stderr
        counts[opt] = (stops(r.stderr), len(r.stdout.splitlines()) * ROUNDS)
    (fewer, calls), (every, _) = counts["--stats-internals"], counts["--no-in-process"]
    assert every > calls // 2 and fewer < calls // 20, (fewer, every, calls)


def test_dotted_relative_paths_do_not_stop_the_program(world: World) -> None:
    """Relative paths with "." components and doubled slashes, as cat, xargs and make give
    them ("./f00", "sub/./g", "./sub//g"), from a /cvmfs cwd: the published bytes, and after
    the call site's first stop, none stops the program.  Before, each open stopped: the
    tracer published answers, and patched the site, for plain names only, and nothing else
    took cat's open through the handler.  A trailing "/." stays ENOTDIR on a file."""
    names = ["./f00", "sub/./g", "./sub//g", "./link", "./deep/er/file"] * 8
    want = hashlib.sha1(b"".join((world.src / n).read_bytes() for n in names)).hexdigest()
    job = ["sh", "-c", f"cd {MOUNT} && cat {' '.join(names)} | sha1sum; cat ./f00/. 2>&1; true"]
    stopped = {}
    for opt in ("--stats-internals", "--no-in-process"):
        r = hep_exec(world.proxy, job, options=[opt, "--stats-internals"])
        assert r.returncode == 0, r.stderr
        digest, refused = r.stdout.splitlines()
        assert digest.split()[0] == want, opt
        assert refused.endswith("Not a directory"), (opt, refused)
        stopped[opt] = cvmfs_stops(r.stderr)
    fewer, every = stopped["--stats-internals"], stopped["--no-in-process"]
    assert every >= len(names) and fewer < len(names) // 4, (fewer, every)


# hep-exec where no private tmpfs can be mounted (no user namespaces): the shadow tree is a
# plain directory, here one on the same file system as a host directory the job works in
NO_PRIVATE_TMPFS = """
import errno, sys
import worker.trace._tmpfs as tmpfs, worker.trace.tracer as tracer, worker.cli as cli
def refused(*args):
    raise OSError(errno.EPERM, "no user namespaces here")
parent = sys.argv.pop(1)
tmpfs.mount = refused
tracer._shadow_parent = lambda: parent
sys.argv[0] = "hep-exec"
cli.entry()
"""


def test_a_shadow_tree_on_the_host_s_file_system_keeps_its_paths(
    world: World, tmp_path: Path
) -> None:
    """Where the shadow tree is a plain directory (no private tmpfs) on a file system that
    host directories share, a relative path from a /cvmfs directory is still the
    repository's (its mirror there is not a host directory), and one from a host directory
    on that file system the host's."""
    (tmp_path / "shadow").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "here").write_bytes(b"x" * 77)
    work = tmp_path / "work"
    code = (
        f"import os\nfor _ in range({ROUNDS}):\n"
        f"    os.chdir('{MOUNT}'); a = os.stat('f00').st_size\n"
        f"    os.chdir('{work}'); b = os.stat('here').st_size\n"
        "print(a, b)"
    )
    argv = hep_exec_cmd(world.proxy, [sys.executable, "-c", code])
    assert argv[: len(CLI)] == CLI
    argv = [sys.executable, "-c", NO_PRIVATE_TMPFS, str(tmp_path / "shadow"), *argv[len(CLI) :]]
    r = subprocess.run(argv, env=env_with(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str((world.src / "f00").stat().st_size), "77"], r.stderr
    assert not [p for p in (tmp_path / "shadow").iterdir()], "the shadow tree was removed"
