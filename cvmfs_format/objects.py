"""Content-addressed objects: type suffixes, zlib, naming, and streaming verification."""

from __future__ import annotations

import enum
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from cvmfs_format.errors import FormatError, IntegrityError
from cvmfs_format.hashes import Algorithm, ContentHash


class Suffix(enum.StrEnum):
    """Object type suffix appended to the hash in ``data/`` names."""

    FILE = ""
    CATALOG = "C"
    PARTIAL = "P"
    CERTIFICATE = "X"
    HISTORY = "H"
    METAINFO = "M"


class ObjectName(NamedTuple):
    """An object's identity as served: its content hash and type suffix."""

    hash: ContentHash
    suffix: Suffix = Suffix.FILE

    @property
    def path(self) -> str:
        return self.hash.object_path(self.suffix)

    def __str__(self) -> str:
        return self.path


_OBJECT_PATH = re.compile(
    r"data/(?P<a>[0-9a-f]{2})/(?P<b>[0-9a-f]{38})(?P<algo>-rmd160|-shake128)?(?P<suffix>[CPXHM]?)"
)


def parse_object_path(path: str) -> ObjectName:
    """Parse ``data/XX/<hex><algo><suffix>`` strictly (the proxy relies on this for safety)."""
    m = _OBJECT_PATH.fullmatch(path)
    if m is None:
        raise FormatError(f"not an object path: {path[:120]!r}")
    algorithm = Algorithm(m["algo"] or "")
    digest = bytes.fromhex(m["a"] + m["b"])
    return ObjectName(ContentHash(algorithm, digest), Suffix(m["suffix"]))


def compress(data: bytes) -> bytes:
    """zlib container, default level: what cvmfs_server writes."""
    return zlib.compress(data, 6)


# zlib gets this much stored input at a time, and gives at most INFLATE_OUT per call: each
# piece it returns is written out while it is still in the CPU's caches, and the memory for
# it is reused.  Inflating a 1 MiB object in one call took 1.2-1.4 ms here (its output grows
# in fresh pages, each one a page fault), in these pieces 0.35 ms.
INFLATE_IN = 64 * 1024
INFLATE_OUT = 1 << 20


# Inflating is most of what a cold object costs the node's CPU after its transfer: ISA-L's
# inflate (the ``isal`` package, a dependency) takes 0.23 s for the 127 MB of objects a cold
# import of a real Python stack opens, where zlib takes 0.51 s; the stream format is zlib's,
# and zlib stays the fallback where ``isal`` cannot be imported.
_backend: tuple[Callable[[], Any], tuple[type[Exception], ...]] | None = None


def _inflate_backend() -> tuple[Callable[[], Any], tuple[type[Exception], ...]]:
    """(a new decompressobj, the errors it raises for corrupt data); chosen on first use,
    not at import: a warm job never inflates."""
    global _backend
    if _backend is None:
        try:
            from isal import isal_zlib
        except ImportError:
            _backend = (zlib.decompressobj, (zlib.error,))
        else:
            isal_error: type[Exception] = isal_zlib.error  # type: ignore[assignment]  # (stub)
            _backend = (isal_zlib.decompressobj, (zlib.error, isal_error))
    return _backend


