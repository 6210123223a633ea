"""Request target → what to serve: the one place that decides which store file a request names.

Sans-I/O: takes the method and the raw request target (origin-form ``/cvmfs/…`` or
absolute-form ``http://host/cvmfs/…``) and returns a :class:`Target` or a :class:`Reject`.
Only four fixed root files and paths accepted by the strict object-name regex of
:func:`cvmfs_format.objects.parse_object_path` ever map to a file, so ``..``, encoded
traversal, absolute paths, doubled slashes and odd characters all end in 404 before any
file-system call.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Container
from dataclasses import dataclass
from urllib.parse import unquote

from cvmfs_format.errors import FormatError
from cvmfs_format.objects import ObjectName, parse_object_path
from cvmfs_format.store import REPLICA_MARKER


class Kind(enum.Enum):
    """What a request asks for; decides headers and caching."""

    MANIFEST = "manifest"
    WHITELIST = "whitelist"
    ROOT_FILE = "root_file"  # other fixed .cvmfs* files (.cvmfswhitelist.pkcs7, the marker)
    DATA = "data"
    REPOSITORIES = "repositories"
    HEALTH = "health"
    METRICS = "metrics"


ROOT_FILES = {
    ".cvmfspublished": Kind.MANIFEST,
    ".cvmfswhitelist": Kind.WHITELIST,
    ".cvmfswhitelist.pkcs7": Kind.ROOT_FILE,
    # served only where the store has it: a repository whose published revision is complete
    REPLICA_MARKER: Kind.ROOT_FILE,
}

_FQRN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
_ABSOLUTE = re.compile(r"[hH][tT][tT][pP]://[^/?#\s]*(?P<path>/[^\s]*)?")


@dataclass(frozen=True, slots=True)
class Target:
    """A servable resource; ``relpath`` is relative to the repository directory."""

    kind: Kind
    fqrn: str = ""
    relpath: str = ""
    object: ObjectName | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """A request that is answered with an error status and never touches the store."""

    status: int
    reason: str


NOT_FOUND = Reject(404, "not found")


def valid_fqrn(name: str) -> bool:
    """Repository names as directories: no slashes, no leading dot, no dot segments."""
    return len(name) <= 253 and _FQRN.fullmatch(name) is not None


def request_path(target: str) -> str | None:
    """The path of an origin-form or absolute-form (``http://…``) target, query removed."""
    if target.startswith("/"):
        path = target
    else:
        m = _ABSOLUTE.fullmatch(target)
        if m is None:
            return None
        path = m["path"] or "/"
    for sep in ("?", "#"):
        path = path.split(sep, 1)[0]
    return path


def route(method: str, target: str, repositories: Container[str]) -> Target | Reject:
    """Decide what ``method target`` serves, given the names of the repositories on offer."""
    if method not in ("GET", "HEAD"):
        return Reject(405, f"method {method} not allowed")
    raw = request_path(target)
    if raw is None:
        return NOT_FOUND
    try:
        path = unquote(raw, errors="strict") if "%" in raw else raw
    except UnicodeDecodeError:
        return NOT_FOUND
    if not path.isascii() or "\\" in path or "\x00" in path:
        return NOT_FOUND
    if path == "/healthz":
        return Target(Kind.HEALTH)
    if path == "/metrics":
        return Target(Kind.METRICS)
    if path == "/cvmfs/info/v1/repositories.json":
        return Target(Kind.REPOSITORIES)
    parts = path.split("/", 3)
    if len(parts) != 4 or parts[0] != "" or parts[1] != "cvmfs":
        return NOT_FOUND
    fqrn, rest = parts[2], parts[3]
    if not valid_fqrn(fqrn) or fqrn not in repositories:
        return NOT_FOUND
    kind = ROOT_FILES.get(rest)
    if kind is not None:
        return Target(kind, fqrn, rest)
    try:
        name = parse_object_path(rest)
    except FormatError:
        return NOT_FOUND
    # parse_object_path is a full match of data/XX/<hex>…, so rest is exactly the canonical path
    if name.path != rest:
        return NOT_FOUND
    return Target(Kind.DATA, fqrn, rest, name)
