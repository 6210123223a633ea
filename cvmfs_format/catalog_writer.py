"""Write schema 2.5 revision 7 catalogs with all tables, properties and the 24 counters."""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import dataclass, field

from cvmfs_format.catalog import (
    COUNTER_NAMES,
    FLAG_CHUNKED,
    FLAG_DIR,
    FLAG_EXTERNAL,
    FLAG_FILE,
    FLAG_LINK,
    FLAG_NESTED_MOUNTPOINT,
    FLAG_NESTED_ROOT,
    FLAG_NO_COMPRESSION,
    FLAG_SPECIAL,
)
from cvmfs_format.hashes import ContentHash
from cvmfs_format.paths import ROOT_PARENT_KEY, basename, parent, path_key

SCHEMA = "2.5"
SCHEMA_REVISION = 7

_DDL = """
CREATE TABLE catalog (md5path_1 INTEGER, md5path_2 INTEGER, parent_1 INTEGER, parent_2 INTEGER,
  hardlinks INTEGER, hash BLOB, size INTEGER, mode INTEGER, mtime INTEGER, mtimens INTEGER,
  flags INTEGER, name TEXT, symlink TEXT, uid INTEGER, gid INTEGER, xattr BLOB,
  CONSTRAINT pk_catalog PRIMARY KEY (md5path_1, md5path_2));
CREATE INDEX idx_catalog_parent ON catalog (parent_1, parent_2);
CREATE TABLE chunks (md5path_1 INTEGER, md5path_2 INTEGER, offset INTEGER, size INTEGER,
  hash BLOB, CONSTRAINT pk_chunks PRIMARY KEY (md5path_1, md5path_2, offset, size),
  FOREIGN KEY (md5path_1, md5path_2) REFERENCES catalog(md5path_1, md5path_2));
CREATE TABLE nested_catalogs (path TEXT, sha1 TEXT, size INTEGER,
  CONSTRAINT pk_nested_catalogs PRIMARY KEY (path));
CREATE TABLE bind_mountpoints (path TEXT, sha1 TEXT, size INTEGER,
  CONSTRAINT pk_bind_mountpoints PRIMARY KEY (path));
CREATE TABLE statistics (counter TEXT, value INTEGER,
  CONSTRAINT pk_statistics PRIMARY KEY (counter));
CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key));
"""


def zero_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTER_NAMES, 0)


@dataclass
class NewEntry:
    """What the writer needs to know about one path."""

    path: str
    mode: int
    size: int = 0
    mtime: int = 0
    mtime_ns: int = 0
    hash: ContentHash | None = None
    symlink: str = ""
    uid: int = 0
    gid: int = 0
    hardlink_group: int = 0
    linkcount: int = 1
    xattr_blob: bytes | None = None
    chunks: list[tuple[int, int, ContentHash]] = field(default_factory=list)
    compressed: bool = True
    nested_mountpoint: bool = False
    nested_root: bool = False

    def flags(self) -> int:
        mode = self.mode
        if stat.S_ISDIR(mode):
            f = FLAG_DIR
            if self.nested_mountpoint:
                f |= FLAG_NESTED_MOUNTPOINT
            if self.nested_root:
                f |= FLAG_NESTED_ROOT
            return f
        f = FLAG_FILE
        if stat.S_ISLNK(mode):
            return f | FLAG_LINK
        if not stat.S_ISREG(mode):
            return f | FLAG_SPECIAL
        if self.chunks:
            f |= FLAG_CHUNKED
        if not self.compressed:
            f |= FLAG_NO_COMPRESSION
        algo = self.hash or (self.chunks[0][2] if self.chunks else None)
        if algo is not None:
            f |= algo.algorithm.flag_bits
        return f


