"""File catalogs (SQLite schema 2.5, revisions 2-7), opened from bytes in memory."""

from __future__ import annotations

import mmap
import sqlite3
import stat
from collections.abc import Iterator
from typing import Any, NamedTuple

from cvmfs_format.errors import CatalogError, FormatError
from cvmfs_format.hashes import Algorithm, ContentHash
from cvmfs_format.objects import inflate_pieces
from cvmfs_format.paths import basename, is_within, path_key

# catalog.flags bits
# The most bytes a catalog may inflate to: far above any real one (CernVM-FS keeps catalogs to
# some hundred thousand entries, a few hundred MB), and a zlib bomb stops here.
MAX_CATALOG_BYTES = 1 << 30

FLAG_DIR = 1
FLAG_NESTED_MOUNTPOINT = 2
FLAG_FILE = 4
FLAG_LINK = 8
FLAG_SPECIAL = 16
FLAG_NESTED_ROOT = 32
FLAG_CHUNKED = 64
FLAG_EXTERNAL = 128
FLAG_NO_COMPRESSION = 1 << 11
FLAG_BIND_MOUNTPOINT = 0x4000
FLAG_HIDDEN = 0x8000
FLAG_DIRECT_IO = 0x10000

COUNTER_NAMES = (
    "regular",
    "symlink",
    "special",
    "dir",
    "nested",
    "chunked",
    "chunks",
    "file_size",
    "chunked_size",
    "xattr",
    "external",
    "external_file_size",
)


def required_counters(schema_revision: int) -> list[str]:
    """Counters the cvmfs client insists on for a schema revision (format doc §4.9)."""
    names = list(COUNTER_NAMES)
    if schema_revision < 5:
        names.remove("special")
    if schema_revision < 3:
        names.remove("external")
        names.remove("external_file_size")
    if schema_revision < 2:
        names.remove("xattr")
    return [f"{p}_{n}" for p in ("self", "subtree") for n in names]


class DirEntry(NamedTuple):
    """One catalog row, with the full repository path it was looked up under."""

    path: str
    mode: int
    size: int
    mtime: int
    mtime_ns: int
    flags: int
    hash: ContentHash | None
    symlink: str
    uid: int
    gid: int
    hardlink_group: int
    linkcount: int
    xattr_blob: bytes | None
    rowid: int

    @property
    def name(self) -> str:
        return basename(self.path)

    @property
    def is_dir(self) -> bool:
        return bool(self.flags & FLAG_DIR)

    @property
    def is_symlink(self) -> bool:
        return bool(self.flags & FLAG_LINK)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_chunked(self) -> bool:
        return bool(self.flags & FLAG_CHUNKED)

    @property
    def is_external(self) -> bool:
        return bool(self.flags & FLAG_EXTERNAL)

    @property
    def is_compressed(self) -> bool:
        return not self.flags & FLAG_NO_COMPRESSION

    @property
    def is_nested_mountpoint(self) -> bool:
        return bool(self.flags & FLAG_NESTED_MOUNTPOINT)

    @property
    def is_nested_root(self) -> bool:
        return bool(self.flags & FLAG_NESTED_ROOT)

    @property
    def hash_algorithm(self) -> Algorithm:
        return Algorithm.from_flags(self.flags)


class Chunk(NamedTuple):
    offset: int
    size: int
    hash: ContentHash


class NestedRef(NamedTuple):
    """A ``nested_catalogs`` row: mountpoint path, catalog hash, uncompressed size."""

    path: str
    hash: ContentHash
    size: int


_ALGORITHMS = {0: Algorithm.SHA1, 1: Algorithm.RMD160, 2: Algorithm.SHAKE128}  # flags bits 8-10


def _first(entry: DirEntry) -> str:
    return entry[0]


_ENTRY_COLUMNS = (
    "rowid, mode, size, mtime, {mtimens}, flags, hash, symlink, uid, gid, hardlinks, {xattr}"
)


def inflate_catalog(stored: bytes | memoryview, what: str = "catalog") -> bytes:
    """A catalog's SQLite bytes from its stored (zlib) form, already checked against its hash;
    FormatError for a corrupt stream or one past MAX_CATALOG_BYTES."""
    return b"".join(inflate_pieces(stored, what, MAX_CATALOG_BYTES))


