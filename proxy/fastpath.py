"""Recognise the common simple request in one read: ``GET|HEAD target HTTP/1.1`` + headers.

Sans-I/O. Used by the connection guard to answer memory-cache hits without going through
aiohttp's request machinery; anything unusual (bodies, pipelining, HTTP/1.0, obs-fold,
odd characters, big heads, no-cache) returns None and is left to aiohttp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TARGET = re.compile(rb"[\x21-\x7e]+")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REFUSE = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})


@dataclass(frozen=True, slots=True)
class SimpleRequest:
    method: str
    target: str
    close: bool
    no_cache: bool
    user_agent: str
    referer: str


def has_body_headers(data: bytes) -> bool:
    low = data.lower()
    return b"content-length" in low or b"transfer-encoding" in low


def parse_simple(data: bytes, max_size: int = 8192, max_headers: int = 64) -> SimpleRequest | None:
    """One complete bodiless HTTP/1.1 GET/HEAD request, exactly, or None."""
    if len(data) > max_size or not data.endswith(b"\r\n\r\n"):
        return None
    head = data[:-4]
    if b"\r\n\r\n" in head:
        return None
    lines = head.split(b"\r\n")
    if len(lines) > max_headers + 1:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in (b"GET", b"HEAD"):
        return None
    if _TARGET.fullmatch(parts[1]) is None:
        return None
    close = no_cache = False
    agent = referer = ""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None or _VALUE_BAD.search(value):
            return None
        n = name.lower()
        if n in _REFUSE:
            return None
        if n == b"connection":
            v = value.lower()
            if b"upgrade" in v:
                return None
            close = close or b"close" in v
        elif n in (b"cache-control", b"pragma"):
            no_cache = no_cache or b"no-cache" in value.lower()
        elif n == b"user-agent":
            agent = value.strip().decode("latin-1")
        elif n == b"referer":
            referer = value.strip().decode("latin-1")
    return SimpleRequest(
        parts[0].decode("ascii"), parts[1].decode("ascii"), close, no_cache, agent, referer
    )
