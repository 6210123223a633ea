"""In-process opens (worker/trace/_fastopen.c): after the tracer has answered an open, the
call site is patched and later opens of published paths happen inside the tracee, untrapped.

Real hep-exec against a repository published by our publisher and served by nginx on
loopback; a C program compiled here opens, reads and checksums files, and ``--stats`` says
how many opens were done in-process.  Every figure it prints is compared with the source.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hep_exec import Served, World, hep_exec, hep_exec_cmd, in_and_out_of_process
from tests.support.tracing import compile_c, ensure_built, env_with, needs_ptrace, ram_dir

pytestmark = needs_ptrace

FQRN = "inproc.test.org"
MOUNT = f"/cvmfs/{FQRN}"
NFILES = 12

PROGRAM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <signal.h>
#include <unistd.h>

static unsigned long long sum(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { fprintf(stderr, "%s: %s\n", path, strerror(errno)); exit(3); }
    struct stat a, b;
    if (stat(path, &a) || fstat(fd, &b) || a.st_ino != b.st_ino || a.st_mode != b.st_mode ||
        a.st_size != b.st_size) {
        fprintf(stderr, "%s: fstat differs from stat\n", path); exit(4);
    }
    unsigned long long h = 1469598103934665603ULL;
    unsigned char buf[65536];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; i++) h = (h ^ buf[i]) * 1099511628211ULL;
    close(fd);
    return h;
}

static char **files;
static int nfiles, rounds, mismatches;
static unsigned long long first[256];
static void *worker(void *arg) {
    long t = (long)arg;
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < nfiles; i++) {
            int k = (i + (int)t) % nfiles;
            if (sum(files[k]) != first[k])
                __atomic_add_fetch(&mismatches, 1, __ATOMIC_RELAXED);
        }
    return NULL;
}

static void print_all(const char *who) {
    for (int i = 0; i < nfiles; i++) {
        first[i] = sum(files[i]);
        printf("%s %s %016llx\n", who, files[i], first[i]);
    }
}

int main(int argc, char **argv) {
    const char *mode = argv[1];
    rounds = atoi(argv[2]);
    files = argv + 3;
    nfiles = argc - 3;
    if (!strcmp(mode, "rounds")) {
        for (int r = 0; r < rounds; r++) print_all("main");
    } else if (!strcmp(mode, "fork")) {
        print_all("parent"); /* patches the site in this image */
        fflush(stdout);
        pid_t c = fork();
        if (c == 0) {
            for (int r = 0; r < rounds; r++) print_all("child");
            fflush(stdout);
            _exit(0);
        }
        int st;
        waitpid(c, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st)) return 5;
        print_all("parent");
    } else if (!strcmp(mode, "threads")) {
        print_all("main");
        pthread_t th[8];
        for (long t = 0; t < 8; t++) pthread_create(&th[t], NULL, worker, (void *)t);
        for (int t = 0; t < 8; t++) pthread_join(th[t], NULL);
        printf("threads: %d mismatches\n", mismatches);
        print_all("main");
    } else if (!strcmp(mode, "execchain")) { /* rounds = execs left */
        unsigned long long a = sum(files[0]), b = sum(files[0]);
        if (a != b) return 6;
        if (rounds == 0) { printf("chain %016llx\n", a); return 0; }
        char n[16];
        snprintf(n, sizeof n, "%d", rounds - 1);
        argv[2] = n;
        execv(argv[0], argv);
        return 7;
    } else if (!strcmp(mode, "storm")) { /* signals while a child execs again and again */
        pid_t c = fork();
        if (c == 0) {
            char n[16];
            snprintf(n, sizeof n, "%d", rounds);
            char *args[] = {argv[0], "execchain", n, files[0], NULL};
            execv(argv[0], args);
            _exit(8);
        }
        int st = 0;
        long sent = 0;
        while (waitpid(c, &st, WNOHANG) == 0) {
            kill(c, SIGWINCH); /* ignored by default, but every one stops it in the tracer */
            sent++;
        }
        printf("storm %s %d sent>0 %d\n", WIFEXITED(st) ? "exit" : "signal",
               WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st), sent > 0);
    } else if (!strcmp(mode, "shared")) { /* files[0], files[1]: one content, two stats */
        for (int r = 0; r < rounds; r++) {
            struct stat a, b, a2, sa, sb;
            int fa = open(files[0], O_RDONLY);
            if (fa < 0 || fstat(fa, &a) || stat(files[0], &sa)) return 9;
            int fb = open(files[1], O_RDONLY);
            if (fb < 0 || fstat(fb, &b) || stat(files[1], &sb) || fstat(fa, &a2)) return 10;
            /* each fstat right after its open says its path's stat; an older fd on the same
             * file says the last open's (the tracer's rule, in-process or not) */
            printf("round %d: a %d b %d a-after-b %s %lo %ld\n", r > 0,
                   a.st_ino == sa.st_ino && a.st_mode == sa.st_mode &&
                       a.st_mtime == sa.st_mtime,
                   b.st_ino == sb.st_ino && b.st_mode == sb.st_mode &&
                       b.st_mtime == sb.st_mtime,
                   a2.st_ino == sb.st_ino ? "b" : a2.st_ino == sa.st_ino ? "a" : "?",
                   (unsigned long)a2.st_mode, (long)a2.st_size);
            close(fa);
            close(fb);
        }
    } else if (!strcmp(mode, "stats")) {
        for (int r = 0; r < rounds; r++)
            for (int i = 0; i < nfiles; i++) {
                struct stat a, l, f;
                int sa = stat(files[i], &a), ea = errno, sl = lstat(files[i], &l);
                printf("%s stat %s %o %lld", files[i], sa ? strerror(ea) : "ok",
                       sa ? 0 : a.st_mode, sa ? 0LL : (long long)a.st_size);
                printf(" lstat %s %o %lld", sl ? strerror(errno) : "ok", sl ? 0 : l.st_mode,
                       sl ? 0LL : (long long)l.st_size);
                struct statx x;
                int sx = statx(AT_FDCWD, files[i], 0, STATX_BASIC_STATS, &x);
                printf(" statx %s %o %lld", sx ? strerror(errno) : "ok", sx ? 0 : x.stx_mode,
                       sx ? 0LL : (long long)x.stx_size);
                sx = statx(AT_FDCWD, files[i], AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS, &x);
                printf(" lstatx %s %o", sx ? strerror(errno) : "ok", sx ? 0 : x.stx_mode);
                char target[64];
                ssize_t tn = readlink(files[i], target, sizeof target);
                printf(" readlink %s %.*s", tn < 0 ? strerror(errno) : "ok", (int)(tn < 0 ? 0 : tn),
                       target);
                tn = readlink(files[i], target, 2); /* truncated, as the kernel does */
                printf(" short %zd", tn);
                printf(" access");
                for (int m = 0; m < 8; m++)
                    printf(" %s", access(files[i], m) ? strerror(errno) : "ok");
                int fd = sa ? -1 : open(files[i], O_RDONLY);
                if (fd >= 0) {
                    fstat(fd, &f);
                    printf(" fstat %o %lld same-ino %d", f.st_mode, (long long)f.st_size,
                           f.st_ino == a.st_ino && f.st_dev == a.st_dev);
                    close(fd);
                }
                printf(" round %d\n", r > 0);
            }
    } else if (!strcmp(mode, "flags")) {
        const char *f = files[0], *link = files[1];
        print_all("main");
        print_all("main");
        int fd = open(f, O_WRONLY);
        printf("wronly %d %s\n", fd, fd < 0 ? strerror(errno) : "");
        fd = open(f, O_RDONLY | O_CREAT, 0644);
        printf("creat %d %s\n", fd, fd < 0 ? strerror(errno) : "");
        fd = open(f, O_RDONLY | O_DIRECTORY);
        printf("directory %d %s\n", fd, fd < 0 ? strerror(errno) : "");
        fd = open(link, O_RDONLY | O_NOFOLLOW);
        printf("nofollow %d %s\n", fd, fd < 0 ? strerror(errno) : "");
        fd = open(link, O_RDONLY);
        printf("follow %s\n", fd >= 0 ? "ok" : strerror(errno));
        if (fd >= 0) close(fd);
        int d = open(argv[argc - 1], O_RDONLY | O_DIRECTORY);
        printf("dir %s\n", d >= 0 ? "ok" : strerror(errno));
        for (int k = 0; k < 3; k++) { /* the tracer's answer, then in-process ones */
            fd = open("/cvmfs/" "%s/missing", O_RDONLY);
            printf("missing %d %s\n", fd, fd < 0 ? strerror(errno) : "");
            fd = open("/cvmfs/" "%s/f00/below", O_RDONLY);
            printf("below %d %s\n", fd, fd < 0 ? strerror(errno) : "");
        }
        char odd[4200];
        snprintf(odd, sizeof odd, "%s", f);
        char *slash = strrchr(odd, '/');
        memmove(slash + 1, slash, strlen(slash) + 1); /* "//": not in normal form */
        printf("double-slash %016llx\n", sum(odd));
    }
    return 0;
}
"""