class Catalog:
    """A read-only catalog held in memory (``sqlite3`` deserialize, no temp file)."""

    def __init__(self, data: bytes | memoryview | mmap.mmap, what: str = "catalog") -> None:
        """``data``: the SQLite bytes, copied into SQLite's own memory (a mapping of a node's
        shared copy may be closed once this returns)."""
        self.what = what
        self.size = len(data)
        if len(data) < 100 or bytes(data[:16]) != b"SQLite format 3\0":
            raise CatalogError(f"{what}: not an SQLite database")
        try:
            self._db = sqlite3.connect(":memory:", check_same_thread=False)
            self._db.deserialize(data)
            self._db.execute("PRAGMA query_only = 1")
            self.properties = self._read_properties()
            self.schema = float(self.properties.get("schema", "1.0"))
            self.schema_revision = int(self.properties.get("schema_revision", "0"))
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(catalog)")}
            tables = {
                r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except (sqlite3.Error, ValueError) as e:
            raise CatalogError(f"{what}: cannot read catalog ({e})") from None
        if self.schema < 2.35:
            raise CatalogError(f"{what}: unsupported catalog schema {self.schema}")
        missing = {
            "md5path_1",
            "md5path_2",
            "parent_1",
            "parent_2",
            "hardlinks",
            "hash",
            "size",
            "mode",
            "mtime",
            "flags",
            "name",
            "symlink",
        } - columns
        if missing or not {"chunks", "nested_catalogs", "statistics"} <= tables:
            lacking = sorted(missing) or sorted(
                {"chunks", "nested_catalogs", "statistics"} - tables
            )
            raise CatalogError(f"{what}: catalog lacks {', '.join(lacking)}")
        self.counters = self._read_counters()
        wanted = required_counters(self.schema_revision)
        absent = [c for c in wanted if c not in self.counters]
        if absent:
            raise CatalogError(f"{what}: statistics counter {absent[0]} missing")
        cols = _ENTRY_COLUMNS.format(
            mtimens="mtimens" if "mtimens" in columns else "NULL",
            xattr="xattr" if "xattr" in columns else "NULL",
        )
        self._lookup_sql = f"SELECT {cols} FROM catalog WHERE md5path_1=? AND md5path_2=?"
        self._list_sql = f"SELECT name, {cols} FROM catalog WHERE parent_1=? AND parent_2=?"
        self._has_bind = "bind_mountpoints" in tables
        self.root_prefix = self.properties.get("root_prefix", "")

    def _read_properties(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._db.execute("SELECT key, value FROM properties")}

    def _read_counters(self) -> dict[str, int]:
        try:
            rows = self._db.execute("SELECT counter, value FROM statistics").fetchall()
        except sqlite3.Error as e:
            raise CatalogError(f"{self.what}: cannot read statistics ({e})") from None
        return {str(k): int(v) for k, v in rows}

    @property
    def revision(self) -> int:
        return int(self.properties.get("revision", "0"))

    @property
    def ttl(self) -> int:
        return int(self.properties.get("TTL", "240"))

    def _entry(self, path: str, row: tuple[Any, ...]) -> DirEntry:
        # built positionally, the algorithm taken from a table: a listing makes one per row
        # (20,000 rows of a large directory, the first time a job looks at it)
        rowid, mode, size, mtime, mtimens, flags, digest, symlink, uid, gid, hardlinks, xattr = row
        flags = int(flags)
        content: ContentHash | None = None
        if digest is not None:
            algorithm = _ALGORITHMS.get((flags >> 8) & 0x7)
            try:
                if algorithm is None:
                    algorithm = Algorithm.from_flags(flags)  # (raises)
                content = ContentHash(algorithm, bytes(digest))
            except FormatError as e:
                raise CatalogError(f"{self.what}: {path or '/'}: {e}") from None
        hl = int(hardlinks or 0) & 0xFFFFFFFFFFFFFFFF
        return DirEntry(
            path,
            int(mode),
            int(size or 0),
            int(mtime or 0),
            int(mtimens or 0),
            flags,
            content,
            str(symlink or ""),
            int(uid or 0),
            int(gid or 0),
            hl >> 32,
            (hl & 0xFFFFFFFF) or 1,
            None if xattr is None else bytes(xattr),
            int(rowid),
        )

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise CatalogError(f"{self.what}: query failed ({e})") from None

    def lookup(self, path: str) -> DirEntry | None:
        rows = self._query(self._lookup_sql, path_key(path))
        return self._entry(path, rows[0]) if rows else None

    def listing(self, path: str) -> list[DirEntry]:
        """Direct children of ``path`` held in this catalog, sorted by name."""
        rows = self._query(self._list_sql, path_key(path))
        prefix = path + "/"
        entry = self._entry
        entries = [entry(prefix + str(r[0]), r[1:]) for r in rows]
        entries.sort(key=_first)  # by path
        return entries

    def chunks(self, path: str) -> list[Chunk]:
        entry = self.lookup(path)
        algorithm = entry.hash_algorithm if entry else Algorithm.SHA1
        rows = self._query(
            "SELECT offset, size, hash FROM chunks WHERE md5path_1=? AND md5path_2=? "
            "ORDER BY offset",
            path_key(path),
        )
        return [Chunk(int(o), int(s), ContentHash(algorithm, bytes(h))) for o, s, h in rows]

    def nested(self) -> list[NestedRef]:
        rows = self._query("SELECT path, sha1, size FROM nested_catalogs ORDER BY path", ())
        out = []
        for path, sha1, size in rows:
            try:
                content = ContentHash.parse(str(sha1))
            except FormatError:
                raise CatalogError(
                    f"{self.what}: nested catalog {path}: bad hash {str(sha1)[:60]!r}"
                ) from None
            out.append(NestedRef(str(path), content, int(size or 0)))
        return out

    def max_rowid(self) -> int:
        return int(self._query("SELECT MAX(rowid) FROM catalog", ())[0][0] or 0)

    def object_refs(self) -> Iterator[tuple[ContentHash, bool]]:
        """Every data object this catalog references: (hash, is_chunk). Externals excluded."""
        for digest, flags in self._query(
            "SELECT hash, flags FROM catalog WHERE hash IS NOT NULL", ()
        ):
            f = int(flags)
            if not f & FLAG_EXTERNAL:
                yield ContentHash(Algorithm.from_flags(f), bytes(digest)), False
        for digest, flags in self._query(
            "SELECT c.hash, e.flags FROM chunks c JOIN catalog e "
            "ON c.md5path_1 = e.md5path_1 AND c.md5path_2 = e.md5path_2",
            (),
        ):
            f = int(flags)
            if not f & FLAG_EXTERNAL:
                yield ContentHash(Algorithm.from_flags(f), bytes(digest)), True

    def close(self) -> None:
        self._db.close()


class NeedCatalog(Exception):
    """Raised by :class:`CatalogTree` when a nested catalog must be loaded first."""

    def __init__(self, ref: NestedRef) -> None:
        super().__init__(f"nested catalog {ref.path} ({ref.hash.hex}) not loaded")
        self.ref = ref


class CatalogTree:
    """Root catalog plus loaded nested catalogs; resolves paths by longest mountpoint prefix.

    Sans-I/O: when a path lies under a nested catalog that is not loaded, ``NeedCatalog``
    names it; the caller fetches it and calls :meth:`attach`.
    """

    def __init__(self, root: Catalog) -> None:
        self.root = root
        self.catalogs: dict[str, Catalog] = {"": root}
        self._nested_cache: dict[str, list[NestedRef]] = {}

    def attach(self, mountpoint: str, catalog: Catalog) -> None:
        if catalog.root_prefix != mountpoint:
            raise CatalogError(
                f"{catalog.what}: root_prefix {catalog.root_prefix!r} does not match "
                f"mountpoint {mountpoint!r}"
            )
        self.catalogs[mountpoint] = catalog

    def nested_refs(self, mountpoint: str) -> list[NestedRef]:
        refs = self._nested_cache.get(mountpoint)
        if refs is None:
            refs = self.catalogs[mountpoint].nested()
            self._nested_cache[mountpoint] = refs
        return refs

    def catalog_for(self, path: str, children: bool = False) -> tuple[str, Catalog]:
        """Deepest catalog holding ``path`` (or, with ``children``, holding its children).

        A transition point itself is answered by the parent catalog's row, so stat of a
        mountpoint needs no nested catalog; listing it does. Raises NeedCatalog when the
        catalog is not loaded yet.
        """
        mountpoint = ""
        while True:
            child = None
            for ref in self.nested_refs(mountpoint):
                if is_within(path, ref.path):
                    child = ref
                    break
            if child is None:
                return mountpoint, self.catalogs[mountpoint]
            if child.path not in self.catalogs:
                if path == child.path and not children:
                    return mountpoint, self.catalogs[mountpoint]
                raise NeedCatalog(child)
            mountpoint = child.path

    def lookup(self, path: str) -> DirEntry | None:
        return self.catalog_for(path)[1].lookup(path)

    def listing(self, path: str) -> list[DirEntry]:
        return self.catalog_for(path, children=True)[1].listing(path)

    def chunks(self, path: str) -> list[Chunk]:
        return self.catalog_for(path)[1].chunks(path)
