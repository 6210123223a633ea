"""Host calls made inside the program where the tracer would let them through: writes on
host paths (open with O_CREAT, mkdir, rename, chmod, utimensat, fchmod ...), while every
write that reaches /cvmfs (by its path, through a host symlink, a dirfd, the working
directory, an fd or /proc/self/fd/N) still fails with EROFS and leaves nothing behind; a
shell's "> /dev/null" and stat of "."; exec of host programs, and ld.so's calls in each new
one.  The oracle is the tracer's own answer (``--no-in-process``); the counts say these calls
no longer stop the program."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hep_exec import (
    World,
    hep_exec,
    hep_exec_cmd,
    in_and_out_of_process,
    stops,
    world_of,
)
from tests.support.tracing import compile_c, ensure_built, env_with, needs_ptrace, ram_dir

pytestmark = [needs_ptrace, pytest.mark.slow]

FQRN = "writes.test.org"
MOUNT = f"/cvmfs/{FQRN}"
ROUNDS = 12  # each call this often: the first ones stop (their call sites get patched)

# argv: the host area (with "into" -> MOUNT), the mount, rounds, "host" (only the host
# writes).  One line per call: what its last round said; then the host area as it ends up.
SCRIPT = r"""
import os, re, sys
area, mount, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
W, C = os.O_WRONLY, os.O_CREAT

def ask(what, call):
    for i in range(rounds):
        try:
            r = call(i)
            out = "ok"
            if isinstance(r, int):
                os.close(r)  # an fd: a write open that should not have worked
        except OSError as e:
            out = os.strerror(e.errno)
    print(f"{what}: {out}")

