"""Debuggers under hep-exec: a process of the job cannot be traced by another one (hep-exec is
its tracer, and a process has one), so ptrace's TRACEME, ATTACH and SEIZE on it fail with
EPERM, as the kernel says; hep-exec adds one line saying why and what works instead (a core
file read by gdb under hep-exec), once a run.  A process outside the job stays the kernel's
to refuse or allow: the same answer inside the job as outside it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.tracing import compile_c, ensure_built, native, needs_ptrace, traced

pytestmark = needs_ptrace

# argv[1], if given: a pid outside the job to seize.  Else: a child asks to be traced by us
# (TRACEME), then we try to attach to and seize another child.
TRACERS = r"""
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>
static const char *res(long r) { return r == 0 ? "ok" : strerror(errno); }
static void on_child(enum __ptrace_request req, const char *what)
{
    pid_t c = fork();
    if (c == 0) {
        pause();
        _exit(0);
    }
    printf("%s child: %s\n", what, res(ptrace(req, c, 0, 0)));
    kill(c, SIGKILL);
    waitpid(c, NULL, 0);
}
int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc > 1) {
        printf("seize outside: %s\n", res(ptrace(PTRACE_SEIZE, atoi(argv[1]), 0, 0)));
        return 0; /* (exiting lets it go) */
    }
    int p[2];
    if (pipe(p))
        return 1;
    pid_t c = fork();
    if (c == 0) {
        dprintf(p[1], "traceme: %s\n", res(ptrace(PTRACE_TRACEME, 0, 0, 0)));
        _exit(0);
    }
    waitpid(c, NULL, 0);
    char buf[128];
    ssize_t n = read(p[0], buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    fputs(buf, stdout);
    on_child(PTRACE_ATTACH, "attach");
    on_child(PTRACE_SEIZE, "seize");
    return 0;
}
"""


@pytest.fixture(scope="module")
def tracers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_built()
    return compile_c(TRACERS, tmp_path_factory.mktemp("tracers") / "tracers")


def said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hep-exec: ")]


def test_tracing_a_process_of_the_job_is_refused_with_one_line(
    tracers: Path, tmp_path: Path, trap_mode: str
) -> None:
    natively = native([str(tracers)])
    assert natively.stdout.splitlines() == [
        "traceme: ok", "attach child: ok", "seize child: ok"
    ], natively  # fmt: skip
    r = traced(tmp_path, [str(tracers)])
    assert r.returncode == 0, r.stderr
    refused = "Operation not permitted"
    assert r.stdout.splitlines() == [
        f"traceme: {refused}", f"attach child: {refused}", f"seize child: {refused}"
    ], r  # fmt: skip
    lines = said(r.stderr)
    assert len(lines) == 1, r.stderr  # once a run, though three calls were refused
    line = lines[0]
    assert line.startswith("hep-exec: tracers (pid ") and "asked to be traced" in line, line
    assert "ulimit -c unlimited" in line and "gdb PROGRAM CORE" in line, line


def test_a_process_outside_the_job_is_the_kernels(
    tracers: Path, tmp_path: Path, trap_mode: str
) -> None:
    outside = subprocess.Popen(["sleep", "60"])
    try:
        natively = native([str(tracers), str(outside.pid)])
        inside = traced(tmp_path, [str(tracers), str(outside.pid)])
    finally:
        outside.kill()
        outside.wait()
    assert natively.stdout.startswith("seize outside: "), natively
    assert inside.returncode == 0 and inside.stdout == natively.stdout, (natively, inside)
    assert not said(inside.stderr), inside.stderr


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed here")
def test_gdb_says_why_it_cannot_run_the_program(tmp_path: Path) -> None:
    r = traced(tmp_path, ["gdb", "-q", "-batch", "-ex", "run", "--args", "true"], timeout=120)
    lines = said(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("hep-exec: gdb (pid "), r.stderr
