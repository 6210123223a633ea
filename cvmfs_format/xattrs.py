"""Extended attribute BLOB: version byte, count, then (key len, value len, key, value)."""

from __future__ import annotations

from cvmfs_format.errors import CatalogError


def encode_xattrs(attrs: dict[bytes, bytes]) -> bytes | None:
    """Empty -> None (the column is NULL, never an empty blob); keys sorted like std::map."""
    if not attrs:
        return None
    if len(attrs) > 255:
        raise ValueError("at most 255 extended attributes per entry")
    out = bytearray([1, len(attrs)])
    for key in sorted(attrs):
        value = attrs[key]
        if not 0 < len(key) <= 255 or b"\0" in key or len(value) > 255:
            raise ValueError(f"xattr {key!r}: key 1..255 bytes without NUL, value <= 255 bytes")
        out += bytes([len(key), len(value)]) + key + value
    return bytes(out)


def decode_xattrs(blob: bytes | None, what: str = "xattr") -> dict[bytes, bytes]:
    if blob is None:
        return {}
    if len(blob) < 2 or blob[0] != 1:
        raise CatalogError(f"{what}: unsupported xattr blob (version {blob[:1].hex() or 'none'})")
    count, pos, out = blob[1], 2, {}
    for _ in range(count):
        if pos + 2 > len(blob):
            raise CatalogError(f"{what}: truncated xattr blob")
        klen, vlen = blob[pos], blob[pos + 1]
        pos += 2
        if pos + klen + vlen > len(blob):
            raise CatalogError(f"{what}: truncated xattr blob")
        out[bytes(blob[pos : pos + klen])] = bytes(blob[pos + klen : pos + klen + vlen])
        pos += klen + vlen
    return out
