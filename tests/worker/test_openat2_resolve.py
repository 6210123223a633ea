"""openat2's RESOLVE_* flags on /cvmfs paths answer as the kernel's on a read-only mount of the
same tree: RESOLVE_IN_ROOT, RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, RESOLVE_NO_XDEV,
RESOLVE_NO_MAGICLINKS, through relative and escaping symlinks and "..".  Before, the kernel
applied them to the RAM file's /proc link (ELOOP, EXDEV, EAGAIN where the open works) and,
for RESOLVE_IN_ROOT's absolute paths, to the job's mirror of the directory, whose files are
empty: the program read 0 bytes of a file that has some (Go's os.Root, cap-std, libpathrs)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hep_exec import hep_exec, serving
from tests.support.read_only_mount import on_a_read_only_mount
from tests.support.tracing import compile_c, ensure_built

pytestmark = pytest.mark.slow  # real servers and traced programs

FQRN = "openat2.test.org"

PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void probe(const char *label, int dirfd, const char *path, unsigned long long flags,
                  unsigned long long resolve) {
    struct open_how how = {.flags = flags, .resolve = resolve};
    long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    if (fd < 0) {
        printf("%s %s\n", label, strerrorname_np(errno));
        return;
    }
    char buf[64] = {0};
    long n = (flags & O_PATH) || (flags & O_DIRECTORY) ? 0 : read(fd, buf, sizeof buf - 1);
    buf[n > 0 ? strcspn(buf, "\n") : 0] = 0;
    printf("%s ok '%s'\n", label, buf);
    close(fd);
}

int main(int argc, char **argv) {
    char p[4096];
    int root = open(argv[1], O_RDONLY | O_DIRECTORY);
    snprintf(p, sizeof p, "%s/d", argv[1]);
    int d = open(p, O_RDONLY | O_DIRECTORY);
    struct { const char *name; unsigned long long flag; } rs[] = {
        {"none", 0}, {"no-symlinks", RESOLVE_NO_SYMLINKS}, {"beneath", RESOLVE_BENEATH},
        {"in-root", RESOLVE_IN_ROOT}, {"no-xdev", RESOLVE_NO_XDEV},
        {"no-magiclinks", RESOLVE_NO_MAGICLINKS},
    };
    const char *paths[] = {"d/f", "/d/f", "../d/f", "d/../d/f", "link_f", "dlink/f", "up",
                           "nothere", "top/x", "d", "dlink", "./d/./f", "d/f/"};
    char label[256];
    for (unsigned i = 0; i < sizeof rs / sizeof rs[0]; i++)
        for (unsigned k = 0; k < sizeof paths / sizeof paths[0]; k++) {
            snprintf(label, sizeof label, "root %s %s", rs[i].name, paths[k]);
            probe(label, root, paths[k], O_RDONLY, rs[i].flag);
        }
    probe("root no-symlinks nofollow-path link_f", root, "link_f", O_PATH | O_NOFOLLOW,
          RESOLVE_NO_SYMLINKS);
    probe("root beneath directory d", root, "d", O_RDONLY | O_DIRECTORY, RESOLVE_BENEATH);
    probe("d beneath ../top", d, "../top", O_RDONLY, RESOLVE_BENEATH);
    probe("d in-root ../top", d, "../top", O_RDONLY, RESOLVE_IN_ROOT);
    probe("d no-xdev ../top", d, "../top", O_RDONLY, RESOLVE_NO_XDEV);
    probe("d in-root /f", d, "/f", O_RDONLY, RESOLVE_IN_ROOT);
    snprintf(p, sizeof p, "%s/d/f", argv[1]);
    probe("absolute no-xdev", AT_FDCWD, p, O_RDONLY, RESOLVE_NO_XDEV);
    probe("absolute no-symlinks", AT_FDCWD, p, O_RDONLY, RESOLVE_NO_SYMLINKS);
    probe("absolute beneath from root", root, p, O_RDONLY, RESOLVE_BENEATH);
    return 0;
}
"""


@dataclass(frozen=True)
class Tree:
    proxy: str
    key: Path
    src: Path
    probe: Path


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    ensure_built()
    base = tmp_path_factory.mktemp("openat2")
    src = base / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"in d/f\n")
    (src / "top").write_bytes(b"at the top\n")
    (src / "link_f").symlink_to("d/f")
    (src / "dlink").symlink_to("d")
    (src / "up").symlink_to("../outside")
    probe = compile_c(PROBE, base / "probe")
    with serving(src, FQRN, base) as (proxy, repo):
        yield Tree(proxy, repo.master_pub, src, probe)


def test_resolve_flags_answer_as_on_a_read_only_mount(
    tree: Tree, tmp_path: Path, trap_mode: str
) -> None:
    native = on_a_read_only_mount(tree.src, tmp_path / "mnt", [str(tree.probe), "{mnt}"])
    lines = native.splitlines()
    for expected in [  # what the kernel says, so that the oracle is known to be one
        "root in-root /d/f ok 'in d/f'", "root beneath /d/f EXDEV", "root beneath up EXDEV",
        "root no-symlinks link_f ELOOP", "root beneath link_f ok 'in d/f'",
        "d in-root ../top ENOENT", "d beneath ../top EXDEV", "absolute no-xdev EXDEV",
        "root in-root ../d/f ok 'in d/f'",
    ]:  # fmt: skip
        assert expected in lines, expected
    r = hep_exec(tree.proxy, [str(tree.probe), f"/cvmfs/{FQRN}"], keys=tree.key)
    assert r.returncode == 0, r.stderr
    wrong = [(a, b) for a, b in zip(lines, r.stdout.splitlines(), strict=True) if a != b]
    assert not wrong, wrong
