"""Repository names, repository paths and their MD5 path keys (catalog primary keys)."""

from __future__ import annotations

import hashlib
import re
import struct

# A fully qualified repository name, as hep-publish and the preload spec take it: host-like,
# at least one dot, no empty, "." or ".." label (so it is always one safe directory name).
FQRN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)+")
FQRN_HINT = "letters, digits, '-' and '_' in dot-separated parts, like demo.example.org"


def is_fqrn(name: str) -> bool:
    """Is ``name`` a fully qualified repository name (``cms.cern.ch``, not ``cms``)?"""
    return len(name) <= 253 and FQRN.fullmatch(name) is not None


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
