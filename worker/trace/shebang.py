"""What an exec runs: ``#!`` lines as the kernel's binfmt_script reads them, and what
/proc/<pid>/exe says after an exec (worker.trace.answers, Session._exec)."""

from __future__ import annotations

import os
import stat


def exe_link(file: bytes) -> bytes:
    """What /proc/<pid>/exe will say after exec of ``file`` (a /proc/<pid>/fd/<n> path is
    replaced by its target, e.g. ``/memfd:name (deleted)``; a RAM file by name on our tmpfs,
    /proc/<pid>/fd/<dir>/<name>, says ``/<name>``)."""
    if file.startswith(b"/proc/"):
        try:
            return os.readlink(file)
        except OSError:
            pass
    return os.path.realpath(file)


def file_head(path: bytes) -> bytes:
    """The first bytes of a file about to be exec'd: a ``#!`` line, if any.  Only a regular
    file is read (the kernel execs nothing else), and never waited for (a FIFO's open would
    hold the tracer until a writer came)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return b""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, 256, 0) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return b""
    finally:
        os.close(fd)


def parse_shebang(head: bytes) -> tuple[bytes, bytes] | None:
    """``#!interp [arg]`` as binfmt_script reads it (one optional argument)."""
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip(b" \t")
    if not line:
        return None
    interp, _, arg = line.replace(b"\t", b" ").partition(b" ")
    return interp, arg.strip(b" ")
