"""A hep-exec started inside another hep-exec job: run the command as it is.

Why: the outer job's tracer serves /cvmfs to every process of the job, its descendants too,
and a second tracer cannot take over part of that tree: it cannot add a seccomp listener
below the outer one (EBUSY) nor ptrace a process the outer already traces (EPERM), and the
outer's filter would still see every call first.  A job script that wraps its own steps in
hep-exec (or a pilot that wraps every payload, payloads that do it again) should simply get
the outer job's /cvmfs.  So the outer job names itself in its command's environment
(:data:`MARKER`), and an inner hep-exec that finds itself traced by that very process runs
its command directly.  A repository the command names that the outer job does not serve is
said in one line (the inner hep-exec's own servers cannot be used inside the job), but the
command runs all the same: a name in its arguments or environment is a guess at what it reads,
and the outer job answers what it actually reads.  A stale marker (an environment copied from
another job) is ignored: only the process that traces us counts.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

MARKER = "HEP_EXEC_JOB"  # "<pid of the job's hep-exec> <mount>", in its command's environment


class OuterJob(NamedTuple):
    """The hep-exec job this process runs in."""

    pid: int
    mount: str


def marker_value(pid: int, mount: str) -> str:
    return f"{pid} {mount}"


def status_field(status: str, name: str) -> int | None:
    """An integer field of a /proc/<pid>/status text (``TracerPid``, ``Tgid``), or None."""
    for line in status.splitlines():
        key, sep, value = line.partition(":")
        if sep and key == name:
            value = value.strip()
            return int(value) if value.isdigit() else None
    return None


def outer_job(environ: Mapping[str, str], tracer_tgid: int | None) -> OuterJob | None:
    """The job the marker names, if the process tracing us (its thread group) is that job's
    hep-exec; None otherwise (no marker, a malformed or stale one, or not traced)."""
    pid, sep, mount = environ.get(MARKER, "").partition(" ")
    if not sep or not pid.isdigit() or not mount.startswith("/") or tracer_tgid is None:
        return None
    return OuterJob(int(pid), mount) if int(pid) == tracer_tgid else None


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def our_tracer_tgid() -> int | None:
    """The thread group (process) of whatever ptraces us, or None."""
    tracer = status_field(_read("/proc/self/status"), "TracerPid")
    if not tracer:
        return None
    return status_field(_read(f"/proc/{tracer}/status"), "Tgid")


def run_inside(outer: OuterJob, mount: str, named: Sequence[str], command: Sequence[str]) -> int:
    """Exec ``command`` as it is, its /cvmfs the outer job's; an exit status only if that
    cannot be (2: the outer job serves another mount point; 126/127: no such command)."""
    where = f"this command runs inside another hep-exec job (pid {outer.pid})"
    if mount.rstrip("/") != outer.mount.rstrip("/"):
        print(
            f"hep-exec: {where}, which serves {outer.mount}; a second hep-exec cannot trace "
            f"its command to serve {mount} as well: run it outside that job",
            file=sys.stderr,
        )
        return 2
    for fqrn in named:
        try:
            os.stat(f"{outer.mount.rstrip('/')}/{fqrn}")  # the outer job answers (and mounts it)
        except OSError as e:
            print(
                f"hep-exec: {where}, which serves {outer.mount} for all its processes but not "
                f"{fqrn} ({e.strerror}); a second hep-exec cannot serve it inside that job: "
                f"give the outer hep-exec the servers for {fqrn}",
                file=sys.stderr,
            )
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], list(command))
    except OSError as e:
        print(f"hep-exec: {command[0]}: {e.strerror}", file=sys.stderr)
        return 127 if e.errno == errno.ENOENT else 126
    raise AssertionError("unreachable")  # pragma: no cover - execvp returns only by raising
