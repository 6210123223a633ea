"""Answers ahead shared by the jobs of a node: a new job starts with what earlier ones learnt.

A job answers the entries of each directory it touches before they are asked (the tracer's
answers ahead: stat, lstat, statx, getxattr, the names a directory does not have, the opens of
objects the node cache holds).  Those answers depend only on the repository's revision and
the path, except for a few values of the job's own (its uid, gid, st_dev, and the directory
through which it opens the service's objects), which ``worker.trace._trap.pack`` writes as
references.  At its end a job hands its packed answers to the node's cache service, which
keeps them per repository revision (the root catalog's hash: a new revision is a new table,
so a job never mixes two); a job that mounts that revision gets them back in one reply and
puts them into its answer cache and in-process table before its program asks, so its first
touch of a path the node knows needs no Python and, on a patched call site, no trap.

The service is the user's own (it refuses other users' connections), so a table is only ever
used by jobs of the user whose jobs made it.  A table is kept per (repository, root catalog
hash) and, within it, per directory: the newest answers for a directory replace older ones.

Frames (what a job sends, and a table's contents): ``u32 part length, u32 data length, part,
data``, where ``part`` names the directory and which of its answers the data holds: packed
answers, or (:data:`LISTING`) the entries its mirror is made of, or (:data:`OPENS_LOOKED`)
that a job looked for its objects the node holds (so the next job does not look again for
a directory whose files nobody opens, such as a package's sources beside its ``__pycache__``).
A directory's newer part replaces the older, but for :data:`OPENED`, which each job adds to
(a job records only the opens it had to make itself).
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

log = logging.getLogger("hep_exec.answers")

_FRAME = struct.Struct("<II")
_LISTING_HEAD = struct.Struct("<Iq")  # the directory's mode, mtime in ns
_NAME = struct.Struct("<BH")  # an entry's S_IFMT >> 12, its name's length
LISTING = b"\0listing"  # the part of a directory's listing (what its mirror is made of)
OPENED = b"\0opened"  # the part of the opens a job made of objects the service holds
OPENS_LOOKED = b"\0opens-looked"  # a job looked for the directory's opens ahead (data: b"1")
Buffer = bytes | memoryview | mmap.mmap  # what a table comes as (a job maps the service's)
_KIND_BITS = frozenset(k >> 12 for k in (0o140000, 0o120000, 0o100000, 0o060000, 0o040000,
                                         0o020000, 0o010000))  # fmt: skip
MAX_PART = 4096 + 16  # a directory's path and which answers
MAX_FRAME_DATA = 64 << 20  # one directory's answers: far above 100,000 entries
MAX_TABLE_BYTES = 256 << 20  # one revision's answers, as a job sends or gets them
MAX_BYTES = 512 << 20  # all tables a service keeps (least recently used go first)
EAGER_BYTES = 4 << 20  # put when a job mounts the revision (~6 ms); the rest directory-wise


class FrameError(ValueError):
    """Bytes that are not frames."""


def frames(data: Buffer) -> Iterator[tuple[bytes, bytes]]:
    """The (part, data) frames of ``data``; FrameError at the first that does not parse.
    (A job's C side reads a table the same way where it lies: worker/trace/_trap.c, nt_read.)"""
    view = memoryview(data)
    off = 0
    while off < len(view):
        if len(view) - off < _FRAME.size:
            raise FrameError(f"truncated frame header at byte {off}")
        pn, dn = _FRAME.unpack_from(view, off)
        off += _FRAME.size
        if pn == 0 or pn > MAX_PART or dn > MAX_FRAME_DATA or len(view) - off < pn + dn:
            raise FrameError(f"bad frame at byte {off - _FRAME.size}")
        yield bytes(view[off : off + pn]), bytes(view[off + pn : off + pn + dn])
        off += pn + dn


_PACKED_HEAD = struct.Struct("<BBHB3xIIq")  # worker/trace/_trap.c pack(): cls, kind, flags, bits,
# key length, bval length, ival; then a stat (15 x i64) if bits & 1, the key, the bval
_PACKED_STAT = 15 * 8


def packed_records(data: bytes) -> Iterator[bytes]:
    """The records of ``worker.trace._trap.pack``'s bytes, each whole (up to the first that does
    not parse): a job's opens of a directory are added to the table's one record at a time."""
    off = 0
    while len(data) - off >= _PACKED_HEAD.size:
        _cls, _kind, _flags, bits, kn, bn, _ival = _PACKED_HEAD.unpack_from(data, off)
        end = off + _PACKED_HEAD.size + (_PACKED_STAT if bits & 1 else 0) + kn + bn
        if end > len(data):
            return
        yield data[off:end]
        off = end


def _with_new_records(old: bytes, body: bytes) -> bytes:
    """``old`` and those of ``body``'s records it does not hold already (a job that opens
    what an earlier job opened, as ld.so's own calls do every time, adds nothing)."""
    have = set(packed_records(old))
    return old + b"".join(r for r in packed_records(body) if r not in have)


def join_frames(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(_FRAME.pack(len(p), len(d)) + p + d for p, d in items)


def encode_listing(mode: int, mtime_ns: int, entries: Iterable[tuple[bytes, int]]) -> bytes:
    """A directory's mode and mtime and its entries' (name, S_IFMT kind), for the node's
    next jobs, who make the directory's mirror from it without reading the catalog."""
    out = [_LISTING_HEAD.pack(mode, mtime_ns)]
    for name, kind in entries:
        out += [_NAME.pack(kind >> 12, len(name)), name]
    return b"".join(out)


def valid_table_name(fqrn: object, root: object) -> bool:
    """A repository name and a root catalog hash as they appear in a manifest."""
    return (
        isinstance(fqrn, str)
        and 0 < len(fqrn) <= 255
        and "/" not in fqrn
        and fqrn not in (".", "..")
        and isinstance(root, str)
        and 0 < len(root) <= 80
        and all(c in "0123456789abcdef-" for c in root)
    )


class _Table:
    """One revision's answers in parts.  Not a dataclass: every job's start defines it, and the
    generated methods of one cost ~0.5 ms there."""

    __slots__ = ("joined", "parts", "size")

    def __init__(self) -> None:
        self.parts: dict[bytes, bytes] = {}
        self.size = 0
        self.joined: bytes | None = None  # what ``get`` gives, until the next ``add``


class AnswerTables:
    """The service's side: tables per (repository, root catalog hash), bounded in bytes."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_table: int = MAX_TABLE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.max_table = max_table
        self._tables: OrderedDict[tuple[str, str], _Table] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, fqrn: str, root: str, data: bytes) -> int:
        """Merge a job's frames (FrameError if they do not parse: nothing is taken);
        returns the frames taken.  A table that would outgrow its bound takes no more."""
        got = list(frames(data))
        taken = 0
        with self._lock:
            table = self._tables.setdefault((fqrn, root), _Table())
            self._tables.move_to_end((fqrn, root))
            for part, body in got:
                old = table.parts.get(part)
                if old is not None and part.endswith(OPENED):
                    body = _with_new_records(old, body)  # opens come a job at a time
                    if len(body) > MAX_FRAME_DATA:
                        continue
                if body == old:  # what the table says already: it stays as it was given
                    continue
                grow = len(part) + len(body) - (0 if old is None else len(part) + len(old))
                if table.size + grow > self.max_table:
                    continue
                table.parts[part] = body
                table.size += grow
                self._bytes += grow
                taken += 1
            if taken:
                table.joined = None
            while self._bytes > self.max_bytes and len(self._tables) > 1:
                _, gone = self._tables.popitem(last=False)
                self._bytes -= gone.size
        return taken

    def get(self, fqrn: str, root: str) -> bytes:
        """A revision's answers, framed as they came: the same bytes object until the table
        changes (see :meth:`given`)."""
        with self._lock:
            table = self._tables.get((fqrn, root))
            if table is None:
                return b""
            self._tables.move_to_end((fqrn, root))
            if table.joined is None:
                table.joined = join_frames(table.parts.items())
            return table.joined

    def given(self, fqrn: str, root: str) -> bytes | None:
        """What :meth:`get` last gave for a table that has not changed since, else None."""
        with self._lock:
            table = self._tables.get((fqrn, root))
            return None if table is None else table.joined

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return len(self._tables), self._bytes

    def sizes(self) -> dict[str, int]:
        """Each repository's bytes of answers, of its revision asked for last: a job about to
        mount it sizes its table for them before the revision is known."""
        with self._lock:
            return {fqrn: table.size for (fqrn, _root), table in self._tables.items()}


class Revision(NamedTuple):
    """A mounted revision's answers from the node: ``within`` (the repository's mount path)
    and its table, as the service gave it (a job maps the service's memfd).  The C side reads
    it where it lies (worker/trace/_trap.c, put_table): the first directories put at once, up to
    ``eager_bytes``, the others each when the job first comes to it."""

    within: bytes
    table: Buffer


class NodeAnswers:
    """The job's side.  ``mounted`` (a repository was mounted, any thread) asks the service
    for that revision's answers; the tracer ``take``s them and hands them to the C side, which
    puts the first at once (up to ``eager_bytes``) and stages the others, a directory's put
    when the job first comes to it; ``keep`` collects this job's answers ahead; ``send``
    hands them to the service at the end.  ``fetch(fqrn, root)`` and ``store(fqrn, root,
    data)`` are the service round trips (worker.node.cache_client)."""

    def __init__(
        self,
        mount: bytes,
        prefix: bytes,
        fetch: Callable[[str, str], Buffer | None],
        store: Callable[[str, str, bytes], bool],
        prefix_fd: int = -1,
        fetch_ahead: Callable[[str, str], None] = lambda fqrn, root: None,
    ) -> None:
        self.mount = mount.rstrip(b"/")
        self.prefix = prefix  # where this job opens the service's objects by name
        self.prefix_fd = prefix_fd  # our fd on that directory (-1: none)
        self._fetch = fetch
        self._fetch_ahead = fetch_ahead
        self._store = store
        self._lock = threading.Lock()
        self._pending: list[Revision] = []
        self._revisions: dict[str, str] = {}
        self._kept: dict[bytes, list[bytes]] = {}
        self._kept_bytes: dict[bytes, int] = {}
        self.eager_bytes = EAGER_BYTES
        # the tracer's: put what is pending now, if this thread may (else it waits)
        self.arrived: Callable[[], None] = lambda: None
        # the tracer's: put what is pending now, from a thread that answers no call and whose
        # mount no call waits for any more (it takes the lock of those that answer calls)
        self.put_ahead: Callable[[], None] = lambda: None
        # the tracer's: a repository is being mounted, with about so many bytes of answers
        # (their memory, ahead)
        self.mounting: Callable[[int], None] = lambda expected: None
        # a call on this path first waits for its repository's mount on another thread (the
        # session's, ahead of the command)
        self.settle: Callable[[bytes], None] = lambda path: None
        # bytes of each repository's answers on the node when we connected (the service's
        # hello): what a mount will likely bring
        self.expected: Mapping[str, int] = {}
        self.received = 0  # bytes of answers the service gave
        self.put = 0  # answers put from them
        self.sent = 0  # bytes handed to the service

    @property
    def kept(self) -> int:
        return len(self._kept)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def mounted(self, fqrn: str, root: str) -> None:
        if not valid_table_name(fqrn, root):
            return
        with self._lock:
            self._revisions[fqrn] = root
        data = self._fetch(fqrn, root)
        if not data:
            return
        with self._lock:
            self._pending.append(Revision(self.mount + b"/" + fqrn.encode(), data))
            self.received += len(data)
        self.arrived()

    def ahead(self, fqrn: str, root: str) -> None:
        """A mount's manifest names this revision (not yet verified): ask the service for its
        answers now, for ``mounted`` to take."""
        if valid_table_name(fqrn, root):
            self._fetch_ahead(fqrn, root)

    def mounting_soon(self, fqrn: str) -> None:
        """A repository is being mounted: its answers will come (whoever prepares for them)."""
        self.mounting(self.expected.get(fqrn, 0))

    def take(self) -> list[Revision]:
        """What the node knows of revisions mounted since: to put now, and to stage."""
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def keep(self, part: bytes, data: bytes) -> None:
        """A directory's answers ahead (``part``: which ones), replacing any kept before."""
        if data and len(part) <= MAX_PART and len(data) <= MAX_FRAME_DATA:
            self._kept[part] = [data]
            self._kept_bytes[part] = len(data)

    def append(self, part: bytes, data: bytes) -> None:
        """One more answer of a directory's (an open the job made through the service)."""
        size = self._kept_bytes.get(part, 0) + len(data)
        if data and len(part) <= MAX_PART and size <= MAX_FRAME_DATA:
            self._kept.setdefault(part, []).append(data)
            self._kept_bytes[part] = size

    def by_revision(self) -> dict[tuple[str, str], bytes]:
        """This job's answers, framed, per (repository, root catalog hash) it mounted."""
        groups: dict[tuple[str, str], list[tuple[bytes, bytes]]] = {}
        head = self.mount + b"/"
        with self._lock:
            revisions = dict(self._revisions)
        for part, data in self._kept.items():
            if not part.startswith(head):
                continue
            fqrn = part[len(head) :].split(b"/", 1)[0].split(b"\0", 1)[0].decode(errors="replace")
            root = revisions.get(fqrn)
            if root is not None:
                groups.setdefault((fqrn, root), []).append((part, b"".join(data)))
        return {k: join_frames(v) for k, v in groups.items()}

    def send(self) -> None:
        for (fqrn, root), data in self.by_revision().items():
            if len(data) > MAX_TABLE_BYTES:
                log.debug("%s: %d bytes of answers ahead: too many to keep", fqrn, len(data))
                continue
            if self._store(fqrn, root, data):
                self.sent += len(data)
        self._kept.clear()
        self._kept_bytes.clear()
