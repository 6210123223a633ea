"""Whether hep-exec said why a call failed: the tracer adds its own line, naming the path,
only when nothing did (and never for the errnos programs meet every day)."""

from __future__ import annotations

import errno
import logging


class _Said(logging.Handler):
    """Counts the warnings and errors hep-exec's loggers print, so that the tracer adds its
    own line for a failed call only when nothing said why."""

    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


SAID = _Said(logging.WARNING)
# what programs meet every day (probing names, writing to a read-only tree): no log line
EVERYDAY_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EROFS, errno.EACCES, errno.EINVAL}
    | {errno.ENODATA, errno.EISDIR, errno.ENAMETOOLONG, errno.EPERM}
)
logging.getLogger("hep_exec").addHandler(SAID)
