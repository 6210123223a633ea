"""One vocabulary of download errors: one line each, naming the URL and what failed, in the
words a site admin uses (never a library's exception name)."""

from __future__ import annotations

import errno
import sys


class DownloadError(Exception):
    """Every route failed for one file; ``str()`` names it and each URL's failure."""

    def __init__(self, what: str, failures: list[str], bad_data: bool = False) -> None:
        tried = "; ".join(dict.fromkeys(failures)) or "no route to try"
        super().__init__(f"{what}: failed on every server ({tried})")
        self.what = what
        self.failures = failures
        self.bad_data = bad_data  # some answer had wrong or too many bytes


class NotFound(DownloadError):
    """Every server that answered said 404."""

    def __init__(self, what: str, failures: list[str]) -> None:
        super().__init__(what, failures)
        tried = "; ".join(dict.fromkeys(failures))
        self.args = (f"{what}: not found on any server ({tried})",)


def human_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def network_reason(e: BaseException) -> str:
    """What went wrong on the wire, for a log line (the transport maps its own errors here)."""
    if isinstance(e, TimeoutError):
        return "timed out"
    ssl = sys.modules.get("ssl")  # loaded by the transport if TLS was used; not here
    if ssl is not None and isinstance(e, ssl.SSLError):
        return f"TLS failed ({getattr(e, 'reason', None) or 'handshake'})"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, OSError):
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "host unreachable"
        if e.strerror:
            return e.strerror[0].lower() + e.strerror[1:]
    return "connection failed"
