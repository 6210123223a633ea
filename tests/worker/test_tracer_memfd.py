"""The tracer with answers shaped like the RAM-cache data side's: sealed memfds, opened by the
tracees through ``/proc/<tracer pid>/fd/<n>``."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tracing import MOUNT, compile_c, ensure_built, in_child, needs_ptrace
from worker.trace.hostpolicy import HostDirPolicy
from worker.trace.policy import Node, Opened
from worker.trace.tracer import run

pytestmark = [needs_ptrace, pytest.mark.usefixtures("trap_mode")]

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class MemfdPolicy(HostDirPolicy):
    """Host directory metadata, file bytes from sealed memfds held by this process."""

    def __init__(self, root: Path) -> None:
        super().__init__({"test.repo": root})
        self.fds: dict[bytes, int] = {}

    def open(self, pid: int, path: bytes, node: Node) -> Opened | int:
        fd = self.fds.get(path)
        if fd is None:
            host = super().open(pid, path, node)
            if isinstance(host, int):
                return host
            fd = os.memfd_create(
                os.fsdecode(os.path.basename(path)), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            )
            with open(host.path, "rb") as f:
                os.write(fd, f.read())
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            self.fds[path] = fd
        return Opened(os.fsencode(f"/proc/{os.getpid()}/fd/{fd}"))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


APP = r"""
#include <stdio.h>
int mylib_answer(void);
int main(void) { printf("answer %d\n", mylib_answer()); return 0; }
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_built()
    root = tmp_path_factory.mktemp("memrepo")
    build = tmp_path_factory.mktemp("membuild")
    (root / "bin").mkdir()
    (root / "lib").mkdir()
    (root / "py/pkg").mkdir(parents=True)
    lib_c = build / "mylib.c"
    lib_c.write_text("int mylib_answer(void) { return 42; }\n")
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(root / "lib/libmylib.so"), str(lib_c)], check=True
    )
    compile_c(APP, root / "bin/app", f"-L{root / 'lib'}", "-lmylib", "-Wl,-rpath,$ORIGIN/../lib")
    (root / "py/pkg/__init__.py").write_text("import os\nHERE = os.path.dirname(__file__)\n")
    (root / "py/pkg/data.bin").write_bytes(bytes(range(256)) * 1000)
    busybox = shutil.which("busybox")
    if busybox:
        shutil.copy(busybox, root / "bin/busybox")
        (root / "bin/script").write_text(f"#!{MOUNT}/bin/busybox sh\necho script $0\n")
        (root / "bin/script").chmod(0o755)
    return root


def run_memfd(repo: Path, argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``argv`` under the tracer with :class:`MemfdPolicy` (in a forked child of the test
    process, which :func:`in_child` explains); its exit status and what it printed."""

    def traced_in_process() -> int:
        policy = MemfdPolicy(repo)
        try:
            return run(argv, policy).status
        finally:
            policy.close()

    status = in_child(traced_in_process)
    return status, capfd.readouterr().out


def test_binary_with_origin_rpath_runs_from_memfds(
    repo: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    status, out = run_memfd(repo, [f"{MOUNT}/bin/app"], capfd)
    assert (status, out) == (0, "answer 42\n")


def test_python_reads_and_mmaps_memfd_files(repo: Path, capfd: pytest.CaptureFixture[str]):
    code = (
        f"import sys, mmap, hashlib; sys.path.insert(0, '{MOUNT}/py'); import pkg\n"
        "f = open(pkg.HERE + '/data.bin', 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "print(pkg.HERE, len(m), hashlib.sha256(m).hexdigest()[:16])\n"
    )
    import hashlib

    want = hashlib.sha256((repo / "py/pkg/data.bin").read_bytes()).hexdigest()[:16]
    status, out = run_memfd(repo, [sys.executable, "-S", "-c", code], capfd)
    assert (status, out) == (0, f"{MOUNT}/py/pkg 256000 {want}\n")


def test_static_interpreter_from_memfd_runs_script(
    repo: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    if not (repo / "bin/busybox").exists():
        pytest.skip("busybox not installed")
    status, out = run_memfd(repo, [f"{MOUNT}/bin/script"], capfd)
    assert (status, out) == (0, f"script {MOUNT}/bin/script\n")
