"""Oracle: tools see the same tree under /cvmfs (through the tracer) as in the source directory.

The tree is random (seeded) and lives on tmpfs like the tracer's mirror; find, ls, stat,
sha256sum, du, tar, cp -a and a C walker (tests.support.oracle) print the same on both
sides once inode numbers, times and block counts are normalised.  Both drivers: the
host-directory policy shows the tree itself (in both trap modes; hardlinks may cross
directories there), hep-exec shows it published by our publisher and served by nginx on
loopback (RAM files as picked here, and sealed memfds; hardlinks within one directory, as
CVMFS keeps them).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support.drivers import Driver
from tests.support.oracle import SCRIPT, SECTIONS, WALKER, compare
from tests.support.tracing import compile_c, ensure_built, native, needs_ptrace, ram_dir
from tests.support.trees import CHUNKED_SIZE, make_random_tree

pytestmark = [needs_ptrace, pytest.mark.slow]


@pytest.fixture(scope="module")
def walker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_built()
    return compile_c(WALKER, tmp_path_factory.mktemp("walker") / "walker")


@pytest.mark.parametrize(
    ("driver", "seed"),
    [
        ("hostpolicy-notify", 1),
        ("hostpolicy-ptrace", 1),
        ("hostpolicy-notify", 2),
        ("hostpolicy-ptrace", 2),
        ("hep-exec", 1),
        ("hep-exec-memfd", 2),
    ],
    indirect=["driver"],
)
def test_tools_agree_with_the_source_directory(driver: Driver, seed: int, walker: Path) -> None:
    """Every tool's output, section by section; the walker also rewinds each directory
    (getdents64 twice: same entries) and ends with getcwd in /cvmfs after fchdir."""
    fqrn = f"oracle{seed}-{driver.kind}.test.org"
    with ram_dir() as src:
        make_random_tree(
            src / "top",
            random.Random(seed),
            70,
            every_kind=True,
            hardlinks_across_dirs=driver.kind == "hostpolicy",
            catalogs=True,
            fifo=True,
            chunked=seed == 1,
        )
        mount = driver.mount(src, fqrn)
        want = native(["bash", "-c", SCRIPT, "x", str(src), str(walker)])
        got = driver.run(["bash", "-c", SCRIPT, "x", mount, str(walker)])
        w, g = compare(want.stdout, got.stdout, str(src), mount)
    assert want.returncode == 0, want.stderr
    assert got.returncode == 0, got.stderr
    assert list(g) == SECTIONS
    for name in SECTIONS:
        assert g[name] == w[name], (name, got.stderr[-3000:])
    assert "rewind mismatch" not in g["walker"]
    assert f"cwd {mount}/top" in g["walker"]
    assert "top/fifo p 0" in g["find"] and "top/out l " in g["find"]
    if seed == 1:
        assert f"top/chunked.bin f {CHUNKED_SIZE}" in g["find"]
