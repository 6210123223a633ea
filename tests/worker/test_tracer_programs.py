"""Real programs run from /cvmfs under the tracer: shells, Python, gcc, make, threads, spawn.

Each test runs with both drivers (tests/worker/conftest.py ``driver``): the host-directory
policy in both trap modes, and the real hep-exec against the same tree published by our
publisher and served by nginx on loopback (with both kinds of RAM file where programs are
mapped or exec'd from them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.drivers import DRIVERS_RAM_FILES, Driver
from tests.support.node_cache import upcalls
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


FD_EXEC = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.set_inheritable(fd, True)
if os.fork() == 0:
    os.execv(f"/proc/self/fd/{fd}", ["script", "by-proc"])
os.wait()
os.execv(f"/dev/fd/{fd}", ["script", "by-dev"])
"""


def test_scripts_exec_d_through_their_fd_name_the_caller_s_fd(
    driver: Driver, tmp_path: Path
) -> None:
    """exec of /proc/self/fd/N or /dev/fd/N (fexecve's fallback) is of the caller's fd N,
    not the tracer's: a host script whose interpreter is in /cvmfs runs it, and the
    interpreter gets the path as the caller gave it."""
    script = tmp_path / "script"
    script.write_text(f"#!{driver.root}/bin/interp.sh -y\nnot shell\n")
    script.chmod(0o755)
    r = driver.run([sys.executable, "-c", FD_EXEC, str(script)], timeout=60)
    assert r.returncode == 0, r.stderr
    fd = r.stdout.split()[2].rsplit("/", 1)[1]
    assert r.stdout == f"interp -y /proc/self/fd/{fd} by-proc\ninterp -y /dev/fd/{fd} by-dev\n"


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


def test_host_scripts_binaries_and_fifos_exec_as_natively(driver: Driver, tmp_path: Path) -> None:
    """Host files exec'd under the tracer: a binary and a script for a host interpreter run
    as the kernel runs them (the C side reads their #! line, no upcall); a host script whose
    interpreter lives in /cvmfs (spaces after #! too) is Python's.  exec of a FIFO waits for
    a writer, then fails (126), as natively, by absolute and relative path (a relative
    script's interpreter gets "./script", as from the kernel): only the process that asked
    waits (reading its #! line must never hold the tracer, and every other
    process of the job with it)."""
    (tmp_path / "plain").write_text('#!/bin/sh\necho "plain $1"\n')
    (tmp_path / "spaced").write_text(f"#!  {driver.root}/bin/interp.sh -y\nnot shell\n")
    for name in ("plain", "spaced"):
        (tmp_path / name).chmod(0o755)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "fifo").chmod(0o755)
    script = (
        f"{tmp_path}/plain a; {tmp_path}/spaced b; /bin/echo bin; "
        f"( {tmp_path}/fifo 2>/dev/null; echo abs $? ) & sleep 0.3; echo other; "
        f"echo x > {tmp_path}/fifo; wait; "
        f"cd {tmp_path} && {{ ( ./fifo 2>/dev/null; echo rel $? ) & sleep 0.3; "
        "echo x > fifo; wait; ./spaced c; }"
    )
    r = driver.run(["bash", "-c", script], timeout=60)
    assert r.returncode == 0, r.stderr
    # the interpreter gets the script's path as the caller gave it (binfmt_script)
    want = f"plain a\ninterp -y {tmp_path}/spaced b\nbin\nother\nabs 126\nrel 126\n"
    want += "interp -y ./spaced c\n"
    assert r.stdout == want
    # 60 host execs, by absolute and relative path and through PATH (execvp tries each
    # entry), ask Python nothing: each was an upcall
    loop = f"cd {tmp_path}; for i in $(seq 20); do /bin/true; ./plain; true-not-here; done"
    r = driver.run(["bash", "-c", loop + " 2>/dev/null; true"], stats=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("execve") == 1 and upcalls(r.stderr) == 0, r.stderr[-2000:]


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