def prog(w: World) -> str:
    """The C program above, compiled with this world's mount."""
    return str(w.tools["prog"])


def want(w: World, name: str) -> str:
    """The program's checksum (64-bit FNV-1a) of source file ``name``."""
    h = 1469598103934665603
    for b in (w.src / name).read_bytes():
        h = ((h ^ b) * 1099511628211) & (2**64 - 1)
    return f"{h:016x}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ensure_built()
    base = tmp_path_factory.mktemp("inproc")
    with ram_dir() as src:
        top = src / "tree"
        top.mkdir()
        for i in range(NFILES):
            (top / f"f{i:02d}").write_bytes(os.urandom(1000 + 40_000 * i))
        (top / "same1").write_bytes(b"identical content\n")
        (top / "same2").write_bytes(b"identical content\n")
        os.chmod(top / "same2", 0o600)
        (top / "empty1").write_bytes(b"")
        (top / "empty2").write_bytes(b"")
        os.chmod(top / "empty2", 0o755)
        (top / "link").symlink_to("f00")
        (top / "sub").mkdir()
        served = Served(base / "store", base / "keys")
        served.publish(top, FQRN)
        prog = compile_c(PROGRAM.replace('"/cvmfs/" "%s', f'"{MOUNT}'), base / "prog", "-pthread")
        proxy = served.serve(base / "nginx")
        try:
            yield World(served, proxy, top, tools={"prog": prog})
        finally:
            served.stop()


