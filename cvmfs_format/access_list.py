"""Access lists: the objects a run opened, in first-use order (``--record`` / ``--prefetch``).

Text format, UTF-8, one object per line, four tab-separated fields::

    # hep-exec access list v1
    <fqrn>\t<repository path>\t<content key>\t<size in bytes>

The repository path starts with ``/`` (``/lib/python3/os.py``); backslash, tab and newline in
it are written as ``\\\\``, ``\\t`` and ``\\n``. The content key is the CVMFS content hash
(``<40 hex>[-rmd160|-shake128]``), or ``chunked-<sha1>`` for chunked files. Blank lines and
``#`` comments are ignored. A list stays useful across repository updates: prefetch looks each
path up again and fetches what the current catalog names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from cvmfs_format.store import atomic_write

HEADER = "# hep-exec access list v1"


class AccessListError(ValueError):
    """A malformed access list; ``str()`` names file and line."""


class AccessEntry(NamedTuple):
    fqrn: str
    path: str
    key: str
    size: int


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _unescape(text: str, where: str) -> str:
    out: list[str] = []
    it = iter(text)
    for ch in it:
        if ch != "\\":
            out.append(ch)
            continue
        nxt = next(it, "")
        repl = {"\\": "\\", "t": "\t", "n": "\n"}.get(nxt)
        if repl is None:
            raise AccessListError(f"{where}: bad escape '\\{nxt}' in path")
        out.append(repl)
    return "".join(out)


def format_access_list(entries: Iterable[AccessEntry]) -> str:
    lines = [HEADER]
    lines += [f"{e.fqrn}\t{_escape(e.path)}\t{e.key}\t{e.size}" for e in entries]
    return "\n".join(lines) + "\n"


def parse_access_list(text: str, name: str = "access list") -> list[AccessEntry]:
    """Entries in file order (duplicates dropped); AccessListError names ``name:line``."""
    out: dict[tuple[str, str], AccessEntry] = {}
    # only "\n" ends a line (str.splitlines() would also split a path at \r, \v, \x85, …)
    for no, line in enumerate(text.split("\n"), 1):
        if not line.strip() or line.startswith("#"):
            continue
        where = f"{name}:{no}"
        fields = line.split("\t")
        if len(fields) != 4:
            raise AccessListError(
                f"{where}: expected 4 tab-separated fields (fqrn, path, key, size), "
                f"got {len(fields)}"
            )
        fqrn, raw_path, key, size_text = fields
        path = _unescape(raw_path, where)
        if not fqrn or "/" in fqrn or not path.startswith("/"):
            raise AccessListError(f"{where}: expected a repository name and a path starting /")
        try:
            size = int(size_text)
        except ValueError:
            raise AccessListError(f"{where}: size {size_text!r} is not an integer") from None
        if size < 0 or not key:
            raise AccessListError(f"{where}: bad key or size")
        out.setdefault((fqrn, path), AccessEntry(fqrn, path, key, size))
    return list(out.values())


def read_access_list(path: Path) -> list[AccessEntry]:
    try:
        text = path.read_bytes().decode("utf-8")  # no newline translation: \r is data
    except OSError as e:
        raise AccessListError(f"{path}: cannot read access list ({e.strerror})") from None
    except UnicodeDecodeError:
        raise AccessListError(f"{path}: not a UTF-8 access list") from None
    return parse_access_list(text, str(path))


class AccessRecorder:
    """Thread-safe first-use order of (repository, path); ``write`` is atomic."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], AccessEntry] = {}

    def add(self, fqrn: str, path: str, key: str, size: int) -> None:
        k = (fqrn, path)
        if k in self._seen:
            return
        with self._lock:
            self._seen.setdefault(k, AccessEntry(fqrn, path, key, size))

    @property
    def entries(self) -> list[AccessEntry]:
        with self._lock:
            return list(self._seen.values())

    def __len__(self) -> int:
        return len(self._seen)

    def write(self, path: Path) -> None:
        atomic_write(path, format_access_list(self.entries).encode())