class Inflater:
    """A zlib stream decompressed as its stored bytes come, in pieces of at most INFLATE_OUT
    (see above); FormatError for corrupt data, for more than ``limit`` bytes (decompressing
    stops there: a zlib bomb costs nothing) and, from :meth:`finish`, for a truncated stream.
    Bytes after the end of the stream are not the object's and are ignored, as zlib does."""

    def __init__(self, what: str = "object", limit: int | None = None) -> None:
        self.what = what
        self.limit = limit
        self.total = 0
        make, self._errors = _inflate_backend()
        self._d = make()

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        view = memoryview(data).cast("B")
        d = self._d
        try:
            for start in range(0, len(view), INFLATE_IN):
                piece: bytes | memoryview = view[start : start + INFLATE_IN]
                while piece and not d.eof:
                    out = d.decompress(piece, INFLATE_OUT)
                    if out:
                        yield self._counted(out)
                    piece = d.unconsumed_tail
                if d.eof:  # what follows the stream is not ours (zlib keeps it aside)
                    return
        except self._errors as e:
            raise FormatError(f"{self.what}: corrupt zlib data ({e})") from None

    def finish(self) -> Iterator[bytes]:
        """What zlib still holds (the last call may have stopped at INFLATE_OUT); the stream
        must have ended."""
        d = self._d
        if not d.eof:
            try:
                out = d.flush()
            except self._errors as e:
                raise FormatError(f"{self.what}: corrupt zlib data ({e})") from None
            if out:
                yield self._counted(out)
        if not d.eof:
            raise FormatError(f"{self.what}: truncated zlib stream")

    def _counted(self, out: bytes) -> bytes:
        self.total += len(out)
        if self.limit is not None and self.total > self.limit:
            raise FormatError(f"{self.what}: decompresses to more than {self.limit} bytes")
        return out


def inflate_pieces(
    data: bytes | bytearray | memoryview, what: str = "object", limit: int | None = None
) -> Iterator[bytes]:
    """``data`` decompressed, in pieces; FormatError for corrupt or truncated data, or for
    more than ``limit`` bytes (decompressing stops there: a zlib bomb costs nothing)."""
    inflater = Inflater(what, limit)
    yield from inflater.feed(data)
    yield from inflater.finish()


def make_object(raw: bytes, algorithm: Algorithm = Algorithm.SHA1) -> tuple[ContentHash, bytes]:
    """Compress ``raw`` and name it by the hash of the compressed bytes."""
    stored = compress(raw)
    return ContentHash.of(stored, algorithm), stored


class StreamVerifier:
    """Feed stored (compressed) chunks, get decompressed bytes; ``finish()`` checks the hash.

    Data handed out before ``finish()`` is unverified: callers must not publish it until
    ``finish()`` returned without raising.
    """

    def __init__(self, expected: ContentHash, what: str = "", compressed: bool = True) -> None:
        self.expected = expected
        self.what = what or expected.hex
        self._hasher = expected.algorithm.new()
        make, self._errors = _inflate_backend()
        self._inflate = make() if compressed else None
        self._zlib_error: str | None = None
        self.stored_size = 0

    def feed(self, chunk: bytes) -> bytes:
        self._hasher.update(chunk)
        self.stored_size += len(chunk)
        if self._inflate is None:
            return chunk
        if self._zlib_error is not None:
            return b""
        try:
            return bytes(self._inflate.decompress(chunk))
        except self._errors as e:
            # Report it in finish(): a hash mismatch is the more useful diagnosis.
            self._zlib_error = str(e)
            return b""

    def finish(self) -> bytes:
        """Verify; returns any remaining decompressed bytes."""
        got = ContentHash(self.expected.algorithm, self._hasher.digest())
        if got != self.expected:
            raise IntegrityError(f"{self.what}: content hash mismatch (got {got.hex})")
        if self._inflate is None:
            return b""
        if self._zlib_error is not None:
            raise IntegrityError(f"{self.what}: corrupt zlib data ({self._zlib_error})")
        try:
            tail = bytes(self._inflate.flush())
        except self._errors as e:
            raise IntegrityError(f"{self.what}: corrupt zlib data ({e})") from None
        if not self._inflate.eof:
            raise IntegrityError(f"{self.what}: truncated zlib stream")
        return tail


def verify_object(stored: bytes, expected: ContentHash, what: str = "") -> bytes:
    """Check stored bytes against their hash and return them decompressed."""
    v = StreamVerifier(expected, what)
    out = v.feed(stored)
    return out + v.finish()


def verify_stored(stored: bytes, expected: ContentHash, what: str = "") -> None:
    """Check stored bytes against their hash without decompressing (store/proxy use)."""
    got = ContentHash.of(stored, expected.algorithm)
    if got != expected:
        raise IntegrityError(f"{what or expected.hex}: content hash mismatch (got {got.hex})")
