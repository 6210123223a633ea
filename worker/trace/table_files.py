"""Files a tracee opens in place of a /proc (or /etc/mtab) table the tracer rewrote: a sealed
memfd per open, named to the tracer as ``/proc/<our pid>/fd/<n>``; the last :data:`KEPT`
stay open (the tracee opens its file after the answer), older ones are closed."""

from __future__ import annotations

import fcntl
import os
from collections import deque

KEPT = 64  # table files kept open after their open was answered


class TableFiles:
    def __init__(self) -> None:
        self._fds: deque[int] = deque()

    def file_of(self, data: bytes, name: str) -> bytes | None:
        """A new file holding ``data`` (read-only: sealed); None if none can be made (the
        kernel's table is then the answer)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except OSError:
            os.close(fd)
            return None
        self._fds.append(fd)
        while len(self._fds) > KEPT:
            os.close(self._fds.popleft())
        return b"/proc/%d/fd/%d" % (os.getpid(), fd)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())
