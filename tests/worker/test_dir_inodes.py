"""A /cvmfs directory lists each entry with the inode number stat says of it (d_ino of
getdents64 == st_ino of lstat), "." and ".." too, as under the real client: find -printf %i,
find -inum and Python's DirEntry.inode() saw the numbers of hep-exec's mirror of the tree,
which stat never says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import hep_exec, serving, stops
from tests.support.tracing import compile_c, ensure_built

FQRN = "inodes.test.org"
ROOT = f"/cvmfs/{FQRN}"
BIG = 4200  # entries of one directory: more than a first touch answers ahead (MAX_AHEAD)


@dataclass(frozen=True)
class Served:
    proxy: str
    key: Path
    lister: Path  # a static C program: readdir's d_ino against lstat's st_ino, and "." ".."
    dynamic_lister: Path  # the same, linked against libc (whose call sites get patched)


# Static: its calls come from no libc of ours to patch, so each getdents64 goes to the tracer.
LISTER = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
int main(int argc, char **argv) {
    int bad = 0, n = 0;
    for (int i = 1; i < argc; i++) {
        DIR *d = opendir(argv[i]);
        if (!d) { perror(argv[i]); return 2; }
        struct dirent *e;
        while ((e = readdir(d))) {
            struct stat st;
            if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
                perror(e->d_name);
                return 2;
            }
            n++;
            if (st.st_ino != e->d_ino) {
                printf("%s/%s: d_ino %llu st_ino %llu\n", argv[i], e->d_name,
                       (unsigned long long)e->d_ino, (unsigned long long)st.st_ino);
                bad++;
            }
        }
        closedir(d);
    }
    printf("%d entries, %d differ\n", n, bad);
    return bad != 0;
}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    ensure_built()
    base = tmp_path_factory.mktemp("inodes")
    src = base / "src"
    (src / "a" / "b" / "c").mkdir(parents=True)
    for i in range(30):
        (src / "a" / f"f{i:02d}").write_text(f"file {i}\n")
    (src / "a" / "b" / "c" / "deep").write_text("deep\n")
    (src / "a" / "same1").write_text("twin\n")
    os.link(src / "a" / "same1", src / "a" / "same2")  # one inode for both (a hardlink group)
    (src / "a" / "link").symlink_to("f00")  # its own inode, not its target's
    (src / "a" / "dirlink").symlink_to("b")
    (src / "a" / "clink").symlink_to("b/c")  # its real parent (a/b) is not where it lies (a)
    big = src / "big"
    big.mkdir()
    for i in range(BIG):
        (big / f"e{i:05d}").write_bytes(b"")
    lister = compile_c(LISTER, base / "lister", "-static")
    dynamic_lister = compile_c(LISTER, base / "dynamic-lister")
    with serving(src, FQRN, base) as (proxy, repo):
        yield Served(proxy, repo.master_pub, lister, dynamic_lister)


# every directory of the tree walked: each entry's d_ino (scandir) against its lstat, then
# the "." and ".." of each directory as a listing gives them (ls -ai) against stat
WALK = rf"""
import os, subprocess, sys
n = bad = 0
for top, dirs, files in os.walk("{ROOT}"):
    for e in os.scandir(top):
        n += 1
        if e.inode() != os.lstat(e.path).st_ino:
            bad += 1
            print("differs", e.path)
    out = subprocess.run(["ls", "-ai", top], capture_output=True, text=True).stdout.split()
    listed = dict(zip(out[1::2], map(int, out[0::2])))
    for name in (".", ".."):
        if listed[name] != os.stat(os.path.join(top, name)).st_ino:
            bad += 1
            print("differs", top, name)
same = os.lstat("{ROOT}/a/same1").st_ino == os.lstat("{ROOT}/a/same2").st_ino
link = os.lstat("{ROOT}/a/link").st_ino != os.stat("{ROOT}/a/link").st_ino
print(n, "entries", bad, "differ", "hardlinks share one" if same else "hardlinks differ",
      "link its own" if link else "link is its target")
