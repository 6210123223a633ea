"""Bounded in-memory LRU of small, immutable objects (content-addressed ``data/`` only).

Sans-I/O: keys and bytes in, bytes out. Bounded by total bytes and by a per-object limit, so
memory stays flat however many distinct objects the workers ask for.
"""

from __future__ import annotations

from lru import LRU


class ObjectCache:
    """LRU keyed by ``(fqrn, relpath)``; only objects up to ``max_object`` bytes are kept."""

    def __init__(self, max_bytes: int, max_object: int) -> None:
        self.max_bytes = max_bytes
        self.max_object = min(max_object, max_bytes)
        self.bytes = 0
        # the count bound is only a backstop; the byte budget is enforced in put()
        self._lru: LRU[tuple[str, str], bytes] = LRU(
            max(1, max_bytes // 64 + 1), callback=self._evicted
        )

    def _evicted(self, _key: object, value: bytes) -> None:
        self.bytes -= len(value)

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: tuple[str, str]) -> bytes | None:
        value: bytes | None = self._lru.get(key)
        return value

    def put(self, key: tuple[str, str], value: bytes) -> bool:
        """Keep ``value`` if it is small enough; returns whether it was kept."""
        if len(value) > self.max_object or self.max_bytes <= 0:
            return False
        old = self._lru.get(key)
        if old is not None:
            return True
        self._lru[key] = value
        self.bytes += len(value)
        while self.bytes > self.max_bytes and len(self._lru) > 1:
            _, dropped = self._lru.popitem(least_recent=True)
            self.bytes -= len(dropped)
        return True
