"""Whole-repository verification over a ``read(path) -> bytes`` callback.

The callback is the only I/O: a directory, an HTTP client or a test dict can stand behind it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from cvmfs_format.catalog import Catalog, CatalogTree, DirEntry, NeedCatalog, NestedRef
from cvmfs_format.errors import FormatError, SignatureError, WhitelistError
from cvmfs_format.hashes import ContentHash
from cvmfs_format.manifest import (
    ROOT_PATH_MD5,
    Manifest,
    load_certificate,
    parse_manifest,
    verify_manifest,
)
from cvmfs_format.objects import Suffix, verify_object
from cvmfs_format.whitelist import parse_whitelist, verify_certificate_listed, verify_whitelist

if TYPE_CHECKING:
    from cvmfs_format.rsa_keys import RsaPublicKey

Reader = Callable[[str], bytes]
T = TypeVar("T")


def verify_ensemble(
    manifest_raw: bytes,
    whitelist_raw: bytes,
    read: Reader,
    fqrn: str,
    master_keys: list[RsaPublicKey],
    now: dt.datetime,
    allow_expired: bool = False,
) -> Manifest:
    """Master key -> whitelist -> certificate -> manifest, as the cvmfs client checks them."""
    signed = parse_manifest(manifest_raw)
    cert_hash = signed.manifest.certificate
    if cert_hash is None:
        raise FormatError(".cvmfspublished: no certificate (key X)")
    cert_pem = verify_object(
        read(cert_hash.object_path(Suffix.CERTIFICATE)), cert_hash, "certificate object"
    )
    manifest = verify_manifest(signed, cert_pem, fqrn)
    wl = parse_whitelist(whitelist_raw)
    verify_whitelist(wl, master_keys, fqrn, now, allow_expired)
    verify_certificate_listed(wl, load_certificate(cert_pem))
    return manifest


def recheck_ensemble(
    manifest_raw: bytes,
    whitelist_raw: bytes,
    fqrn: str,
    now: dt.datetime,
    allow_expired: bool = False,
) -> Manifest:
    """What :func:`verify_ensemble` checks of bytes it verified before, now: the names,
    the root path, and that the whitelist has not expired since (the signatures, a function
    of the same bytes and keys, hold as they did).  No cryptography: a few microseconds."""
    m = parse_manifest(manifest_raw).manifest
    if m.certificate is None:
        raise FormatError(".cvmfspublished: no certificate (key X)")
    if m.root_path_md5 != ROOT_PATH_MD5:
        raise SignatureError(f".cvmfspublished: root path hash R is {m.root_path_md5!r}")
    if m.name != fqrn:
        raise SignatureError(f".cvmfspublished: repository name is {m.name!r}, expected {fqrn!r}")
    wl = parse_whitelist(whitelist_raw)
    if wl.name != fqrn:
        raise WhitelistError(f".cvmfswhitelist: repository name is {wl.name!r}, expected {fqrn!r}")
    if not allow_expired and wl.is_expired(now):
        raise WhitelistError(f".cvmfswhitelist: expired on {wl.expires:%Y-%m-%d %H:%M} UTC")
    return m


def load_catalog(read: Reader, content: ContentHash, what: str) -> Catalog:
    stored = read(content.object_path(Suffix.CATALOG))
    return Catalog(verify_object(stored, content, what), what)


def open_tree(read: Reader, manifest: Manifest) -> CatalogTree:
    return CatalogTree(load_catalog(read, manifest.root_catalog, "root catalog"))


def walk(tree: CatalogTree, read: Reader, start: str = "") -> Iterator[DirEntry]:
    """Depth-first over every entry below ``start`` (inclusive), loading nested catalogs."""

    def attach(ref: NestedRef) -> None:
        tree.attach(ref.path, load_catalog(read, ref.hash, f"nested catalog {ref.path}"))

    stack = [start]
    while stack:
        path = stack.pop()
        entry = loading(attach, partial(tree.lookup, path))
        if entry is None:
            raise FormatError(f"catalog: {path or '/'} is listed but has no entry")
        yield entry
        if entry.is_dir:
            children = loading(attach, partial(tree.listing, path))
            stack.extend(c.path for c in reversed(children))


def loading(attach: Callable[[NestedRef], None], query: Callable[[], T]) -> T:
    """Run a CatalogTree query, attaching nested catalogs until it can be answered."""
    while True:
        try:
            return query()
        except NeedCatalog as need:
            attach(need.ref)


class VerifyReport:
    """What a full verification saw.  (Not a dataclass: hep-exec's start imports this module,
    and each dataclass's generated methods cost ~0.5 ms of it.)"""

    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self.catalogs = self.entries = self.objects = self.stored_bytes = self.file_bytes = 0
        self.kinds: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"VerifyReport({self.__dict__})"


def verify_repository(read: Reader, manifest: Manifest) -> VerifyReport:
    """Every catalog and every referenced object (files and chunks) checked by hash."""
    report = VerifyReport(revision=manifest.revision)
    tree = open_tree(read, manifest)
    if tree.root.revision != manifest.revision:
        raise FormatError(
            f"root catalog revision {tree.root.revision} != manifest revision {manifest.revision}"
        )
    seen: set[ContentHash] = set()
    for entry in walk(tree, read):
        report.entries += 1
        kind = (
            "dir"
            if entry.is_dir
            else "symlink"
            if entry.is_symlink
            else ("file" if entry.is_regular else "special")
        )
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
        if entry.is_regular and not entry.is_external:
            report.file_bytes += entry.size
            if entry.is_chunked:
                parts = [(c.hash, Suffix.PARTIAL) for c in tree.chunks(entry.path)]
                total = sum(c.size for c in tree.chunks(entry.path))
                if total != entry.size:
                    raise FormatError(f"{entry.path}: chunks cover {total} of {entry.size} bytes")
            elif entry.hash is not None:
                parts = [(entry.hash, Suffix.FILE)]
            else:
                raise FormatError(f"{entry.path}: regular file without content hash")
            for h, suffix in parts:
                if h in seen:
                    continue
                seen.add(h)
                stored = read(h.object_path(suffix))
                data = verify_object(stored, h, f"{entry.path} ({h.object_path(suffix)})")
                if suffix is Suffix.FILE and len(data) != entry.size:
                    raise FormatError(
                        f"{entry.path}: object has {len(data)} bytes, catalog says {entry.size}"
                    )
                report.objects += 1
                report.stored_bytes += len(stored)
    report.catalogs = len(tree.catalogs)
    return report