"""


def test_every_entry_lists_with_the_inode_stat_says(served: Served, trap_mode: str) -> None:
    """In both trap modes: the whole tree (a hardlink pair shares one inode; a symlink has its
    own; a directory larger than what a first touch answers ahead), and the roots: the
    mount's and the repository's "." and ".."."""
    r = hep_exec(served.proxy, [sys.executable, "-c", WALK], keys=served.key)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == (
        f"{BIG + 30 + 2 + 2 + 1 + 2 + 1 + 1 + 1} entries 0 differ hardlinks share one link its own"
    ), r.stdout


def test_find_sees_the_inodes_stat_says(served: Served) -> None:
    """find -printf %i (the listing's numbers) and find -inum with a number stat gave."""
    job = f"cd {ROOT} && find a -printf '%i %p\\n' | sort -k2 && "
    job += "stat -c '%i %n' $(find a | sort) && find a -inum $(stat -c %i a/f07)"
    r = hep_exec(served.proxy, ["sh", "-c", job], keys=served.key, options=["--stats-internals"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    n = (len(lines) - 1) // 2
    assert n > 30 and lines[:n] == lines[n : 2 * n], r.stdout
    assert lines[-1] == "a/f07"


def test_a_static_program_gets_them_from_the_tracer(served: Served) -> None:
    """A static program's getdents64 comes from no call site of ours: each goes to the
    tracer, which gives the same numbers (and the mount's own directory, whose ".." is a
    host directory)."""
    dirs = [ROOT, f"{ROOT}/a", f"{ROOT}/a/b/c", f"{ROOT}/big", "/cvmfs", "/tmp"]
    r = hep_exec(served.proxy, [str(served.lister), *dirs], keys=served.key)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.fullmatch(r"\d+ entries, 0 differ\n", r.stdout), r.stdout


def test_listing_a_directory_again_takes_no_stop(served: Served) -> None:
    """Once listed (its entries' answers published), a directory's getdents64 is answered
    inside the program, renumbered there: listing it 200 more times stops it no more; and
    with --no-in-process every listing goes to the tracer, with the same numbers."""
    code = f"import os; print(sorted((e.name, e.inode()) for e in os.scandir('{ROOT}/a')))"
    loop = f"import os\nfor _ in range(ROUNDS):\n    list(os.scandir('{ROOT}/a'))\n{code}"
    got = {}
    for rounds in (1, 201):
        argv = [sys.executable, "-c", loop.replace("ROUNDS", str(rounds))]
        r = hep_exec(served.proxy, argv, keys=served.key, options=["--stats-internals"])
        assert r.returncode == 0, r.stderr
        got[rounds] = (stops(r.stderr), r.stdout)
    assert got[201][0] - got[1][0] < 10, got
    assert got[1][1] == got[201][1]
    r = hep_exec(served.proxy, [sys.executable, "-c", code], keys=served.key,
                 options=["--no-in-process"])  # fmt: skip
    assert r.returncode == 0 and r.stdout == got[1][1], r.stderr


def test_a_directory_opened_through_a_symlink_lists_its_real_parent(served: Served) -> None:
    """ ".." of a directory opened through a symlink (a/clink -> b/c) is its real parent (a/b),
    as the kernel says, not the symlink's (a): in a listing and for a relative path from
    there.  ls -ai shows it (each ls's listing the tracer's); a dynamic program lists one
    directory after another, the later ones in-process (its getdents64 site patched), named
    by the path the open of each published."""
    job = f"cd {ROOT} && for i in 1 2 3; do ls -aiU a/b/ a/clink/ && stat -c %i a/clink/../c; done"
    job += " && stat -c '%i %n' a a/b a/b/c"
    r = hep_exec(served.proxy, ["sh", "-c", job], keys=served.key)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    ino = {n: i for i, n in (ln.split() for ln in lines[-4:-1])}
    listed: list[tuple[str, str, str]] = []  # (directory, name, inode)
    where = ""
    for ln in lines[:-4]:
        if ln.endswith(":"):
            where = ln[:-1]
        elif len(ln.split()) == 2:
            i, name = ln.split()
            listed.append((where, name, i))
        elif ln.strip():
            assert ln.strip() == ino["a/b/c"], "a/clink/../c"
    want = {("a/b/", "."): "a/b", ("a/b/", ".."): "a", ("a/clink/", "."): "a/b/c",
            ("a/clink/", ".."): "a/b", ("a/b/", "c"): "a/b/c"}  # fmt: skip
    seen = [(d, n, i) for d, n, i in listed if (d, n) in want]
    assert len(seen) == 3 * len(want), r.stdout
    for d, n, i in seen:
        assert i == ino[want[d, n]], (d, n, r.stdout)
    dirs = [f"{ROOT}/a/b", f"{ROOT}/a/clink", f"{ROOT}/a/clink/", f"{ROOT}/a", f"{ROOT}/a/clink"]
    r = hep_exec(served.proxy, [str(served.dynamic_lister), *dirs], keys=served.key)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.fullmatch(r"\d+ entries, 0 differ\n", r.stdout), r.stdout


def test_host_directories_are_the_kernels(served: Served, tmp_path: Path) -> None:
    """A host directory lists as the kernel lists it (d_ino its own, stat's)."""
    for i in range(20):
        (tmp_path / f"h{i}").write_text("x")
    code = (
        "import os, sys; d = sys.argv[1]; print(sorted((e.name, e.inode()) for e in os.scandir(d)))"
    )
    native = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    r = hep_exec(served.proxy, [sys.executable, "-c", code, str(tmp_path)], keys=served.key)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native
