"""Paths with "//", "." and ".." under /cvmfs answered in-process (worker/trace/
_fastopen_tracee_paths.c): ld.so looks for libraries along RPATHs such as "$ORIGIN/../lib",
each probe and open a trap and a Python upcall before, and fts (find, du, grep -r) opens and
stats "<dir>/.." on its way back up.  A ".." is taken out with the name before it, and a
trailing "/" or "." dropped, only where that name is a directory; after a symlink (whose ".."
is its target's parent, and which a trailing "/" follows), a file (ENOTDIR) or the
repository's root they stay the tracer's.

Real hep-exec against a tree published by our publisher and served by nginx on loopback; a C
program compiled here stats, lstats, opens and checksums each path, and what it prints under
hep-exec is compared with what it prints for the same paths in the source tree (the kernel's
own answers).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.hep_exec import Served, World
from tests.support.tracing import compile_c, ensure_built, needs_ptrace, ram_dir

pytestmark = needs_ptrace

FQRN = "dotdot.test.org"
MOUNT = f"/cvmfs/{FQRN}"

PROGRAM = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ROOT ROUNDS PATH...: each ROOT/PATH stat'ed, lstat'ed, access'ed, opened and checksummed,
 * ROUNDS times; printed with PATH (not ROOT), the way the kernel names a type. */
static const char *kind(mode_t m) {
    return S_ISDIR(m) ? "dir" : S_ISREG(m) ? "file" : S_ISLNK(m) ? "link" : "other";
}
static void show(const char *what, int r, const struct stat *st) {
    if (r) printf(" %s=%s", what, strerror(errno));
    else if (S_ISDIR(st->st_mode)) printf(" %s=dir", what);
    else printf(" %s=%s:%lld", what, kind(st->st_mode), (long long)st->st_size);
}
int main(int argc, char **argv) {
    int rounds = atoi(argv[2]);
    char p[4096];
    for (int r = 0; r < rounds; r++)
        for (int i = 3; i < argc; i++) {
            snprintf(p, sizeof p, "%s/%s", argv[1], argv[i]);
            struct stat st;
            printf("%d %s", r, argv[i]);
            show("stat", stat(p, &st), &st);
            show("lstat", lstat(p, &st), &st);
            printf(" access=%s", access(p, R_OK) ? strerror(errno) : "ok");
            int fd = open(p, O_RDONLY);
            if (fd < 0) {
                printf(" open=%s\n", strerror(errno));
                continue;
            }
            unsigned long long h = 1469598103934665603ULL;
            unsigned char buf[8192];
            ssize_t n;
            while ((n = read(fd, buf, sizeof buf)) > 0)
                for (ssize_t j = 0; j < n; j++) h = (h ^ buf[j]) * 1099511628211ULL;
            printf(" open=%s:%016llx\n", n < 0 ? strerror(errno) : "ok", h);
            close(fd);
        }
    return 0;
}
"""