def stats(stderr: str) -> tuple[int, int, int]:
    """(in-process opens, handed to the tracer, sites patched) from --stats; fails the test
    when the line is missing (so a count of 0 means 0, not "no output")."""
    m = re.search(r"in-process opens: (\d+) \(not trapped; (\d+) handed .*; (\d+) call", stderr)
    assert m, f"no 'in-process opens' line in hep-exec --stats output:\n{stderr}"
    return int(m[1]), int(m[2]), int(m[3])


def files(n: int = NFILES) -> list[str]:
    return [f"{MOUNT}/f{i:02d}" for i in range(n)]


def expected(w: World, who: str, rounds: int = 1) -> list[str]:
    one = [f"{who} {MOUNT}/f{i:02d} {want(w, f'f{i:02d}')}" for i in range(NFILES)]
    return one * rounds


def test_later_opens_of_a_path_are_done_in_process(world: World) -> None:
    world.needs_named_files()
    r = hep_exec(world.proxy, [prog(world), "rounds", "5", *files()], options=["--stats-internals"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expected(world, "main", 5)
    inproc, _handed, sites = stats(r.stderr)
    # the first open of each path is the tracer's; the site is patched at the first one
    assert sites >= 1
    assert inproc >= 4 * NFILES, r.stderr


def test_no_in_process_option_keeps_every_open_in_the_tracer(world: World) -> None:
    r = hep_exec(
        world.proxy,
        [prog(world), "rounds", "3", *files()],
        options=["--stats-internals", "--no-in-process"],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expected(world, "main", 3)
    assert "trapped syscalls:" in r.stderr, r.stderr  # the --stats lines are there ...
    assert "in-process opens" not in r.stderr  # ... but none about in-process answers
    opens = re.search(r"hep-exec:\s+openat\s+(\d+)$", r.stderr, re.MULTILINE)
    assert opens and int(opens[1]) >= 3 * NFILES, r.stderr  # every open went to the tracer


@pytest.mark.slow
def test_forked_child_inherits_the_patched_site(world: World) -> None:
    world.needs_named_files()
    r = hep_exec(world.proxy, [prog(world), "fork", "3", *files()], options=["--stats-internals"])
    assert r.returncode == 0, r.stderr
    parent, child = expected(world, "parent"), expected(world, "child", 3)
    assert r.stdout.splitlines() == parent + child + parent
    inproc, _, _ = stats(r.stderr)
    assert inproc >= 4 * NFILES  # the child's rounds and the parent's second pass


@pytest.mark.slow
def test_threads_share_the_handler(world: World) -> None:
    """Patched while single-threaded; then eight threads open and read concurrently."""
    world.needs_named_files()
    r = hep_exec(
        world.proxy, [prog(world), "threads", "20", *files()], options=["--stats-internals"]
    )
    assert r.returncode == 0, r.stderr
    want = expected(world, "main")
    assert r.stdout.splitlines() == [*want, "threads: 0 mismatches", *want]
    inproc, _, _ = stats(r.stderr)
    assert inproc >= 8 * 20 * NFILES


def test_files_with_the_same_content_are_opened_in_process_too(world: World) -> None:
    """Two paths share one RAM file but not their stat (and two empty files): fstat of each
    fd right after its open says its own path's stat, whether the tracer or the program
    opened it; the later rounds open them in-process."""
    world.needs_named_files()
    same = [f"{MOUNT}/{n}" for n in ("same1", "same2", "f01", "empty1", "empty2")]
    r = hep_exec(world.proxy, [prog(world), "rounds", "4", *same], options=["--stats-internals"])
    assert r.returncode == 0, r.stderr  # the program checks fstat against stat itself
    inproc, handed, _ = stats(r.stderr)
    # rounds 2-4 of every path: one opened before its file turned out to be shared (same1 by
    # the tracer in round 1, then same2) is published again as a shared file's (before:
    # f01's only, 3)
    assert inproc >= 3 * len(same), r.stderr
    assert handed <= len(same) - 1, r.stderr  # round 1's, after the first (which patches)


@pytest.mark.parametrize("pair", [("same1", "same2"), ("empty1", "empty2")])
def test_fstat_of_a_shared_file_follows_the_last_open_as_the_tracer_s(
    world: World, pair: tuple[str, str]
) -> None:
    """An fd on a file that serves two paths: fstat says the stat of the path opened last, in
    the program as in the tracer (--no-in-process, the oracle), the first round there and the
    later ones in-process."""
    world.needs_named_files()
    argv = [prog(world), "shared", "4", *(f"{MOUNT}/{n}" for n in pair)]
    got = hep_exec(world.proxy, argv, options=["--stats-internals"])
    oracle = hep_exec(world.proxy, argv, options=["--no-in-process"])
    assert got.returncode == 0 and oracle.returncode == 0, got.stderr + oracle.stderr
    assert got.stdout == oracle.stdout
    lines = got.stdout.splitlines()
    assert len(lines) == 4 and all(" a 1 b 1 a-after-b b " in ln for ln in lines), lines
    inproc, _, _ = stats(got.stderr)
    assert inproc >= 2 * 3, got.stderr  # both opens of rounds 2-4 (before: 0)


def test_stat_lstat_fstat_answers_are_the_same_in_process(world: World) -> None:
    """stat, lstat, statx (both ways), readlink, access (every mode) and fstat of files, a
    symlink, a directory, a missing path and a path under a file: the first round is answered
    by the tracer, the later ones inside the process, identically."""
    names = ["f00", "f05", "link", "sub", "missing", "f00/below", "same1"]
    argv = [prog(world), "stats", "4", *(f"{MOUNT}/{n}" for n in names)]
    r = hep_exec(world.proxy, argv, options=["--stats-internals"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    first = [ln.removesuffix(" round 0") for ln in lines[: len(names)]]
    assert all(ln.endswith(" round 0") for ln in lines[: len(names)])
    for later in range(1, 4):
        chunk = lines[later * len(names) : (later + 1) * len(names)]
        assert [ln.removesuffix(" round 1") for ln in chunk] == first
    by_name = dict(zip(names, first, strict=True))
    for n in ("f00", "f05", "same1"):
        st = (world.src / n).stat()
        assert f"stat ok {st.st_mode:o} {st.st_size} lstat ok {st.st_mode:o}" in by_name[n]
        assert f"statx ok {st.st_mode:o} {st.st_size} lstatx ok {st.st_mode:o}" in by_name[n]
        erofs = "Read-only file system"
        assert (
            f"access ok ok {erofs} {erofs} ok ok {erofs} {erofs}" in by_name[n]
            if st.st_mode & 0o100
            else f"access ok Permission denied {erofs} {erofs} ok Permission denied" in by_name[n]
        ), by_name[n]
        assert by_name[n].endswith(f"fstat {st.st_mode:o} {st.st_size} same-ino 1")
    assert f"stat ok 100644 {(world.src / 'f00').stat().st_size} lstat ok 120777" in by_name["link"]
    assert " stat ok 40755 " in by_name["sub"] and " statx ok 40755 " in by_name["sub"]
    assert " lstatx ok 120777 " in by_name["link"]
    assert " readlink ok f00 short 2 " in by_name["link"]
    assert " readlink Invalid argument  short -1 " in by_name["f00"]
    assert " readlink No such file or directory  short -1 " in by_name["missing"]
    assert "statx No such file or directory 0 0 lstatx No such file" in by_name["missing"]
    assert "access No such file or directory" in by_name["missing"]
    assert (
        "stat No such file or directory 0 0 lstat No such file or directory" in by_name["missing"]
    )
    assert "stat Not a directory 0 0 lstat Not a directory" in by_name["f00/below"]
    m = re.search(r"stats: (\d+) \((\d+) handed", r.stderr)
    assert m and int(m[1]) >= 3 * 14 * len(names), r.stderr


def test_what_the_handler_does_not_answer_still_behaves(world: World) -> None:
    """Writes (EROFS), O_CREAT of a file that is there (opens it), O_DIRECTORY on a file,
    O_NOFOLLOW on a symlink, missing paths (ENOENT, ENOTDIR: answered in-process after the
    first time) and a path not in normal form, all from the patched site."""
    argv = [prog(world), "flags", "1", f"{MOUNT}/f00", f"{MOUNT}/link", f"{MOUNT}/sub"]
    r = hep_exec(world.proxy, argv, options=["--stats-internals"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "wronly -1 Read-only file system" in lines
    assert any(re.fullmatch(r"creat \d+ ", ln) for ln in lines), lines  # opens, as natively
    assert "directory -1 Not a directory" in lines
    assert "nofollow -1 Too many levels of symbolic links" in lines
    assert "follow ok" in lines
    assert "dir ok" in lines
    assert lines.count("missing -1 No such file or directory") == 3
    assert lines.count("below -1 Not a directory") == 3
    assert f"double-slash {want(world, 'f00')}" in lines
    inproc, _, sites = stats(r.stderr)
    # both missing paths twice more, and f00 again where RAM files are opened by name
    assert sites >= 1 and inproc >= 2 * 2 + (world.backing == "tmpfs")


@pytest.mark.slow
def test_evicted_objects_are_fetched_again(world: World) -> None:
    """A RAM limit below the working set: published names of evicted files are withdrawn or
    vanish (ENOENT in the tracee's open sends it back to the tracer); bytes stay right."""
    r = hep_exec(
        world.proxy,
        [prog(world), "rounds", "4", *files()],
        options=["--stats-internals", "--ram", "1M"],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == expected(world, "main", 4)
    evictions = re.search(r"(\d+) evictions", r.stderr)
    assert evictions and int(evictions[1]) > 0, r.stderr


@pytest.mark.slow
def test_execs_interrupted_by_signals(world: World) -> None:
    """A process exec'ing itself 60 times while its parent sends it SIGWINCH as fast as it
    can: signals stop it in the middle of the handler's injection at exec, which must hand
    those stops on (the signal delivered, the image fine) and never lose the exit status."""
    r = hep_exec(
        world.proxy, [prog(world), "storm", "60", f"{MOUNT}/f02"], options=["--stats-internals"]
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"chain {want(world, 'f02')}", "storm exit 0 sent>0 1"]
    images = re.search(r"in (\d+) program images", r.stderr)
    assert images and int(images[1]) >= 2, r.stderr


def test_static_binary_and_shell_still_run(world: World) -> None:
    """Programs whose open sites do not look like glibc's are never patched."""
    busybox = "/bin/busybox"
    if not Path(busybox).exists():
        pytest.skip("busybox-static not installed")
    r = hep_exec(
        world.proxy,
        [busybox, "sh", "-c", f"for i in 1 2 3; do busybox md5sum {MOUNT}/f03; done"],
        options=["--stats-internals"],
    )
    assert r.returncode == 0, r.stderr
    digests = {line.split()[0] for line in r.stdout.splitlines()}
    import hashlib

    assert digests == {hashlib.md5((world.src / "f03").read_bytes()).hexdigest()}


I386_PROGRAM = """
.globl _start
_start:
    mov $4, %eax
    mov $1, %ebx
    mov $msg, %ecx
    mov $len, %edx
    int $0x80
    mov $1, %eax
    mov $42, %ebx
    int $0x80
.data
msg: .ascii "hello from i386\\n"
len = . - msg
"""


def test_32_bit_program_is_left_alone(world: World, tmp_path: Path) -> None:
    """The handler is 64-bit code: an i386 image gets none (it would crash at its entry)."""
    src, obj, exe = tmp_path / "h.s", tmp_path / "h.o", tmp_path / "h32"
    src.write_text(I386_PROGRAM)
    built = subprocess.run(["as", "--32", "-o", str(obj), str(src)], capture_output=True)
    if built.returncode == 0:
        built = subprocess.run(
            ["ld", "-m", "elf_i386", "-o", str(exe), str(obj)], capture_output=True
        )
    if built.returncode != 0:
        pytest.skip(f"binutils cannot build i386 here: {built.stderr.decode().strip()}")
    r = hep_exec(world.proxy, [str(exe)])
    assert (r.returncode, r.stdout) == (42, "hello from i386\n"), r.stderr


def test_tracee_memory_maps_show_the_handler(world: World) -> None:
    """The handler is mapped into every image exec'd (the memfd's name says whose it is)."""
    r = hep_exec(world.proxy, ["cat", "/proc/self/maps"])
    assert r.returncode == 0, r.stderr
    assert "hep-exec-fastopen" in r.stdout
    plain = subprocess.run(["cat", "/proc/self/maps"], capture_output=True, text=True)
    assert "hep-exec-fastopen" not in plain.stdout


def test_names_a_listed_directory_does_not_have_are_absent_in_process(world: World) -> None:
    """Once a directory's entries are answered ahead, every name it has is published and the
    directory is marked listed after them: the first stat, access, readlink or open of a name
    it does not have is ENOENT inside the process (Python probes many such names), while every
    name it has keeps its own answer."""
    missing = [f"{MOUNT}/missing{i:03d}" for i in range(100)]
    present = [f"{MOUNT}/{n}" for n in ("f00", "link", "sub", "same1")]
    argv = [prog(world), "stats", "1", *present, *missing, *present]
    r = hep_exec(world.proxy, argv, options=["--stats-internals"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 108, r.stdout
    for ln in lines[len(present) : len(present) + len(missing)]:
        assert "stat No such file or directory 0 0 lstat No such file or directory" in ln, ln
        assert "statx No such file or directory" in ln and "access No such file" in ln, ln
        assert "readlink No such file or directory" in ln, ln
    assert lines[:4] == lines[-4:]  # the names it has: the same answers after the others
    assert all("No such file" not in ln for ln in lines[:4]), lines[:4]
    m = re.search(r"stats: (\d+) \((\d+) handed", r.stderr)
    assert m, r.stderr
    # a handful of first calls go to the tracer (before the site is patched, and the call
    # that has the directory's entries answered ahead); the hundred names do not
    assert int(m[1]) >= 5 * len(missing) and int(m[2]) < 20, r.stderr


GETCWD = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (chdir(argv[1])) { perror(argv[1]); return 2; }
    char buf[4096];
    for (int round = 0; round < 50; round++) {
        if (!getcwd(buf, sizeof buf)) { perror("getcwd"); return 3; }
        size_t n = strlen(buf);
        char small[4096];
        errno = 0;
        char *exact = getcwd(small, n + 1), *tight = exact ? getcwd(small, n) : NULL;
        int tight_errno = errno;
        if (!round || round == 49)
            printf("%s exact=%s short=%s\n", buf, exact ? "ok" : strerror(errno),
                   tight ? "ok" : strerror(tight_errno));
    }
    return 0;
}
"""


def test_getcwd_is_answered_in_process_the_tracer_s_way(world: World, tmp_path: Path) -> None:
    """getcwd in a /cvmfs directory says the /cvmfs path (the kernel would name the shadow
    tree), on the host the kernel's path; a buffer one byte short is ERANGE either way; and
    after the first call of a site, none of them stops the program."""
    prog = compile_c(GETCWD, tmp_path / "getcwd")
    for where in (f"{MOUNT}/sub", str(tmp_path)):
        r = hep_exec(world.proxy, [str(prog), where], options=["--stats-internals"])
        assert r.returncode == 0, r.stderr
        want = f"{where} exact=ok short=Numerical result out of range"
        assert r.stdout.splitlines() == [want, want], r.stdout
        m = re.search(r"hep-exec:\s+getcwd\s+(\d+)", r.stderr)
        assert m and int(m[1]) <= 3, r.stderr  # one per call site, of 150 calls


# argv: a host directory, a /cvmfs file; every call twice.  Each call is made on the /cvmfs
# file first: the tracer patches a call site when it answers a /cvmfs path from it.
HOST_MISSING = r"""
import os, sys
area, cvmfs = sys.argv[1:3]

def ask(what, call, path):
    for _ in range(2):
        try:
            r = call(path)
            out = r.st_size if hasattr(r, "st_size") else r
        except OSError as e:
            out = os.strerror(e.errno)
    print(what, path.replace(area, "AREA"), out)

names = [cvmfs] + [f"{area}/missing{i}" for i in range(50)] + [
    f"{area}/nodir{i}/deeper/x" for i in range(50)] + [
    f"{area}/file/below", f"{area}/nodir/x", f"{area}/gone", f"{area}/hello",
    f"{area}/odd/f00", f"{area}/odd/nothing", f"{area}/odd/f00/below", f"{area}/dangling",
    f"{area}/real/odd/f00", f"{area}/gone/deeper", f"{area}/dangling/x", f"{area}/file/x/y",
    f"{area}/../area/missing0", f"{area}/.//missing0", "/nonexistent-top-level"]
for p in names:
    ask("stat", os.stat, p)
    ask("lstat", os.lstat, p)
    ask("access", lambda q: os.access(q, os.R_OK), p)
    ask("open", lambda q: os.close(os.open(q, os.O_RDONLY)), p)
    ask("readlink", os.readlink, p)
"""


def test_missing_host_paths_are_answered_in_process(world: World, tmp_path: Path) -> None:
    """A host path the kernel says is missing (ENOENT, ENOTDIR) is answered inside the
    process, with no stop, where no host symlink can lead into the mount: its parent exists
    and the name is no dangling link, or a name above it is missing below real directories
    only (glibc's probes of locales it does not have).  Everything else (a link into
    /cvmfs, a path under one, a ".." or "//") goes to the tracer as before.  The answers are
    the tracer's own: the same as with --no-in-process."""
    area = tmp_path / "area"
    area.mkdir()
    (area / "file").write_text("x")
    (area / "gone").symlink_to(f"{MOUNT}/no/such")
    (area / "hello").symlink_to(f"{MOUNT}/f01")
    (area / "odd").symlink_to(MOUNT)
    (area / "real").mkdir()
    (area / "real" / "odd").symlink_to(MOUNT)  # a link below a real directory
    (area / "dangling").symlink_to(tmp_path / "nowhere")
    argv = [sys.executable, "-c", HOST_MISSING, str(area), f"{MOUNT}/f00"]
    lines, runs = in_and_out_of_process(world.proxy, argv)
    said = {tuple(ln.split(" ", 2)[:2]): ln.split(" ", 2)[2] for ln in lines}
    assert said[("stat", "AREA/hello")] == str(os.path.getsize(world.src / "f01"))
    assert said[("stat", "AREA/odd/f00")] == str(os.path.getsize(world.src / "f00"))
    assert said[("stat", "AREA/odd/nothing")] == said[("open", "AREA/missing7")]
    assert said[("open", "AREA/file/below")] == os.strerror(errno.ENOTDIR)
    assert said[("lstat", "AREA/gone")] != said[("stat", "AREA/gone")]  # the link, not where
    assert said[("stat", "AREA/real/odd/f00")] == said[("stat", "AREA/odd/f00")]
    # the fifty missing names and the fifty below missing directories: five calls each,
    # twice, in-process
    m = re.search(r"(\d+) stopped that were not for /cvmfs", runs["--stats-internals"].stderr)
    n = re.search(r"(\d+) stopped that were not for /cvmfs", runs["--no-in-process"].stderr)
    assert m and n, runs
    assert int(n[1]) - int(m[1]) >= 2 * 5 * 100, (m[0], n[0])


# argv: a host directory; each file stat'ed, opened and read, each missing name asked, ROUNDS
# times; no /cvmfs path at all.
HOST_ONLY = r"""
import hashlib, os, sys
area, rounds = sys.argv[1], int(sys.argv[2])
h = hashlib.sha256()
for _ in range(rounds):
    for name in sorted(os.listdir(area)):
        p = os.path.join(area, name)
        h.update(str(os.stat(p).st_size).encode())
        with open(p, "rb") as f:  # (its fstat too)
            st = os.fstat(f.fileno())
            h.update(f"{st.st_ino} {st.st_mode} {st.st_size}".encode() + f.read())
        for q in (p + ".missing", p + "/below"):
            try:
                os.stat(q)
            except OSError as e:
                h.update(str(e.errno).encode())
print(h.hexdigest())
"""


def test_host_calls_stop_once_per_call_site_before_any_cvmfs_path(
    world: World, tmp_path: Path
) -> None:
    """A program that never touches /cvmfs: its host calls, fstat too, are made inside it
    after the first one of each call site (the site is patched on a host call too), with the
    kernel's answers; before, each one stopped it until some /cvmfs answer patched the site
    (and fstat until the tracer had handed out a RAM file)."""
    area = tmp_path / "host"
    area.mkdir()
    for i in range(40):
        (area / f"h{i:02d}").write_bytes(os.urandom(100 * i))
    stops = {}
    for rounds in (1, 6):
        argv = [sys.executable, "-c", HOST_ONLY, str(area), str(rounds)]
        native = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        r = hep_exec(world.proxy, argv, options=["--stats-internals"])
        assert r.returncode == 0, r.stderr
        assert r.stdout == native
        m = re.search(r"(\d+) stopped that were not for /cvmfs", r.stderr)
        assert m, r.stderr
        stops[rounds] = int(m[1])
    # five more rounds: 1,200 more host calls (200 stats, opens and fstats, 400 missing names)
    assert stops[6] - stops[1] < 20, stops


NOFOLLOW_JOB = r"""
cd {mount} || exit 1
for round in 1 2 3 4; do tar cf - f* same1 same2 empty1 empty2 link sub | sha1sum; done
{python} -c '
import os
for name in ["link", "f00", "sub"] * 5:
    try:
        os.close(os.open(name, os.O_RDONLY | os.O_NOFOLLOW))
        print(name, "opened")
    except OSError as e:
        print(name, os.strerror(e.errno))
'
"""


def test_opens_with_o_nofollow_are_done_in_process(world: World, tmp_path: Path) -> None:
    """tar (and grep -r, cp -r) open every file with O_NOFOLLOW: where the path's lstat
    answer is no symlink, that is the plain open, made in-process once the call site is
    patched (before, every one stopped: tar of a /cvmfs tree took 17x its native time).  The
    archives are the tracer's own (--no-in-process) and hold the published bytes; a symlink
    stays ELOOP and a directory opens, in-process or not."""
    world.needs_named_files()
    job = ["sh", "-c", NOFOLLOW_JOB.format(mount=MOUNT, python=sys.executable)]
    lines, runs = in_and_out_of_process(world.proxy, job)
    digests, opened = lines[:4], lines[4:]
    assert len(set(digests)) == 1, digests
    assert opened == ["link Too many levels of symbolic links", "f00 opened", "sub opened"] * 5
    out = tmp_path / "x"
    out.mkdir()
    archive = hep_exec_cmd(world.proxy, ["sh", "-c", f"cd {MOUNT} && tar cf - f* link sub"])
    tar = subprocess.run(archive, capture_output=True, check=True, env=env_with({}))
    subprocess.run(["tar", "xf", "-", "-C", str(out)], input=tar.stdout, check=True)
    for i in range(NFILES):
        assert (out / f"f{i:02d}").read_bytes() == (world.src / f"f{i:02d}").read_bytes()
    assert os.readlink(out / "link") == "f00"
    inproc, _handed, _sites = stats(runs["--stats-internals"].stderr)
    assert inproc >= 3 * (NFILES + 5), runs["--stats-internals"].stderr  # rounds 2-4 at least


def test_statx_of_an_open_directory_is_answered_in_process(world: World, tmp_path: Path) -> None:
    """ls -R asks statx(fd, "", AT_EMPTY_PATH) of each directory it lists: the catalog's
    answer for a /cvmfs directory's mirror, the kernel's own for a host one, both made
    in-process (before, each stopped the program: ls -lR of a 1,069-directory tree, 1,088
    stops); the listings are the tracer's own."""
    host = tmp_path / "host"
    (host / "a" / "b").mkdir(parents=True)
    (host / "a" / "b" / "file").write_bytes(b"x")
    job = ["sh", "-c", f"for i in 1 2 3 4 5 6; do ls -lRi {MOUNT} {host}; done"]
    lines, runs = in_and_out_of_process(world.proxy, job)
    assert f"{MOUNT}/sub:" in lines and f"{host}/a/b:" in lines
    statx = re.search(r"hep-exec:\s+statx\s+(\d+)$", runs["--stats-internals"].stderr, re.M)
    every = re.search(r"hep-exec:\s+statx\s+(\d+)$", runs["--no-in-process"].stderr, re.M)
    assert every and int(every[1]) >= 6 * 5, runs["--no-in-process"].stderr  # 5 directories
    assert not statx or int(statx[1]) <= 2 * 6, runs["--stats-internals"].stderr  # per exec


def test_o_nofollow_open_through_a_symlink_out_of_the_repository(tmp_path: Path) -> None:
    """An O_NOFOLLOW open whose path leaves the repository through a symlink on its way (to
    a host directory) opens the host file, as natively, and says nothing: asking whether its
    last component is a symlink must not take the path for a repository one."""
    ensure_built()
    src = tmp_path / "src"
    src.mkdir()
    host = tmp_path / "host"
    host.mkdir()
    (host / "file").write_bytes(b"on the host\n")
    (src / "out").symlink_to(host)
    served = Served(tmp_path / "store", tmp_path / "keys")
    served.publish(src, "out.test.org")
    proxy = served.serve(tmp_path / "nginx")
    code = (
        "import os\n"
        "for name in ['file', 'file', 'nosuch']:\n"
        "    try:\n"
        "        fd = os.open('/cvmfs/out.test.org/out/' + name, os.O_RDONLY | os.O_NOFOLLOW)\n"
        "        print(os.read(fd, 100))\n"
        "    except OSError as e:\n"
        "        print(os.strerror(e.errno))\n"
    )
    try:
        r = hep_exec(proxy, [sys.executable, "-c", code])
    finally:
        served.stop()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["b'on the host\\n'"] * 2 + ["No such file or directory"]
    assert r.stderr == "", r.stderr
