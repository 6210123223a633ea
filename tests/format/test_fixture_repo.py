"""The real 2015 repository written by cvmfs_server, read and fully verified by our code."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from cvmfs_format.catalog import NeedCatalog
from cvmfs_format.errors import WhitelistError
from cvmfs_format.manifest import parse_manifest
from cvmfs_format.verify import load_catalog, open_tree, verify_repository, walk
from cvmfs_format.whitelist import parse_whitelist
from tests.support.repos import FIXTURE_FQRN, Repo, unpack_fixture

# path, type, size, permission bits, symlink target, hardlink group/linkcount — as published
# by create_repo.sh in 2015 (hardlinks and hardlinked symlinks share a group per directory).
EXPECTED_TREE = [
    "/ d 4096 755 - 0/5",
    "/bar f 4 664 - 2/2",
    "/baz f 4 664 - 3/2",
    "/doesnt_need_migration d 4096 775 - 0/4",
    "/doesnt_need_migration/.cvmfscatalog f 0 664 - 0/1",
    "/doesnt_need_migration/bar f 4 664 - 0/1",
    "/doesnt_need_migration/baz f 4 664 - 0/1",
    "/doesnt_need_migration/doesnt_need_migration_either d 4096 775 - 0/2",
    "/doesnt_need_migration/doesnt_need_migration_either/.cvmfscatalog f 0 664 - 0/1",
    "/doesnt_need_migration/doesnt_need_migration_either/bar f 4 664 - 0/1",
    "/doesnt_need_migration/doesnt_need_migration_either/baz f 4 664 - 0/1",
    "/doesnt_need_migration/doesnt_need_migration_either/foo f 4 664 - 0/1",
    "/doesnt_need_migration/doesnt_need_migration_either/symlink_foo f 4 664 - 0/1",
    "/doesnt_need_migration/foo f 4 664 - 0/1",
    "/doesnt_need_migration/simple_directory d 4096 775 - 0/2",
    "/doesnt_need_migration/simple_directory/bar f 4 664 - 0/1",
    "/doesnt_need_migration/simple_directory/baz f 4 664 - 0/1",
    "/doesnt_need_migration/simple_directory/foo f 4 664 - 0/1",
    "/doesnt_need_migration/simple_directory/symlink_foo l 3 777 foo 0/1",
    "/doesnt_need_migration/symlink_bar l 3 777 bar 0/1",
    "/doesnt_need_migration/symlink_foo l 3 777 foo 0/1",
    "/foo f 4 664 - 1/2",
    "/hardlink_bar f 4 664 - 2/2",
    "/hardlink_baz f 4 664 - 3/2",
    "/hardlink_foo f 4 664 - 1/2",
    "/needs_commit_due_to_child d 4096 775 - 0/4",
    "/needs_commit_due_to_child/.cvmfscatalog f 0 664 - 0/1",
    "/needs_commit_due_to_child/bar f 4 664 - 0/1",
    "/needs_commit_due_to_child/baz f 4 664 - 0/1",
    "/needs_commit_due_to_child/foo f 4 664 - 0/1",
    "/needs_commit_due_to_child/needs_migration d 4096 775 - 0/2",
    "/needs_commit_due_to_child/needs_migration/.cvmfscatalog f 0 664 - 0/1",
    "/needs_commit_due_to_child/needs_migration/bar f 4 664 - 2/3",
    "/needs_commit_due_to_child/needs_migration/baz f 4 664 - 0/1",
    "/needs_commit_due_to_child/needs_migration/foo f 4 664 - 1/2",
    "/needs_commit_due_to_child/needs_migration/hardlink_bar_1 f 4 664 - 2/3",
    "/needs_commit_due_to_child/needs_migration/hardlink_bar_2 f 4 664 - 2/3",
    "/needs_commit_due_to_child/needs_migration/hardlink_foo f 4 664 - 1/2",
    "/needs_commit_due_to_child/simple_directory d 4096 775 - 0/2",
    "/needs_commit_due_to_child/simple_directory/bar f 4 664 - 0/1",
    "/needs_commit_due_to_child/simple_directory/baz f 4 664 - 0/1",
    "/needs_commit_due_to_child/simple_directory/foo f 4 664 - 0/1",
    "/needs_commit_due_to_child/simple_directory/symlink_foo l 3 777 foo 0/1",
    "/needs_commit_due_to_child/symlink_baz l 3 777 baz 0/1",
    "/needs_migration d 4096 775 - 0/4",
    "/needs_migration/.cvmfscatalog f 0 664 - 0/1",
    "/needs_migration/bar f 4 664 - 3/2",
    "/needs_migration/baz f 4 664 - 0/1",
    "/needs_migration/doesnt_need_migration d 4096 775 - 0/2",
    "/needs_migration/doesnt_need_migration/.cvmfscatalog f 0 664 - 0/1",
    "/needs_migration/doesnt_need_migration/bar f 4 664 - 0/1",
    "/needs_migration/doesnt_need_migration/baz f 4 664 - 0/1",
    "/needs_migration/doesnt_need_migration/foo f 4 664 - 0/1",
    "/needs_migration/foo f 4 664 - 0/1",
    "/needs_migration/hardlink_bar f 4 664 - 3/2",
    "/needs_migration/hardlink_symlink_foo_1 l 3 777 foo 1/3",
    "/needs_migration/hardlink_symlink_foo_2 l 3 777 foo 1/3",
    "/needs_migration/simple_directory d 4096 775 - 0/2",
    "/needs_migration/simple_directory/bar f 4 664 - 0/1",
    "/needs_migration/simple_directory/baz f 4 664 - 0/1",
    "/needs_migration/simple_directory/foo f 4 664 - 2/2",
    "/needs_migration/simple_directory/hardlink_foo f 4 664 - 2/2",
    "/needs_migration/simple_directory/symlink_foo l 3 777 foo 0/1",
    "/needs_migration/symlink_foo l 3 777 foo 1/3",
]


def test_signature_chain_and_every_object(fixture_repo: Repo) -> None:
    manifest = fixture_repo.verified_manifest()
    assert manifest.revision == 2 and manifest.name == FIXTURE_FQRN
    report = verify_repository(fixture_repo.local.read, manifest)
    assert report.catalogs == 7  # root, 3 nested, 3 nested-nested
    assert report.entries == len(EXPECTED_TREE)
    assert report.kinds == {"dir": 10, "file": 45, "symlink": 9}


def test_whole_tree_listing(fixture_repo: Repo) -> None:
    local = fixture_repo.local
    tree = open_tree(local.read, fixture_repo.verified_manifest())
    got = []
    for e in walk(tree, local.read):
        kind = "d" if e.is_dir else "l" if e.is_symlink else "f"
        got.append(
            f"{e.path or '/'} {kind} {e.size} {e.mode & 0o7777:o} {e.symlink or '-'} "
            f"{e.hardlink_group}/{e.linkcount}"
        )
    assert got == EXPECTED_TREE


def test_catalog_structure_and_counters(fixture_repo: Repo) -> None:
    local = fixture_repo.local
    manifest = parse_manifest(local.read_manifest()).manifest
    tree = open_tree(local.read, manifest)
    root = tree.root
    assert root.schema == 2.5 and root.schema_revision == 2 and root.revision == 2
    assert root.counters["self_dir"] == 4 and root.counters["subtree_dir"] == 12
    assert [r.path for r in root.nested()] == [
        "/doesnt_need_migration",
        "/needs_commit_due_to_child",
        "/needs_migration",
    ]
    # A transition point is answered by the parent; anything below needs the nested catalog.
    mountpoint = tree.lookup("/needs_migration")
    assert mountpoint is not None and mountpoint.is_nested_mountpoint
    with pytest.raises(NeedCatalog) as need:
        tree.lookup("/needs_migration/foo")
    ref = need.value.ref
    assert ref.path == "/needs_migration"
    tree.attach(ref.path, load_catalog(local.read, ref.hash, ref.path))
    foo = tree.lookup("/needs_migration/foo")
    assert foo is not None and foo.is_regular and foo.size == 4


def test_original_whitelist_expired_in_2015(tmp_path: Path) -> None:
    repo = unpack_fixture(tmp_path, resign=False)
    wl = parse_whitelist(repo.local.read(".cvmfswhitelist"))
    assert wl.expires == dt.datetime(2015, 11, 20, 11, 55, 13, tzinfo=dt.UTC)
    with pytest.raises(WhitelistError, match="expired on 2015-11-20 11:55 UTC"):
        repo.verified_manifest()
    # Hour granularity: still valid at 10:59 on the expiry day, expired from 11:00.
    assert not wl.is_expired(dt.datetime(2015, 11, 20, 10, 59, tzinfo=dt.UTC))
    assert wl.is_expired(dt.datetime(2015, 11, 20, 11, 0, tzinfo=dt.UTC))
