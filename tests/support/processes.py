"""Watching traced processes from outside: their descendants, their states, what they wait in,
the tracer's mirror directory they stand in, and a launcher that denies ptrace."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

# The tracer's private directory (tempfile.mkdtemp(prefix="hep-exec-")): /dev/shm/hep-exec-*
# where /dev/shm is writable.  /dev/shm/hep-exec-UID (the cache service's) never matches.
# the shadow tree's top: on the private tmpfs "hep-exec-<pid>-<hex>" (no host path), else
# a mkdtemp directory in /dev/shm
MIRROR_NAME = re.compile(r"hep-exec-(\d+-[0-9a-f]{12}|[a-z0-9_]{8})")

# execs argv[1:] with ptrace refused by a seccomp filter (EPERM), as some containers do
DENY_PTRACE = r"""
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <errno.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_ptrace, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog p = {4, f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &p))
        return 99;
    execvp(argv[1], argv + 1);
    return 98;
}
"""


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (through /proc/<pid>/task/*/children)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue  # it exited between being listed and now: nothing below it any more
        for task in tasks:
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("R", "S", "T", "t", "Z"…); "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def comm(pid: int) -> str:
    """The command name of ``pid`` (/proc/<pid>/comm): "sleep" once it exec'd sleep."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def started(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22): with the pid,
    it names one process even after the pid is reused (pid_max may be 32768)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def gone(pid: int, since: int | None = None) -> bool:
    """``pid`` has exited: reaped, or a zombie nobody has reaped yet; with ``since`` (its
    :func:`started`), also when the pid now belongs to another process."""
    if since is not None and started(pid) != since:
        return True
    return state(pid) in ("", "Z")


def waiting_in(pid: int) -> str:
    """The kernel function ``pid`` sleeps in (/proc/<pid>/wchan): "do_wait" for wait()."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def mirror_of(pids: set[int]) -> Path | None:
    """The tracer's private directory that one of ``pids`` has its working directory in (a
    tracee whose cwd is under /cvmfs really stands in the tracer's mirror of it)."""
    for pid in pids:
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        for d in (cwd, *cwd.parents):
            if MIRROR_NAME.fullmatch(d.name):
                return d
    return None


def remove_mirror(mirror: Path | None) -> None:
    """Remove a mirror a killed tracer left (it makes directories read-only: chmod first)."""
    if mirror is None or not mirror.exists():
        return
    for dirpath, dirnames, _ in os.walk(mirror):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o700)
    os.chmod(mirror, 0o700)
    shutil.rmtree(mirror, ignore_errors=True)
