"""Repository paths and their MD5 path keys (catalog primary keys)."""

from __future__ import annotations

import hashlib
import struct


def path_key(path: str) -> tuple[int, int]:
    """MD5 of the path bytes split into two little-endian signed 64-bit integers."""
    a, b = struct.unpack("<qq", hashlib.md5(path.encode("utf-8", "surrogateescape")).digest())
    return a, b


ROOT_PARENT_KEY = (0, 0)


def normalize(path: str) -> str:
    """Repository-relative form: root is ``""``, else ``/a/b`` without trailing slash."""
    parts = [p for p in path.split("/") if p and p != "."]
    return "".join("/" + p for p in parts)


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if path else ""


def basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def is_within(path: str, prefix: str) -> bool:
    """Component-wise prefix test: ``/a/b`` is within ``/a`` and ``""``, not within ``/a/bc``."""
    return prefix == "" or path == prefix or path.startswith(prefix + "/")