def host(i):
    fd = os.open(f"{area}/w{i}", W | C | os.O_TRUNC, 0o640)
    os.write(fd, b"x" * (i + 2))
    os.truncate(f"{area}/w{i}", i + 1)
    os.fchmod(fd, 0o600)
    os.utime(fd, (1000 + i, 2000 + i))
    os.fchown(fd, os.getuid(), os.getgid())
    os.close(fd)
    os.close(os.open(f"rel{i}", W | C | os.O_EXCL, 0o644))
    os.mkdir(f"d{i}")
    os.mkdir(f"{area}/d{i}/sub")
    os.rename(f"rel{i}", f"d{i}/moved")
    os.symlink(f"w{i}", f"{area}/s{i}")
    os.link(f"w{i}", f"d{i}/hard")
    os.chmod(f"d{i}", 0o750)
    os.chmod(f"d{i}/sub", 0o701, follow_symlinks=False)  # O_PATH, chmod /proc/self/fd/N
    os.utime(f"d{i}/moved", (3000, 4000 + i))
    os.utime(f"s{i}", (5, 6), follow_symlinks=False)
    os.unlink(f"d{i}/hard")
    dfd = os.open(area, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir(f"e{i}", dir_fd=dfd)
    os.rename(f"e{i}", f"f{i}", src_dir_fd=dfd, dst_dir_fd=dfd)
    os.rmdir(f"f{i}", dir_fd=dfd)
    os.close(dfd)

os.chdir(area)
ask("host writes", host)
if sys.argv[4:] != ["host"]:
    into, O = f"{area}/into", os.O_RDONLY
    ask("create via link", lambda i: os.open(f"{into}/new", W | C, 0o644))
    ask("write via link", lambda i: os.open(f"{into}/f00", W))
    ask("truncating open via link", lambda i: os.open(f"{into}/f00", os.O_RDWR | os.O_TRUNC))
    ask("mkdir via link", lambda i: os.mkdir(f"{into}/nd"))
    ask("mkdir via relative link", lambda i: os.mkdir("into/nd"))
    ask("unlink via link", lambda i: os.unlink(f"{into}/f00"))
    ask("rmdir via link", lambda i: os.rmdir(f"{into}/sub"))
    ask("rename into", lambda i: os.rename(f"{area}/w0", f"{into}/w0"))
    ask("rename out", lambda i: os.rename(f"{into}/f00", f"{area}/stolen"))
    ask("chmod via link", lambda i: os.chmod(f"{into}/f00", 0o600))
    ask("chmod nofollow via link", lambda i: os.chmod(f"{into}/sub", 0o700, follow_symlinks=False))
    ask("utime via link", lambda i: os.utime(f"{into}/f00", (1, 2)))
    ask("symlink via link", lambda i: os.symlink("t", f"{into}/l"))
    ask("link via link", lambda i: os.link(f"{area}/w0", f"{into}/hl"))
    ask("truncate via link", lambda i: os.truncate(f"{into}/f00", 0))
    ask("chown via link", lambda i: os.chown(f"{into}/f00", os.getuid(), os.getgid()))
    ask("create absolute", lambda i: os.open(f"{mount}/new", W | C, 0o644))
    ask("mkdir absolute", lambda i: os.mkdir(f"{mount}/nd"))
    ask("chmod absolute", lambda i: os.chmod(f"{mount}/f00", 0o600))
    fd, d = os.open(f"{mount}/f00", O), os.open(f"{mount}/sub", O | os.O_DIRECTORY)
    ask("fchmod file", lambda i: os.fchmod(fd, 0o600))
    ask("fchown file", lambda i: os.fchown(fd, os.getuid(), os.getgid()))
    ask("futimens file", lambda i: os.utime(fd, (1, 2)))
    ask("fchmod dir", lambda i: os.fchmod(d, 0o700))
    ask("chmod /proc/self/fd of a file", lambda i: os.chmod(f"/proc/self/fd/{fd}", 0o600))
    ask("chmod /proc/self/fd of a dir", lambda i: os.chmod(f"/proc/self/fd/{d}", 0o700))
    ask("mkdir at dirfd", lambda i: os.mkdir("nd", dir_fd=d))
    ask("create at dirfd", lambda i: os.open("new", W | C, 0o644, dir_fd=d))
    ask("unlink at dirfd", lambda i: os.unlink("g", dir_fd=d))
    os.chdir(f"{mount}/sub")
    ask("create in cwd", lambda i: os.open("new", W | C, 0o644))
    ask("mkdir in cwd", lambda i: os.mkdir("nd"))
    ask("rename in cwd", lambda i: os.rename("g", "h"))
    os.chdir(area)
    ask("create the link itself, exclusively", lambda i: os.open(into, W | C | os.O_EXCL))
    ask("mkdir the link itself", lambda i: os.mkdir(into))
    ask("unlink a missing host file", lambda i: os.unlink(f"{area}/missing{i}"))
    ask("mkdir an existing host directory", lambda i: os.mkdir(area))
    ask("unlink the link itself", lambda i: os.unlink("into") if i == 0 else None)
for top, dirs, files in sorted(os.walk(area)):
    dirs.sort()
    for name in sorted(dirs + files):
        p = os.path.join(top, name)
        st = os.lstat(p)
        print("entry", os.path.relpath(p, area), oct(st.st_mode), st.st_size,
              int(st.st_mtime) if re.fullmatch(r"w\d+|moved|s\d+", name) else "-",
              os.readlink(p) if os.path.islink(p) else "")
"""

WRITES_TO_CVMFS = [
    "create via link", "write via link", "truncating open via link", "mkdir via link",
    "mkdir via relative link", "unlink via link", "rmdir via link", "rename into",
    "rename out", "chmod via link", "chmod nofollow via link", "utime via link",
    "symlink via link", "link via link", "truncate via link", "chown via link",
    "create absolute", "mkdir absolute", "chmod absolute", "fchmod file", "fchown file",
    "futimens file", "fchmod dir", "chmod /proc/self/fd of a file",
    "chmod /proc/self/fd of a dir", "mkdir at dirfd", "create at dirfd", "unlink at dirfd",
    "create in cwd", "mkdir in cwd", "rename in cwd",
]  # fmt: skip
ACROSS = {"rename into", "rename out"}  # between the host and /cvmfs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ensure_built()
    with ram_dir() as src:
        top = src / "tree"
        (top / "sub").mkdir(parents=True)
        (top / "f00").write_bytes(os.urandom(5000))
        (top / "sub" / "g").write_bytes(os.urandom(300))
        (top / "interp.sh").write_text('#!/bin/sh\necho "interp $*"\n')
        (top / "interp.sh").chmod(0o755)
        with world_of(top, FQRN, tmp_path_factory.mktemp("writes")) as world:
            yield world


def fresh_area(path: Path) -> Path:
    path.mkdir()
    (path / "into").symlink_to(MOUNT)
    return path


def test_writes_reaching_cvmfs_fail_and_host_writes_are_made(
    world: World, tmp_path: Path, ram_files: str
) -> None:
    """Every way a write can reach /cvmfs fails with EROFS (EXDEV: a rename across mounts),
    in-process as from the tracer, after the same call sites have made host writes (so they
    are patched); the host writes leave the same files, modes, times and links both ways.
    (chmod of /proc/self/fd/N on a memfd RAM file succeeded before, from the tracer too: its
    link names no /cvmfs path.)"""
    outs = {}
    for opt in ("--stats-internals", "--no-in-process"):
        area = fresh_area(tmp_path / opt.strip("-"))
        r = hep_exec(
            world.proxy,
            [sys.executable, "-c", SCRIPT, str(area), MOUNT, str(ROUNDS)],
            options=[opt, "--stats-internals"],
        )
        assert r.returncode == 0, r.stderr
        outs[opt] = r.stdout.splitlines()
        said = dict(ln.split(": ", 1) for ln in outs[opt] if not ln.startswith("entry "))
        for what in WRITES_TO_CVMFS:  # a rename across mounts: EXDEV first, as natively
            natively = "Invalid cross-device link" if what in ACROSS else "Read-only file system"
            assert said[what] == natively, (opt, what, said[what])
        assert said["host writes"] == said["unlink the link itself"] == "ok"
        assert said["create the link itself, exclusively"] == "File exists"  # the link is
        assert said["mkdir the link itself"] == said["mkdir an existing host directory"]
        assert said["mkdir the link itself"] == "File exists"
        assert said["unlink a missing host file"] == "No such file or directory"
        assert not (area / "stolen").exists() and not (area / "into").is_symlink()
        made = {ln.split()[1]: ln.split()[2:] for ln in outs[opt] if ln.startswith("entry ")}
        last = ROUNDS - 1
        assert made[f"w{last}"] == [oct(0o100600), str(ROUNDS), str(2000 + last)]
        assert made[f"d{last}"][0] == oct(0o40750)
        assert made[f"d{last}/sub"][0] == oct(0o40701)
        assert made[f"d{last}/moved"][2] == str(4000 + last)
        assert made[f"s{last}"][3] == f"w{last}" and made[f"s{last}"][2] == "6"
        assert f"d{last}/hard" not in made and f"f{last}" not in made
    assert outs["--stats-internals"] == outs["--no-in-process"]
    for name in ("f00", "sub/g"):
        r = hep_exec(world.proxy, ["sha1sum", f"{MOUNT}/{name}"])
        assert r.stdout.split()[0] == hashlib.sha1((world.src / name).read_bytes()).hexdigest()


def test_host_writes_do_not_stop_the_program(world: World, tmp_path: Path) -> None:
    """The host writes, each ROUNDS times: after each call site's first stop, made inside
    the program (before, every one stopped it: tar x out of /cvmfs 4-6 stops a file)."""
    counts = {}
    for opt in ("--stats-internals", "--no-in-process"):
        area = fresh_area(tmp_path / opt.strip("-"))
        argv = [sys.executable, "-c", SCRIPT, str(area), MOUNT, str(ROUNDS), "host"]
        r = hep_exec(world.proxy, argv, options=[opt, "--stats-internals"])
        assert r.returncode == 0, r.stderr
        counts[opt] = stops(r.stderr)
    calls = 21 * ROUNDS  # the calls host() makes that the filter traps
    fewer, every = counts["--stats-internals"], counts["--no-in-process"]
    assert every > calls and fewer < calls // 4, (fewer, every, calls)


def test_tar_out_of_cvmfs_makes_the_same_tree(world: World, tmp_path: Path) -> None:
    """tar cf of a repository directory piped into tar xf on the host: the same bytes and
    modes as the published tree, in-process and from the tracer alike."""
    job = f"d=$(mktemp -d -p {tmp_path}) && tar cf - -C {MOUNT} . | tar xf - -C $d && echo done"
    lines, _ = in_and_out_of_process(world.proxy, ["sh", "-c", job])
    assert lines == ["done"]
    (out_in, out_tracer) = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    for out in (out_in, out_tracer):
        for name in ("f00", "sub/g"):
            assert (out / name).read_bytes() == (world.src / name).read_bytes()
            assert (out / name).stat().st_mode & 0o777 == (world.src / name).stat().st_mode & 0o777


def test_shell_redirections_and_dot_do_not_stop_the_program(world: World, tmp_path: Path) -> None:
    """A shell loop's "> /dev/null" (an O_CREAT|O_TRUNC open of /dev/null) and stat of "."
    in a host directory (bash before each search of PATH; find, ls): after the first stops,
    made inside the program.  Before, each one stopped it (/dev was all the tracer's, and "."
    no plain name)."""
    loop = f"cd {tmp_path} && for i in $(seq 100); do echo x > /dev/null; test -d . && :; done"
    counts = {}
    for opt in ("--stats-internals", "--no-in-process"):
        r = hep_exec(world.proxy, ["bash", "-c", loop], options=[opt, "--stats-internals"])
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
        counts[opt] = stops(r.stderr)
    fewer, every = counts["--stats-internals"], counts["--no-in-process"]
    assert every >= 200 and fewer < 40, (fewer, every)


def test_host_execs_do_not_stop_the_program(world: World, tmp_path: Path) -> None:
    """A shell loop running host programs, by absolute and relative path: after the first
    ones, neither their execve nor ld.so's calls in each new program stop it (the shell's
    execve call site is patched, and ld.so's at each exec stop, as learnt in the first).  A
    host script whose interpreter is under /cvmfs still runs (the kernel's exec fails, the
    tracer's runs it), and exec of a FIFO still waits for a writer once and fails (126)."""
    shutil.copy("/bin/true", tmp_path / "prog")
    (tmp_path / "cvmfs-interp").write_text(f"#!{MOUNT}/interp.sh -y\n")
    os.mkfifo(tmp_path / "fifo")
    for name in ("prog", "cvmfs-interp", "fifo"):
        (tmp_path / name).chmod(0o755)
    job = (
        f"cd {tmp_path}; for i in $(seq 60); do /bin/true; ./prog; done; ./cvmfs-interp z; "
        "( ./fifo 2>/dev/null; echo fifo $? ) & sleep 0.3; echo x > fifo; wait"
    )
    counts = {}
    for opt in ("--stats-internals", "--no-in-process"):
        r = hep_exec(world.proxy, ["bash", "-c", job], options=[opt, "--stats-internals"])
        assert r.returncode == 0, r.stderr
        assert r.stdout == "interp -y ./cvmfs-interp z\nfifo 126\n", (opt, r.stdout)
        counts[opt] = stops(r.stderr)
    fewer, every = counts["--stats-internals"], counts["--no-in-process"]
    assert every > 4 * 120 and fewer < 60, (fewer, every)


@pytest.mark.parametrize(
    ("then", "says"),
    [
        ("/bin/echo second &", ["done", "second"]),  # the child execs itself
        ("( /bin/echo second; /bin/echo third ) &", ["done", "second", "third"]),  # by vfork
    ],
)
def test_a_child_forked_while_its_parent_s_exec_site_is_patched_runs(
    world: World, then: str, says: list[str]
) -> None:
    """The execve call site is patched in the parent of the child that trapped there, while
    the parent runs: a shell starting a pipeline or a background job forks again meanwhile,
    and that child copies the site half-patched (our int3).  Its parent finished the jump in
    its own memory only, and the child met the int3 again after each SIGTRAP, for ever (a job
    that hung in `find ... | md5sum`), or, where the child's vfork child met it first, that
    one died of the SIGTRAP ("Trace/breakpoint trap": its command never ran); now the copy
    is finished when it is met.  A pause after the int3 (a test hook) makes the next fork
    land in that moment each time."""
    job = f"/bin/true & i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; {then} wait; echo done"
    r = subprocess.run(
        hep_exec_cmd(world.proxy, ["sh", "-c", job], options=["--stats-internals"]),
        env=env_with({"HEP_EXEC_TEST_PATCH_PAUSE_US": "200000"}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(r.stdout.splitlines()) == says, r.stderr[-2000:]


# argv: a PATH; runs "true" 50 times and "interp.sh" once through it, as subprocess does
SPAWN = r"""
import os, subprocess, sys
os.environ["PATH"] = sys.argv[1]
for _ in range(50):
    subprocess.run(["true"], check=True)
subprocess.run(["interp.sh", "found"], check=True)
"""


def test_path_search_of_a_spawn_does_not_stop_and_follows_links_into_cvmfs(
    world: World, tmp_path: Path
) -> None:
    """Python's subprocess tries execve in each PATH entry: a missing one is ENOENT inside
    the program (where no host symlink may lead into /cvmfs), the program found is exec'd
    there; an entry that is a host symlink into /cvmfs still finds what is there (the
    tracer's).  Before, every try stopped the program (401 stops for 50 spawns)."""
    (tmp_path / "bin").symlink_to(MOUNT)
    path = f"{tmp_path}/nope:{tmp_path}/nope2:/usr/bin:/bin:{tmp_path}/bin"
    counts = {}
    for opt in ("--stats-internals", "--no-in-process"):
        r = hep_exec(
            world.proxy, [sys.executable, "-c", SPAWN, path], options=[opt, "--stats-internals"]
        )
        assert (r.returncode, r.stdout) == (0, "interp found\n"), r.stderr
        counts[opt] = stops(r.stderr)
    fewer, every = counts["--stats-internals"], counts["--no-in-process"]
    assert every > 4 * 50 and fewer < 40, (fewer, every)


def test_execvp_in_a_new_program_stops_once(world: World, tmp_path: Path) -> None:
    """execvp in a program just started (env, a pyenv shim's ``#!/usr/bin/env bash``) tries
    each PATH entry: after its first try stops, the call site is patched in that program
    too, so the next entries are tried inside it (before: one stop for each entry)."""
    path = f"{tmp_path}/no1:{tmp_path}/no2:/usr/bin:/bin"
    job = ["bash", "-c", f"export PATH={path}; for i in $(seq 30); do env true; done"]
    execs = {}
    for opt in ("--stats-internals", "--no-in-process"):
        r = hep_exec(world.proxy, job, options=[opt, "--stats-internals"])
        assert r.returncode == 0, r.stderr
        got = re.search(r"hep-exec:\s+execve\s+(\d+)", r.stderr)
        execs[opt] = int(got[1]) if got else 0
    fewer, every = execs["--stats-internals"], execs["--no-in-process"]
    assert every >= 3 * 30 and fewer < 2 * 30, (fewer, every)


FAILING = r"""
import os, sys
os.chdir(sys.argv[1])
for _ in range(200):
    os.makedirs("a/b", exist_ok=True)
    try:
        os.unlink("nothere")
    except FileNotFoundError:
        pass
"""


def test_failing_host_writes_do_not_stop_the_program(world: World, tmp_path: Path) -> None:
    """mkdir of what exists and unlink of what does not (``makedirs(exist_ok=True)``, ``rm -f``
    and ``mkdir -p`` in make, cmake and build scripts): their EEXIST and ENOENT are answered
    inside the program where no host symlink may lead into /cvmfs (before, every failed
    write was asked of the tracer again: 600 stops here)."""
    argv = [sys.executable, "-c", FAILING, str(tmp_path)]
    counts = {}
    for opt in ("--stats-internals", "--no-in-process"):
        r = hep_exec(world.proxy, argv, options=[opt, "--stats-internals"])
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
        counts[opt] = stops(r.stderr)
    fewer, every = counts["--stats-internals"], counts["--no-in-process"]
    assert every >= 600 and fewer < 100, (fewer, every)


STATIC_A = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    int fd = open("/etc/passwd", O_RDONLY);
    printf("A %d %d\n", fd >= 0, access("/etc", R_OK));
    return 0;
}
"""
STATIC_B = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
int main(void) {
    struct stat st;
    char *p = malloc(64);
    strcpy(p, "b");
    printf("%s %d %d\n", p, stat("/etc/hosts", &st), access("/etc/passwd", F_OK));
    return 0;
}
"""


def test_programs_sharing_an_entry_keep_their_own_code(world: World, tmp_path: Path) -> None:
    """Two different static programs of one libc start with the same entry bytes; the call
    sites learnt in one are patched at the other's exec only where the code around them is
    the same, so both run right, alternately, many times (a site patched inside another
    program's instructions would crash it or change what it does)."""
    try:
        a = compile_c(STATIC_A, tmp_path / "a", "-static")
        b = compile_c(STATIC_B, tmp_path / "b", "-static")
    except subprocess.CalledProcessError:
        pytest.skip("no static libc here (Debian: libc6-dev)")
    job = ["bash", "-c", f"for i in $(seq 30); do {a}; {b}; done | sort | uniq -c"]
    lines, _ = in_and_out_of_process(world.proxy, job)
    assert [ln.split() for ln in lines] == [["30", "A", "1", "0"], ["30", "b", "0", "0"]]
