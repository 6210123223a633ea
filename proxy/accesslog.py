"""One access-log line per request in the Combined Log Format (what nginx and Apache write).

Lines are buffered and written with one ``write(2)`` per batch on an ``O_APPEND`` descriptor,
so several worker processes can share one file without tearing lines.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse


def quote(s: str) -> str:
    """A field inside double quotes: backslash and quote escaped, empty as ``-``."""
    return s.replace("\\", "\\\\").replace('"', '\\"') if s else "-"


def combined_line(
    host: str,
    when: str,
    request_line: str,
    status: int,
    size: int,
    referer: str,
    agent: str,
) -> str:
    """``%h - - [%t] "%r" %s %b "%{Referer}i" "%{User-Agent}i"``; quotes in fields escaped."""
    q = quote
    return (
        f'{host} - - [{when}] "{q(request_line)}" {status} {size if size else "-"} '
        f'"{q(referer)}" "{q(agent)}"\n'
    )


class AccessLog:
    """Buffered writer; ``target`` is ``-`` (stdout), ``off`` or a file path."""

    def __init__(self, target: str, flush_bytes: int = 65536) -> None:
        self.enabled = target != "off"
        self._own = False
        self.fd = -1
        if target == "-":
            self.fd = sys.stdout.fileno()
        elif self.enabled:
            self.fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._own = True
        self.flush_bytes = flush_bytes
        self._lines: list[str] = []
        self._size = 0
        self._second = -1
        self._stamp = ""

    def stamp(self, now: float) -> str:
        sec = int(now)
        if sec != self._second:
            self._second = sec
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(sec))
        return self._stamp

    def write(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._lines or self.fd < 0:
            return
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        self._lines.clear()
        self._size = 0
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                continue
            except OSError:
                return
            view = view[n:]

    def close(self) -> None:
        self.flush()
        if self._own:
            os.close(self.fd)
            self.fd = -1


def logger_class(log: AccessLog) -> type[AbstractAccessLogger]:
    """An aiohttp access-logger class writing to ``log`` (instantiated per connection)."""

    class _Logger(AbstractAccessLogger):
        def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
            size = 0 if request.method == "HEAD" else (response.content_length or 0)
            version = f"HTTP/{request.version.major}.{request.version.minor}"
            log.write(
                combined_line(
                    request.remote or "-",
                    log.stamp(_now()),
                    f"{request.method} {request.raw_path} {version}",
                    response.status,
                    size,
                    request.headers.get("Referer", ""),
                    request.headers.get("User-Agent", ""),
                )
            )

        @property
        def enabled(self) -> bool:
            return log.enabled

    return _Logger


def _now(*_: Any) -> float:
    return time.time()
