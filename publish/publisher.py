"""Build catalogs and objects from a scanned tree and commit them as a new revision."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_format.catalog import Catalog
from cvmfs_format.catalog_writer import CatalogWriter, NewEntry
from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import Algorithm, ContentHash
from cvmfs_format.manifest import Manifest, parse_manifest, sign_manifest
from cvmfs_format.objects import Suffix, make_object
from cvmfs_format.store import LocalRepository
from cvmfs_format.verify import load_catalog
from cvmfs_format.whitelist import make_whitelist
from cvmfs_format.xattrs import encode_xattrs
from publish.keys import KeySet
from publish.scan import SourceNode

CHUNK_SIZE = 4 * 1024 * 1024  # files larger than this are split into P chunks of this size
DEFAULT_TTL = 240


@dataclass
class PublishResult:
    revision: int
    root_catalog: ContentHash
    catalogs: int = 0
    entries: int = 0
    objects_written: int = 0
    objects_reused: int = 0
    bytes_written: int = 0
    file_bytes: int = 0
    kinds: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class PreviousCatalog:
    hash: ContentHash
    catalog: Catalog


def _previous_catalogs(repo: LocalRepository, manifest: Manifest) -> dict[str, PreviousCatalog]:
    """Every catalog of the previous revision, by mountpoint (to keep unchanged ones)."""
    out: dict[str, PreviousCatalog] = {}
    todo = [("", manifest.root_catalog)]
    while todo:
        mountpoint, h = todo.pop()
        catalog = load_catalog(repo.read, h, f"previous catalog {mountpoint or '/'}")
        out[mountpoint] = PreviousCatalog(h, catalog)
        todo.extend((ref.path, ref.hash) for ref in catalog.nested())
    return out


class _Builder:
    def __init__(self, repo: LocalRepository, source_root: Path, algorithm: Algorithm) -> None:
        self.repo = repo
        self.source_root = source_root
        self.algorithm = algorithm
        self.stats = PublishResult(0, ContentHash(algorithm, bytes(20)))
        self.previous: dict[str, PreviousCatalog] = {}

    def put(self, raw: bytes, suffix: Suffix) -> tuple[ContentHash, int]:
        h, stored = make_object(raw, self.algorithm)
        if self.repo.write_object(h.object_path(suffix), stored):
            self.stats.objects_written += 1
            self.stats.bytes_written += len(stored)
        else:
            self.stats.objects_reused += 1
        return h, len(stored)

    def file_content(
        self, node: SourceNode
    ) -> tuple[ContentHash | None, list[tuple[int, int, ContentHash]]]:
        fs_path = self.source_root / node.path.lstrip("/")
        size = node.st.st_size
        try:
            with open(fs_path, "rb") as f:
                if size <= CHUNK_SIZE:
                    return self.put(f.read(), Suffix.FILE)[0], []
                chunks = []
                offset = 0
                while block := f.read(CHUNK_SIZE):
                    chunks.append((offset, len(block), self.put(block, Suffix.PARTIAL)[0]))
                    offset += len(block)
                return None, chunks
        except OSError as e:
            raise FormatError(f"{fs_path}: cannot read ({e.strerror})") from None


def _entry(node: SourceNode, builder: _Builder) -> NewEntry:
    st = node.st
    mode = st.st_mode
    e = NewEntry(
        path=node.path,
        mode=mode,
        mtime=int(st.st_mtime_ns // 1_000_000_000),
        mtime_ns=int(st.st_mtime_ns % 1_000_000_000),
        uid=st.st_uid,
        gid=st.st_gid,
        xattr_blob=None,
    )
    if node.xattrs:
        e.xattr_blob = encode_xattrs(node.xattrs)
    if stat.S_ISDIR(mode):
        e.size = st.st_size
        e.linkcount = 2 + sum(1 for c in node.children if c.is_dir)
    elif stat.S_ISLNK(mode):
        e.symlink = node.symlink
        e.size = len(node.symlink.encode("utf-8", "surrogateescape"))
    elif stat.S_ISREG(mode):
        e.size = st.st_size
        e.hash, e.chunks = builder.file_content(node)
        builder.stats.file_bytes += e.size
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        e.size = st.st_rdev
    return e


def _hardlink_groups(directory: SourceNode) -> dict[str, int]:
    """path -> member count, for inodes linked more than once within this directory.

    CVMFS keeps hardlink groups inside one directory; links across directories are
    published as independent files.
    """
    by_inode: dict[tuple[int, int], list[str]] = {}
    for c in directory.children:
        if not c.is_dir and c.st.st_nlink > 1:
            by_inode.setdefault((c.st.st_dev, c.st.st_ino), []).append(c.path)
    return {p: len(ps) for ps in by_inode.values() if len(ps) > 1 for p in ps}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "file" if stat.S_ISREG(mode) else "special"


def _build_catalog(
    mountpoint: SourceNode,
    builder: _Builder,
    revision: int,
    now: int,
    previous_root: str | None,
) -> tuple[ContentHash, int, dict[str, int]]:
    """Write the catalog rooted at ``mountpoint`` (and, first, its nested catalogs).

    Returns the catalog's hash, uncompressed size and self+subtree counters.
    """
    writer = CatalogWriter(mountpoint.path)
    subtree: Counter[str] = Counter()
    root_entry = _entry(mountpoint, builder)
    root_entry.nested_root = mountpoint.path != ""
    writer.add(root_entry)
    if mountpoint.path == "":  # a nested root was counted as its parent's child already
        builder.stats.kinds["dir"] += 1
    stack = [mountpoint]
    while stack:
        directory = stack.pop()
        groups = _hardlink_groups(directory)
        group_ids: dict[tuple[int, int], int] = {}
        for child in directory.children:
            e = _entry(child, builder)
            builder.stats.kinds[_kind(child.st.st_mode)] += 1
            if child.path in groups:
                key = (child.st.st_dev, child.st.st_ino)
                if key not in group_ids:
                    group_ids[key] = writer.next_hardlink_group()
                e.hardlink_group = group_ids[key]
                e.linkcount = groups[child.path]
            if child.is_dir and child.has_catalog_marker:
                e.nested_mountpoint = True
                writer.add(e)
                h, size, counters = _build_catalog(child, builder, revision, now, None)
                writer.add_nested(child.path, h, size)
                subtree.update(counters)
            else:
                writer.add(e)
                if child.is_dir:
                    stack.append(child)
    data = None
    old = builder.previous.get(mountpoint.path)
    if old is not None and mountpoint.path != "":
        candidate = writer.serialize(old.catalog.properties, dict(subtree))
        if make_object(candidate, builder.algorithm)[0] == old.hash:
            data = candidate  # unchanged: keep the old object and its revision
    if data is None:
        props = writer.properties(
            revision,
            now,
            previous_revision=previous_root,
            ttl=DEFAULT_TTL if mountpoint.path == "" else None,
        )
        data = writer.serialize(props, dict(subtree))
    h, _ = builder.put(data, Suffix.CATALOG)
    builder.stats.catalogs += 1
    total = Counter(writer.counters)
    total.update(subtree)
    return h, len(data), dict(total)


def publish(
    tree: SourceNode,
    source_root: Path,
    repo: LocalRepository,
    keys: KeySet,
    now: dt.datetime | None = None,
    algorithm: Algorithm = Algorithm.SHA1,
) -> PublishResult:
    """Write revision N+1 of ``repo`` from ``tree``; the manifest is replaced last, then the
    repository is marked as a complete replica (``.cvmfs_master_replica``)."""
    if not tree.is_dir:
        raise FormatError(f"{source_root}: not a directory")
    now = now or dt.datetime.now(dt.UTC)
    previous: Manifest | None = None
    if repo.exists:
        previous = parse_manifest(repo.read_manifest()).manifest
        if previous.name and previous.name != repo.fqrn:
            raise FormatError(f"{repo.dir}: holds repository {previous.name!r}, not {repo.fqrn!r}")
    revision = previous.revision + 1 if previous else 1
    repo.prepare()
    builder = _Builder(repo, source_root, algorithm)
    if previous is not None:
        builder.previous = _previous_catalogs(repo, previous)
    timestamp = int(now.timestamp())
    root_hash, root_size, _ = _build_catalog(
        tree, builder, revision, timestamp, previous.root_catalog.hex if previous else None
    )
    cert_hash, _ = builder.put(keys.certificate_pem, Suffix.CERTIFICATE)
    manifest = Manifest(
        root_catalog=root_hash,
        root_catalog_size=root_size,
        revision=revision,
        ttl=DEFAULT_TTL,
        name=repo.fqrn,
        certificate=cert_hash,
        timestamp=timestamp,
    )
    repo.write_whitelist(
        make_whitelist(repo.fqrn, keys.certificate_der, keys.master_key, now, algorithm=algorithm)
    )
    repo.write_manifest(sign_manifest(manifest, keys.repository_key, algorithm))
    repo.mark_replica()  # every object of the new revision is stored: replicable
    result = builder.stats
    result.revision = revision
    result.root_catalog = root_hash
    result.entries = sum(result.kinds.values())
    return result


def default_keys_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hep-publish" / "keys"
