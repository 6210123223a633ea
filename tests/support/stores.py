"""Checks of a store's content: a replica of a published repository, object by object."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from cvmfs_format.catalog import Catalog, NestedRef
from cvmfs_format.hashes import ContentHash
from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import Suffix, parse_object_path, verify_object, verify_stored
from cvmfs_format.verify import loading, open_tree, walk
from tests.support.repos import Repo


def replica(origin: Repo, store: Path) -> Repo:
    """``origin``'s repository as preloaded into ``store`` (checked with origin's keys)."""
    return Repo(store, origin.fqrn, origin.master_pub, origin.keys_dir)


def check_objects_named_right(repo: Repo) -> None:
    """Every file under ``data/XX/`` is a complete object: its bytes hash to its name."""
    for rel in repo.objects():
        name = parse_object_path(rel)
        verify_stored((repo.dir / rel).read_bytes(), name.hash, rel)


def verify_selected(repo: Repo, paths: set[str]) -> int:
    """The signature chain of the stored ensemble, every one of ``paths`` a regular file whose
    content is stored intact, and nothing partial under ``data/``; returns the revision."""
    local = repo.local
    manifest = repo.verified_manifest()
    tree = open_tree(local.read, manifest)

    def attach(ref: NestedRef) -> None:
        stored = local.read(ref.hash.object_path(Suffix.CATALOG))
        tree.attach(ref.path, Catalog(verify_object(stored, ref.hash), ref.path))

    for path in sorted(paths):
        entry = loading(attach, partial(tree.lookup, path))
        assert entry is not None and entry.is_regular, path
        parts: list[tuple[ContentHash, Suffix]]
        if entry.is_chunked:
            parts = [(c.hash, Suffix.PARTIAL) for c in tree.chunks(path)]
        else:
            assert entry.hash is not None
            parts = [(entry.hash, Suffix.FILE)]
        data = b"".join(verify_object(local.read(h.object_path(s)), h, path) for h, s in parts)
        assert len(data) == entry.size, path
    check_objects_named_right(repo)
    return manifest.revision


def regular_files(repo: Repo) -> set[str]:
    """Every regular file of the repository's current revision."""
    local = repo.local
    tree = open_tree(local.read, parse_manifest(local.read_manifest()).manifest)
    return {e.path for e in walk(tree, local.read) if e.is_regular}


def expected_objects(
    repo: Repo, paths: set[str] | None = None, mountpoints: set[str] | None = None
) -> set[str]:
    """Object paths a selection of ``paths`` (None: every regular file) with the catalogs of
    ``mountpoints`` (``""`` the root; None: every catalog) needs, computed from the source
    repository; the certificate too."""
    local = repo.local
    manifest = parse_manifest(local.read_manifest()).manifest
    tree = open_tree(local.read, manifest)
    out = set()
    for e in walk(tree, local.read):
        if e.is_regular and (paths is None or e.path in paths):
            if e.is_chunked:
                out |= {c.hash.object_path(Suffix.PARTIAL) for c in tree.chunks(e.path)}
            else:
                assert e.hash is not None
                out.add(e.hash.object_path())
    cats: dict[str, str] = {"": manifest.root_catalog.object_path(Suffix.CATALOG)}
    for mp in tree.catalogs:
        for ref in tree.nested_refs(mp):
            cats[ref.path] = ref.hash.object_path(Suffix.CATALOG)
    out |= {cats[m] for m in (cats if mountpoints is None else mountpoints)}
    assert manifest.certificate is not None
    out.add(manifest.certificate.object_path(Suffix.CERTIFICATE))
    return out
