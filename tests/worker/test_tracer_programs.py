"""Real programs run from /cvmfs under the tracer: shells, Python, gcc, make, threads, spawn.

Each test runs with both drivers (tests/worker/conftest.py ``driver``): the host-directory
policy in both trap modes, and the real hep-exec against the same tree published by our
publisher and served by nginx on loopback (with both kinds of RAM file where programs are
mapped or exec'd from them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.drivers import DRIVERS_RAM_FILES, Driver
from tests.support.tracing import needs_ptrace

pytestmark = needs_ptrace

with_ram_files = pytest.mark.parametrize("driver", DRIVERS_RAM_FILES, indirect=True)


def needs_busybox(driver: Driver) -> None:
    if not (driver.source / "bin/busybox").exists():
        pytest.skip("busybox not installed")


def test_bash_script_tree_sources_and_calls_binaries(driver: Driver) -> None:
    r = driver.run([f"{driver.root}/bin/main.sh"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"tool fromsh conf-line\nA=1 B=2 C=3 pwd={driver.root}/lib\n"


def test_python_imports_package_from_cvmfs(driver: Driver) -> None:
    code = "import pkg, pkg.sub.mod as m; print(pkg.VALUE, m.__file__)"
    r = driver.run([sys.executable, "-c", code], env={"PYTHONPATH": f"{driver.root}/py"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"forty-two {driver.root}/py/pkg/sub/mod.py\n"


@pytest.mark.slow
@with_ram_files
def test_gcc_with_headers_and_library_in_cvmfs(driver: Driver, tmp_path: Path) -> None:
    root, out = driver.root, tmp_path / "prog"
    r = driver.run(
        ["gcc", f"-I{root}/include", f"{root}/src/main.c", f"-L{root}/lib", "-lmylib",
         "-o", str(out)],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = driver.run([str(out)], env={"LD_LIBRARY_PATH": f"{root}/lib"})
    assert (r.returncode, r.stdout) == (0, "answer 42\n"), r.stderr


@with_ram_files
def test_shebang_interpreters_in_cvmfs(driver: Driver) -> None:
    """A script whose interpreter is a static binary in /cvmfs, and a script whose
    interpreter is itself a script in /cvmfs (with an argument on the ``#!`` line)."""
    needs_busybox(driver)
    r = driver.run([f"{driver.root}/bin/bb-script", "arg1"])
    assert (r.returncode, r.stdout) == (0, f"bb {driver.root}/bin/bb-script arg1\n"), r.stderr
    r = driver.run([f"{driver.root}/bin/nested", "z"])
    assert (r.returncode, r.stdout) == (0, f"interp -x {driver.root}/bin/nested z\n"), r.stderr


@pytest.mark.slow
@with_ram_files
def test_static_busybox_from_cvmfs(driver: Driver) -> None:
    needs_busybox(driver)
    root, bb = driver.root, f"{driver.root}/bin/busybox"
    r = driver.run([bb, "sh", "-c", f"cd {root}/etc && {bb} cat conf && {bb} ls {root}/lib"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["conf-line", "a.sh", "b.sh", "c.sh", "libmylib.so"]


def test_eight_threads_open_and_read_concurrently(driver: Driver) -> None:
    r = driver.run([f"{driver.root}/bin/threads"])
    assert (r.returncode, r.stdout) == (0, "threads done failures=0\n"), r.stderr


def test_vfork_and_posix_spawn(driver: Driver) -> None:
    r = driver.run([f"{driver.root}/bin/spawn"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "tool spawned conf-line\nposix_spawn status=0\ntool vforked conf-line\nvfork status=0\n"
    )


@pytest.mark.slow
def test_make_j4_from_cvmfs_makefile(driver: Driver, tmp_path: Path) -> None:
    r = driver.run(["make", "-j4", "-f", f"{driver.root}/mk/Makefile"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("*.o")) == [f"u{i}.o" for i in range(8)]
    assert (tmp_path / "libu.a").exists()


@with_ram_files
def test_proc_self_exe_names_the_cvmfs_path(driver: Driver) -> None:
    r = driver.run([f"{driver.root}/bin/self-exe"])
    assert (r.returncode, r.stdout) == (0, f"{driver.root}/bin/self-exe\n" * 2), r.stderr
