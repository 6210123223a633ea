"""Content hashes: algorithms, hex spelling with algorithm ids, object paths in ``data/``."""

from __future__ import annotations

import enum
import hashlib
from typing import NoReturn, Protocol

from cvmfs_format.errors import FormatError


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class Algorithm(enum.Enum):
    """Content hash algorithms; ``value`` is the id appended to the hex digest."""

    SHA1 = ""
    RMD160 = "-rmd160"
    SHAKE128 = "-shake128"

    @property
    def flag_bits(self) -> int:
        """Catalog flag bits 8-10 store ``enum - 1`` (SHA-1 = 0)."""
        return {Algorithm.SHA1: 0, Algorithm.RMD160: 1, Algorithm.SHAKE128: 2}[self] << 8

    @classmethod
    def from_flags(cls, flags: int) -> Algorithm:
        code = (flags >> 8) & 0x7
        try:
            return (cls.SHA1, cls.RMD160, cls.SHAKE128)[code]
        except IndexError:
            raise FormatError(f"unknown hash algorithm code {code} in catalog flags") from None

    def new(self) -> Hasher:
        if self is Algorithm.SHA1:
            return hashlib.sha1()
        if self is Algorithm.RMD160:
            return hashlib.new("ripemd160")
        return _Shake128()


class _Shake128:
    """SHAKE-128 truncated to 160 bits, as CVMFS uses it."""

    def __init__(self) -> None:
        self._h = hashlib.shake_128()

    def update(self, data: bytes, /) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest(20)


_BY_SUFFIX = {a.value: a for a in Algorithm}
_HEX = frozenset("0123456789abcdef")


class ContentHash:
    """A content digest with its algorithm; ``str()`` is the CVMFS hex spelling.  Immutable,
    compared and hashed by value; written out rather than a frozen dataclass because every
    hep-exec start defines it (the generated methods were ~0.6 ms of that)."""

    __slots__ = ("algorithm", "digest")
    algorithm: Algorithm
    digest: bytes

    def __init__(self, algorithm: Algorithm, digest: bytes) -> None:
        if len(digest) != 20:
            raise FormatError(f"content hash must be 20 bytes, got {len(digest)}")
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "digest", digest)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"ContentHash is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"ContentHash is immutable: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ContentHash):
            return NotImplemented
        return self.digest == other.digest and self.algorithm is other.algorithm

    def __hash__(self) -> int:
        return hash((self.algorithm, self.digest))

    def __repr__(self) -> str:
        return f"ContentHash(algorithm={self.algorithm!r}, digest={self.digest!r})"

    def __reduce__(self) -> tuple[type[ContentHash], tuple[Algorithm, bytes]]:
        return ContentHash, (self.algorithm, self.digest)

    @property
    def hex(self) -> str:
        return self.digest.hex() + self.algorithm.value

    def __str__(self) -> str:
        return self.hex

    def object_path(self, suffix: str = "") -> str:
        """Path below the repository root: ``data/XX/<rest><algo-id><suffix>``."""
        h = self.digest.hex()
        return f"data/{h[:2]}/{h[2:]}{self.algorithm.value}{suffix}"

    @classmethod
    def parse(cls, text: str) -> ContentHash:
        """Parse ``<40 hex>[-rmd160|-shake128]``; raises FormatError naming the bad text."""
        hexpart, dash, algo = text.partition("-")
        algorithm = _BY_SUFFIX.get(dash + algo)
        if algorithm is None or len(hexpart) != 40 or not set(hexpart) <= _HEX:
            raise FormatError(f"bad content hash {text[:80]!r}")
        return cls(algorithm, bytes.fromhex(hexpart))

    @classmethod
    def of(cls, data: bytes, algorithm: Algorithm = Algorithm.SHA1) -> ContentHash:
        h = algorithm.new()
        h.update(data)
        return cls(algorithm, h.digest())


def hex_digest(data: bytes, algorithm: Algorithm) -> str:
    """Hash hex as printed in manifests and whitelists (digest + algorithm id)."""
    return ContentHash.of(data, algorithm).hex
