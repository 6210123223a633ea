"""What a cold file's directory fetches with it (worker.node.readahead.siblings_to_fetch): the
rule alone, on catalog rows made here."""

from __future__ import annotations

import stat

from cvmfs_format.catalog import (
    FLAG_CHUNKED,
    FLAG_DIR,
    FLAG_EXTERNAL,
    FLAG_FILE,
    FLAG_LINK,
    DirEntry,
)
from cvmfs_format.hashes import ContentHash
from worker.node.readahead import Limits, siblings_to_fetch


def entry(name: str, size: int = 100, flags: int = FLAG_FILE, hashed: bool = True) -> DirEntry:
    mode = stat.S_IFDIR | 0o755 if flags & FLAG_DIR else (
        stat.S_IFLNK | 0o777 if flags & FLAG_LINK else stat.S_IFREG | 0o644)  # fmt: skip
    h = ContentHash.of(name.encode()) if hashed else None
    return DirEntry(f"/pkg/{name}", mode, size, 0, 0, flags, h, "", 0, 0, 0, 1, None, 0)


def names(entries: list[DirEntry]) -> list[str]:
    return [e.name for e in entries]


def test_small_plain_files_but_the_opened_one_those_after_it_first() -> None:
    listing = [
        entry("a.py"),
        entry("b.so", 300 << 10),  # over the per-file limit: fetched when opened
        entry("c.py"),
        entry("big.dat", 10 << 20, FLAG_FILE | FLAG_CHUNKED),
        entry("d", 0, FLAG_DIR),
        entry("e", 10, FLAG_LINK),
        entry("f.py", 10, FLAG_FILE | FLAG_EXTERNAL),
        entry("g.py", 10, hashed=False),
        entry("h.py"),
    ]
    assert names(siblings_to_fetch(listing, "/pkg/c.py", Limits())) == ["h.py", "a.py"]


def test_at_most_so_many_files_and_bytes() -> None:
    listing = [entry(f"m{i:02}.py", 1000) for i in range(10)]
    assert names(siblings_to_fetch(listing, "/pkg/m00.py", Limits(files=3))) == [
        "m01.py",
        "m02.py",
        "m03.py",
    ]
    assert names(siblings_to_fetch(listing, "/pkg/m08.py", Limits(files=3))) == [
        "m09.py",
        "m00.py",
        "m01.py",
    ]
    few_bytes = Limits(files=64, file_bytes=1000, bytes=2500)
    assert names(siblings_to_fetch(listing, "/pkg/m09.py", few_bytes)) == ["m00.py", "m01.py"]
    assert names(siblings_to_fetch(listing, "/pkg/gone.py", Limits(files=2))) == [
        "m00.py",
        "m01.py",
    ]
    assert siblings_to_fetch(listing, "/pkg/m00.py", Limits(files=0)) == []
    assert siblings_to_fetch([entry("only.py")], "/pkg/only.py", Limits()) == []
