"""CernVM-FS's magic extended attributes from a catalog entry (cvmfs_format.magic_xattrs):
the values the real client gives (tests/test_real_client.py compares them with it when
../shared/reference is there); here every kind of entry, without it."""

from __future__ import annotations

import stat

from cvmfs_format.catalog import (
    FLAG_CHUNKED,
    FLAG_DIR,
    FLAG_EXTERNAL,
    FLAG_FILE,
    FLAG_LINK,
    FLAG_NO_COMPRESSION,
    DirEntry,
)
from cvmfs_format.hashes import Algorithm, ContentHash
from cvmfs_format.magic_xattrs import NAMES, magic_xattrs

HASH = ContentHash(Algorithm.SHA1, bytes(range(20)))
REPO = {b"user.fqrn": b"sw.example.org", b"user.revision": b"42", b"user.root_hash": b"ab" * 20}


def _entry(mode: int, flags: int, hash_: ContentHash | None = HASH, symlink: str = "") -> DirEntry:
    return DirEntry("/x", mode, 10, 0, 0, flags, hash_, symlink, 0, 0, 0, 1, None, 1)


def _magic(entry: DirEntry | None, chunks: int = 1) -> dict[bytes, bytes]:
    return magic_xattrs("sw.example.org", 42, "ab" * 20, entry, chunks)


def test_files_say_their_hash_chunks_compression_and_origin() -> None:
    plain = _magic(_entry(stat.S_IFREG | 0o644, FLAG_FILE))
    assert plain == {
        **REPO, b"user.hash": HASH.hex.encode(), b"user.chunks": b"1",
        b"user.compression": b"zlib", b"user.external_file": b"0",
    }  # fmt: skip
    chunked = _magic(_entry(stat.S_IFREG | 0o644, FLAG_FILE | FLAG_CHUNKED, None), chunks=3)
    assert b"user.hash" not in chunked and chunked[b"user.chunks"] == b"3"
    flags = FLAG_FILE | FLAG_NO_COMPRESSION | FLAG_EXTERNAL
    other = _magic(_entry(stat.S_IFREG | 0o755, flags))
    assert other[b"user.compression"] == b"none" and other[b"user.external_file"] == b"1"
    assert set(plain) <= set(NAMES)


def test_directories_say_the_repository_and_the_rest_nothing() -> None:
    assert _magic(_entry(stat.S_IFDIR | 0o755, FLAG_DIR, None)) == REPO
    assert _magic(None) == REPO  # the repository's root, as the mount shows it
    # the kernel refuses user.* names on anything but files and directories (ENODATA)
    assert _magic(_entry(stat.S_IFLNK | 0o777, FLAG_LINK, None, "$(ARCH)/lib")) == {}
    assert _magic(_entry(stat.S_IFIFO | 0o644, FLAG_FILE, None)) == {}
