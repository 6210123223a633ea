"""hep-publish behaviour: revisions, object reuse, keys, counters, xattrs, atomicity, CLI."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_format.catalog import Catalog
from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import Suffix, verify_object
from cvmfs_format.verify import open_tree, walk
from cvmfs_format.whitelist import parse_whitelist
from cvmfs_format.xattrs import decode_xattrs
from tests.support.repos import PROJECT, Repo, publish_tree
from tests.support.stores import check_objects_named_right
from tests.support.waiting import wait_until

FQRN = "pub.example.org"


_CMD = [sys.executable, "-m", "publish.cli"]
_ENV = {**os.environ, "PYTHONPATH": str(PROJECT)}


def _cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_CMD, *map(str, args)], capture_output=True, text=True, env=_ENV, timeout=timeout
    )


def _tree(root: Path, n: int = 20) -> Path:
    (root / "a" / "b").mkdir(parents=True)
    for i in range(n):
        (root / "a" / f"f{i}.txt").write_text(f"file {i}\n")
    (root / "a" / "b" / ".cvmfscatalog").touch()
    (root / "a" / "b" / "deep.txt").write_text("deep\n")
    return root


def test_second_publish_is_next_revision_and_reuses_objects(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    repo, first = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    cert = (tmp_path / "keys" / f"{FQRN}.crt").read_bytes()
    assert first.revision == 1 and repo.verify().revision == 1
    (src / "a" / "f3.txt").write_text("changed\n")
    repo, second = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    assert second.revision == 2 and repo.verify().revision == 2
    assert (tmp_path / "keys" / f"{FQRN}.crt").read_bytes() == cert  # keys reused
    # New: the changed file and the root catalog (the nested catalog did not change).
    assert second.objects_written == 2
    assert second.objects_reused == first.objects_written - 2  # all but old f3 and old root
    root = Catalog(
        verify_object(
            repo.local.read(second.root_catalog.object_path(Suffix.CATALOG)), second.root_catalog
        )
    )
    assert root.properties["previous_revision"] == first.root_catalog.hex
    assert root.revision == 2


def test_counters_nested_catalogs_and_properties(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", n=3)
    os.symlink("f0.txt", src / "a" / "link")
    (src / "a" / "big").write_bytes(os.urandom(9 * 1024 * 1024))
    repo, _ = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    m = parse_manifest(repo.local.read_manifest()).manifest
    tree = open_tree(repo.local.read, m)
    root = tree.root
    assert root.properties["schema"] == "2.5" and root.properties["schema_revision"] == "7"
    assert root.ttl == m.ttl == 240 and "root_prefix" not in root.properties
    assert m.root_catalog_size == root.size
    [ref] = root.nested()
    assert ref.path == "/a/b"
    nested = Catalog(verify_object(repo.local.read(ref.hash.object_path(Suffix.CATALOG)), ref.hash))
    assert ref.size == nested.size and nested.root_prefix == "/a/b"
    assert len(nested.counters) == len(root.counters) == 24
    # root catalog: "", /a, /a/b (transition point) are dirs; 3 files + big; link; big = 3 chunks
    assert {
        k: root.counters[f"self_{k}"]
        for k in ("dir", "regular", "symlink", "nested", "chunked", "chunks")
    } == {"dir": 3, "regular": 4, "symlink": 1, "nested": 1, "chunked": 1, "chunks": 3}
    assert root.counters["self_file_size"] == sum(len(f"file {i}\n") for i in range(3)) + 9 * 2**20
    assert root.counters["self_chunked_size"] == 9 * 2**20
    # nested: its own root dir, the marker and deep.txt; root's subtree_* = nested's self_*
    assert nested.counters["self_dir"] == 1 and nested.counters["self_regular"] == 2
    for name in ("dir", "regular", "file_size", "nested"):
        assert root.counters[f"subtree_{name}"] == nested.counters[f"self_{name}"]
    transition = tree.lookup("/a/b")
    assert transition is not None and transition.is_nested_mountpoint
    assert [e.path for e in walk(tree, repo.local.read, "/a/b")] == [
        "/a/b",
        "/a/b/.cvmfscatalog",
        "/a/b/deep.txt",
    ]


def test_xattrs_hardlinks_and_specials(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d1").mkdir(parents=True)
    (src / "d2").mkdir()
    f = src / "d1" / "x"
    f.write_text("x\n")
    os.setxattr(f, "user.experiment", b"cms")
    os.link(f, src / "d1" / "x2")
    os.link(f, src / "d2" / "x3")  # across directories: an independent file
    os.mkfifo(src / "fifo")
    repo, _ = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    tree = open_tree(repo.local.read, parse_manifest(repo.local.read_manifest()).manifest)
    x, x2, x3 = (tree.lookup(p) for p in ("/d1/x", "/d1/x2", "/d2/x3"))
    assert x and x2 and x3
    assert decode_xattrs(x.xattr_blob) == {b"user.experiment": b"cms"}
    assert x.hardlink_group == x2.hardlink_group > 0 and x.linkcount == x2.linkcount == 2
    assert x3.hardlink_group == 0 and x3.linkcount == 1 and x3.hash == x.hash
    fifo = tree.lookup("/fifo")
    assert fifo is not None and fifo.flags == 4 | 16 and fifo.hash is None
    assert (
        tree.root.counters["self_special"] == 1 and tree.root.counters["self_xattr"] == 3
    )  # x, x2, x3 share the inode


def test_whitelist_valid_for_30_days(tmp_path: Path) -> None:
    repo, _ = publish_tree(_tree(tmp_path / "src", 1), tmp_path / "store", FQRN, tmp_path / "keys")
    wl = parse_whitelist(repo.local.read(".cvmfswhitelist"))
    assert dt.timedelta(days=29, hours=23) < wl.expires - wl.created <= dt.timedelta(days=30)


@pytest.mark.slow
def test_killed_publish_leaves_previous_revision_intact(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", n=10)
    store, keys = tmp_path / "store", tmp_path / "keys"
    first = _cli(src, "--name", FQRN, "--store", store, "--keys", keys)
    assert first.returncode == 0, first.stderr
    repo = Repo(store, FQRN, keys / f"{FQRN}.pub", keys)
    before = (repo.dir / ".cvmfspublished").read_bytes()

    def stored() -> int:  # objects under their final names (cheaper than repo.objects())
        return sum(1 for _ in (repo.dir / "data").glob("??/*"))

    # Each round adds 2,000 new objects and kills publish once a share of them
    # is on disk: killed mid-write whatever the machine's speed.
    for round_, share in enumerate((0.05, 0.4, 0.8)):
        many = src / f"many{round_}"
        many.mkdir()
        for i in range(2000):
            (many / f"{i}.dat").write_bytes(os.urandom(32768))
        target = stored() + 2000 * share
        proc = subprocess.Popen(
            [
                *_CMD,
                str(src),
                "--name",
                FQRN,
                "--store",
                str(store),
                "--keys",
                str(keys),
                "--no-verify",
            ],
            env=_ENV,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_until(
                lambda: proc.poll() is not None or stored() >= target,  # noqa: B023
                60,
                what=f"{target:.0f} objects in the store",
            )
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, "publish finished before it could be killed"
        assert len(repo.objects()) >= target
        assert (repo.dir / ".cvmfspublished").read_bytes() == before
        assert repo.verify().revision == 1
        # No half-written object is ever visible under its final name.
        check_objects_named_right(repo)
    result = _cli(src, "--name", FQRN, "--store", store, "--keys", keys)
    assert result.returncode == 0, result.stderr
    assert "revision 2" in result.stdout and "verified:" in result.stdout
    assert repo.verify().revision == 2


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = _cli(tmp_path / "absent", "--name", FQRN, "--store", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "absent: not a directory" in r.stderr
    bad_keys = tmp_path / "keys"
    bad_keys.mkdir()
    (bad_keys / f"{FQRN}.masterkey").write_text("not a key")
    src = _tree(tmp_path / "src", 1)
    r = _cli(src, "--name", FQRN, "--store", tmp_path / "o", "--keys", bad_keys)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{FQRN}.masterkey: cannot load private key" in r.stderr
    r = _cli(src, "--name", "../evil", "--store", tmp_path / "o")
    assert r.returncode == 2 and "not a fully qualified repository name" in r.stderr


@pytest.mark.parametrize("name", ["other.example.org"])
def test_refuses_store_of_another_repository(tmp_path: Path, name: str) -> None:
    src = _tree(tmp_path / "src", 1)
    publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    (tmp_path / "store" / name).symlink_to(tmp_path / "store" / FQRN)
    r = _cli(src, "--name", name, "--store", tmp_path / "store", "--keys", tmp_path / "keys")
    assert r.returncode == 1 and f"holds repository '{FQRN}'" in r.stderr