class CatalogWriter:
    """Accumulates rows of one catalog; :meth:`finish` returns the SQLite file bytes."""

    def __init__(self, root_prefix: str) -> None:
        self.root_prefix = root_prefix
        self.counters = zero_counters()
        self._hardlink_groups = 0
        self._db = sqlite3.connect(":memory:")
        self._db.executescript(_DDL)

    def next_hardlink_group(self) -> int:
        """Group ids are unique within one catalog, allocated as max + 1."""
        self._hardlink_groups += 1
        return self._hardlink_groups

    def add(self, e: NewEntry) -> None:
        key = path_key(e.path)
        pkey = ROOT_PARENT_KEY if e.path == "" else path_key(parent(e.path))
        hardlinks = ((e.hardlink_group << 32) | e.linkcount) & 0xFFFFFFFFFFFFFFFF
        if hardlinks >= 1 << 63:
            hardlinks -= 1 << 64
        self._db.execute(
            "INSERT INTO catalog VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                *key,
                *pkey,
                hardlinks,
                e.hash.digest if e.hash else None,
                e.size,
                e.mode,
                e.mtime,
                e.mtime_ns,
                e.flags(),
                basename(e.path),
                e.symlink,
                e.uid,
                e.gid,
                e.xattr_blob,
            ),
        )
        c = self.counters
        if stat.S_ISDIR(e.mode):
            c["dir"] += 1
        elif stat.S_ISLNK(e.mode):
            c["symlink"] += 1
        elif stat.S_ISREG(e.mode):
            c["regular"] += 1
            c["file_size"] += e.size
            if e.flags() & FLAG_EXTERNAL:
                c["external"] += 1
                c["external_file_size"] += e.size
            if e.chunks:
                c["chunked"] += 1
                c["chunked_size"] += e.size
                c["chunks"] += len(e.chunks)
        else:
            c["special"] += 1
        if e.xattr_blob is not None:
            c["xattr"] += 1
        for offset, size, h in e.chunks:
            self._db.execute(
                "INSERT INTO chunks VALUES (?,?,?,?,?)", (*key, offset, size, h.digest)
            )

    def add_nested(self, path: str, catalog_hash: ContentHash, size: int) -> None:
        self._db.execute(
            "INSERT INTO nested_catalogs VALUES (?,?,?)", (path, catalog_hash.hex, size)
        )
        self.counters["nested"] += 1

    def properties(
        self,
        revision: int,
        last_modified: int,
        previous_revision: str | None = None,
        ttl: int | None = None,
    ) -> dict[str, str]:
        props: dict[str, str] = {
            "schema": SCHEMA,
            "schema_revision": str(SCHEMA_REVISION),
            "revision": str(revision),
            "last_modified": str(last_modified),
        }
        if self.root_prefix:
            props["root_prefix"] = self.root_prefix
        if previous_revision:
            props["previous_revision"] = previous_revision
        if ttl is not None:
            props["TTL"] = str(ttl)
        return props

    def serialize(self, properties: dict[str, str], subtree: dict[str, int]) -> bytes:
        """The SQLite file with these properties; may be called again with others.

        Identical rows and properties give identical bytes, which lets the publisher keep an
        unchanged nested catalog (and its old revision) instead of writing a new object.
        """
        self._db.execute("DELETE FROM properties")
        self._db.execute("DELETE FROM statistics")
        self._db.executemany("INSERT INTO properties VALUES (?,?)", sorted(properties.items()))
        rows = [(f"self_{k}", v) for k, v in self.counters.items()]
        rows += [(f"subtree_{k}", subtree.get(k, 0)) for k in COUNTER_NAMES]
        self._db.executemany("INSERT INTO statistics VALUES (?,?)", rows)
        self._db.commit()
        self._db.execute("VACUUM")
        return self._db.serialize()

    def finish(
        self,
        revision: int,
        last_modified: int,
        subtree: dict[str, int],
        previous_revision: str | None = None,
        ttl: int | None = None,
    ) -> bytes:
        props = self.properties(revision, last_modified, previous_revision, ttl)
        data = self.serialize(props, subtree)
        self._db.close()
        return data