# ".." after directories only, "." and "//": the handler's, once the directories are known
NORMALIZED = [
    "a/b/c/../../lib/libx.so",
    "a/b/c/../c/file1",
    "a/b/c/../../../a/lib/libx.so",
    "a/./b//c/./file1",
    "d/../a/b/c/file1",
    "a/b/c/../../lib/glibc-hwcaps/x86-64-v4/libx.so",
    "a/b/c/../../lib/tls/x86_64/libx.so",
    "a/b/c/../../lib/nothere.so",
    "a/b/c/../../nothere/x/y",
    "a/b/../lib",
    "a/b/..",  # a trailing "..", "." or "/" after a directory: fts going back up, "find ."
    "a/b/c/../..",
    "a/b/.",
    "a/lib/",
    "a/./b/c//",
]
# the same calls on paths in normal form, made first: in a real program the call sites in libc
# and ld.so that the paths above go through serve these too, and are patched by them
PLAIN = ["a/b/c/file1", "a/lib/libx.so", "d", "a", "a/b", "a/b/c", "a/lib"]
# what only the tracer can say: "..", "." or "/" after a symlink (its target's parent, or the
# target itself) or a file (ENOTDIR)
TRACERS = [
    "a/link/../c/file1",
    "a/link/../../lib/libx.so",
    "a/plain/../b/c/file1",
    "a/b/c/file1/..",
    "a/b/c/file1/.",
    "a/lib/libx.so/",
    "a/link/",
    "a/link/.",
    "a/link/..",
    "a/filelink/",
    "a/filelink/../lib/libx.so",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ensure_built()
    base = tmp_path_factory.mktemp("dotdot")
    with ram_dir() as src:
        top = src / "tree"
        (top / "a" / "b" / "c").mkdir(parents=True)
        (top / "a" / "lib").mkdir()
        (top / "d").mkdir()
        (top / "a" / "b" / "c" / "file1").write_bytes(os.urandom(3000))
        (top / "a" / "b" / "file1").write_bytes(os.urandom(1234))  # what a lexical ".." finds
        (top / "a" / "lib" / "libx.so").write_bytes(os.urandom(20000))
        (top / "a" / "plain").write_bytes(b"a file, not a directory\n")
        (top / "a" / "link").symlink_to("b/c")
        (top / "a" / "filelink").symlink_to("b/c/file1")
        (top / "lib").mkdir()
        (top / "lib" / "libx.so").write_bytes(b"the wrong library, one level too high\n")
        (top / "a" / "c").mkdir()  # a/link/../c is a/b/c, not this
        (top / "a" / "c" / "file1").write_bytes(b"the wrong file1\n")
        served = Served(base / "store", base / "keys")
        served.publish(top, FQRN)
        prog = compile_c(PROGRAM, base / "prog")
        proxy = served.serve(base / "nginx")
        try:
            yield World(served, proxy, top, tools={"prog": prog})
        finally:
            served.stop()


def native(w: World, rounds: int, paths: list[str]) -> list[str]:
    r = subprocess.run(
        [str(w.tools["prog"]), str(w.src), str(rounds), *paths], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def traced(w: World, rounds: int, paths: list[str]) -> tuple[list[str], int]:
    """The program's lines under hep-exec, and how many /cvmfs calls stopped it."""
    r = w.run([str(w.tools["prog"]), MOUNT, str(rounds), *paths], options=["--stats-internals"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"system calls: (\d+) on /cvmfs answered by stopping", r.stderr)
    assert m, r.stderr
    return r.stdout.splitlines(), int(m[1])


def test_the_kernel_s_answers_for_every_path(world: World) -> None:
    paths = NORMALIZED + TRACERS
    got, _ = traced(world, 2, paths)
    assert got == native(world, 2, paths)
    # (the paths that tell a lexical ".." from the kernel's really do)
    lines = dict(line.split(" ", 2)[1:] for line in got if line.startswith("0 "))
    assert "open=ok" in lines["a/link/../c/file1"] and "ENOTDIR" not in lines["a/link/../c/file1"]
    assert "Not a directory" in lines["a/plain/../b/c/file1"]


def test_a_dotdot_that_leaves_the_repository_is_the_tracer_s(world: World) -> None:
    """ "/cvmfs/<repo>/a/../.." is /cvmfs, and "/cvmfs/.." the root: the kernel's walk, not
    a name taken out of the repository (the same bytes as the path in normal form)."""
    plain = [f"{FQRN}/a/lib/libx.so", f"{FQRN}/a/b/c/file1"]
    odd = [f"{FQRN}/a/../../{FQRN}/a/lib/libx.so", f"../cvmfs/{FQRN}/a/b/c/file1"]
    r = world.run([str(world.tools["prog"]), "/cvmfs", "2", *plain, *odd])
    assert r.returncode == 0, r.stderr[-3000:]
    said = {line.split(" ", 2)[1]: line.split(" ", 2)[2] for line in r.stdout.splitlines()}
    assert "open=ok:" in said[plain[0]]
    assert said[odd[0]] == said[plain[0]] and said[odd[1]] == said[plain[1]], said


def test_later_calls_on_normalized_paths_do_not_stop_the_program(world: World) -> None:
    """Once the tracer has answered the first calls in those directories, the same paths
    with ".", ".." and "//" are answered inside the program: three more rounds, no stop."""
    world.needs_named_files()
    paths = PLAIN + NORMALIZED
    once, stops_once = traced(world, 1, paths)
    four, stops_four = traced(world, 4, paths)
    assert four == native(world, 4, paths) and once == four[: len(once)]
    assert stops_four == stops_once, (stops_once, stops_four)


def test_the_tracer_s_paths_still_stop(world: World) -> None:
    """A ".." after a symlink or a file, and a trailing "/" after one, is never taken out
    in-process: each round of those stops the program again (the tracer answers it)."""
    world.needs_named_files()
    paths = ["a/link/../c/file1", "a/plain/../b/c/file1", "a/link/", "a/plain/"]
    _, stops_once = traced(world, 1, PLAIN + paths)
    _, stops_three = traced(world, 3, PLAIN + paths)
    assert stops_three - stops_once >= 2 * len(paths), (stops_once, stops_three)
