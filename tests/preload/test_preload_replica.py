"""The replica marker: preload marks a store whose selection is the whole repository
(``.cvmfs_master_replica``, what ``cvmfs_preload`` and ``cvmfs_swissknife pull`` ask a server
for) once the revision is complete and published, and removes it before a partial selection
changes anything (README, preload).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from cvmfs_format.catalog import CatalogTree
from cvmfs_format.manifest import parse_manifest
from cvmfs_format.objects import Suffix
from cvmfs_format.store import REPLICA_MARKER
from cvmfs_format.verify import load_catalog
from preload.rules import Rules
from preload.selection import Selection, Selector
from tests.support.nginx import Nginx, Site
from tests.support.preloading import run_preload, start_preload, write_spec
from tests.support.repos import Repo, add_metainfo, publish_tree
from tests.support.stores import check_objects_named_right, replica
from tests.support.waiting import wait_until

FQRN = "replica.example.org"


def make_tree(root: Path) -> Path:
    for rel, data in {
        "a.txt": b"top\n",
        "sw/.cvmfscatalog": b"",
        "sw/v1/tool": b"#!/bin/sh\n",
        "sw/v1/lib/libx.so": b"x" * 5000,
        "sw/share/doc.txt": b"docs\n",
        "etc/conf": b"k=v\n",
        "etc/sub/deep/x": b"deep\n",
    }.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "empty").mkdir()
    os.symlink("sw/v1/tool", root / "tool")
    return root


def _select(repo: Repo, lines: list[str], exact: frozenset[str] = frozenset()) -> Selection:
    """preload's catalog walk over a published repository, catalogs read from its store."""
    read = repo.local.read
    manifest = parse_manifest(repo.local.read_manifest()).manifest
    tree = CatalogTree(load_catalog(read, manifest.root_catalog, "root"))
    rules = Rules.parse([(line, f"t:{i}") for i, line in enumerate(lines, 1)])
    selector = Selector(tree, manifest.root_catalog, rules, exact)
    while needed := selector.step():
        for ref in needed:
            selector.attach(ref, load_catalog(read, ref.hash, ref.path))
    assert selector.done
    return selector.result


@pytest.mark.parametrize(
    ("rules", "exact", "whole"),
    [
        ([], (), True),  # no rules: everything
        (["/*"], (), True),
        (["/sw/*", "^/etc/*", "/a.txt", "/*"], (), True),  # narrower includes beside "/*"
        (["!/nothing/here"], (), True),  # excludes what does not exist: nothing left out
        (["/*", "!/nothing", "/nothing/x"], (), True),
        (["!/nothing", "/nothing/x"], (), False),  # an include: no longer "everything"
        (["/sw/*"], (), False),
        (["!/sw/share"], (), False),  # a directory left out
        (["!/a.txt"], (), False),  # one file left out
        (["!/empty"], (), False),  # even an empty directory (the walk cannot tell)
        (["^/*"], (), False),  # the top directory's entries only
        (["/*", "!/sw", "/sw/*"], (), True),  # re-included entirely (the later line wins)
        (["/a.txt", "/etc/conf", "/sw/v1/tool"], (), False),
        (["!/"], ("/a.txt",), False),  # an access list alone
        (["!/sw/v1"], ("/sw/v1/tool", "/sw/v1/lib/libx.so"), True),  # access list covers it
    ],
)
def test_selection_is_whole_exactly_when_nothing_is_left_out(
    tmp_path: Path, rules: list[str], exact: tuple[str, ...], whole: bool
) -> None:
    repo, _ = publish_tree(make_tree(tmp_path / "src"), tmp_path / "o", FQRN, tmp_path / "k")
    sel = _select(repo, rules, frozenset(exact))
    assert sel.whole is whole
    if whole:
        everything = _select(repo, [])
        assert sel.objects.keys() == everything.objects.keys()
        assert sel.catalogs == everything.catalogs


def _json(p: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert p.returncode == 0, p.stderr
    (r,) = json.loads(p.stdout)["repositories"]
    assert isinstance(r, dict)
    return r


def _revision(repo: Repo) -> int:
    return parse_manifest(repo.local.read_manifest()).manifest.revision


@pytest.mark.slow
def test_marker_follows_the_selection_and_its_order_with_the_manifest(tmp_path: Path) -> None:
    """A whole run marks the store only after everything (a whole run killed mid-way has not);
    a partial run removes the marker before anything else (a partial run killed mid-way has,
    while the store still publishes the old revision); a dry run leaves it alone."""
    src = make_tree(tmp_path / "src")
    origin, _ = publish_tree(src, tmp_path / "origin", FQRN, tmp_path / "keys")
    nginx = Nginx(
        tmp_path / "nginx", [Site(root=origin.store), Site(root=origin.store, limit_rate="256k")]
    )
    fast, slow = (s.url() for s in nginx.sites)
    store = tmp_path / "store"
    stored = replica(origin, store)
    marker = stored.dir / REPLICA_MARKER
    tmp_dir = store / ".preload-tmp" / FQRN
    whole_fast = write_spec(tmp_path / "w.yaml", store, origin, [fast])
    whole_slow = write_spec(tmp_path / "ws.yaml", store, origin, [slow])
    partial = "    exclude: [/sw/share]\n"
    partial_fast = write_spec(tmp_path / "p.yaml", store, origin, [fast], partial)
    partial_slow = write_spec(tmp_path / "ps.yaml", store, origin, [slow], partial)

    def killed_mid_download(spec: Path) -> None:
        """preload on the slow site, SIGKILLed while a chunk is half-downloaded: until then
        the store published revision 1 and was not marked."""
        proc = start_preload(spec)
        try:

            def half_way() -> bool:
                sizes = []
                for p in tmp_dir.glob("*") if tmp_dir.is_dir() else []:
                    try:
                        sizes.append(p.stat().st_size)
                    except FileNotFoundError:  # renamed meanwhile
                        continue
                return proc.poll() is not None or any(s > 100_000 for s in sizes)

            wait_until(half_way, 60, what="a chunk half-downloaded from the slow site")
            assert _revision(stored) == 1 and not marker.exists()
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, "preload finished before it was killed"
        assert _revision(stored) == 1 and not marker.exists()

    try:
        r = _json(run_preload(whole_fast, "--json"))
        assert r["whole"] is True and marker.is_file()
        assert set(stored.objects()) == set(origin.objects())  # what the publisher wrote
        p = run_preload(whole_fast)
        assert p.returncode == 0 and "; the whole revision" in p.stdout, p.stdout + p.stderr
        r = _json(run_preload(partial_fast, "--dry-run", "--json"))
        assert r["whole"] is False and marker.is_file()  # a dry run changes nothing

        # revision 2 brings a file of two chunks: minutes at 256 KiB/s
        (src / "sw" / "v1" / "big.bin").write_bytes(os.urandom(6 << 20))
        publish_tree(src, origin.store, FQRN, origin.keys_dir)

        # partial: the marker went before anything changed what the store publishes
        killed_mid_download(partial_slow)
        stored.verify()  # revision 1 is still all there, just no longer marked
        # whole: not marked while revision 2 is still on its way
        killed_mid_download(whole_slow)

        r = _json(run_preload(whole_fast, "--json"))
        assert r["whole"] is True and r["revision"] == 2 and marker.is_file()
        assert stored.verify().revision == 2
        assert set(origin.objects()) <= set(stored.objects())
        check_objects_named_right(stored)

        r = _json(run_preload(partial_fast, "--prune", "--json"))
        assert r["whole"] is False and r["pruned_objects"] and not marker.exists()
    finally:
        nginx.stop()


def test_whole_selection_stores_the_metainfo_object(tmp_path: Path) -> None:
    """A replica serves the manifest's meta-information object (cvmfs_preload fetches it);
    a partial selection has no use for it."""
    origin, _ = publish_tree(
        make_tree(tmp_path / "src"), tmp_path / "origin", FQRN, tmp_path / "keys"
    )
    h = add_metainfo(origin, b'{"administrator": "tests"}\n')
    rel = h.object_path(Suffix.METAINFO)
    server = [f"file://{origin.store}/@fqrn@"]
    whole = write_spec(tmp_path / "w.yaml", tmp_path / "whole", origin, server)
    partial = write_spec(
        tmp_path / "p.yaml", tmp_path / "partial", origin, server, "    include: [/etc/*]\n"
    )
    r = _json(run_preload(whole, "--json"))
    stored = replica(origin, tmp_path / "whole")
    assert r["whole"] is True and (stored.dir / REPLICA_MARKER).is_file()
    assert (stored.dir / rel).read_bytes() == (origin.dir / rel).read_bytes()
    assert set(stored.objects()) == set(origin.objects())
    stored.verify()
    r = _json(run_preload(partial, "--json"))
    stored = replica(origin, tmp_path / "partial")
    assert r["whole"] is False and not (stored.dir / REPLICA_MARKER).exists()
    assert not (stored.dir / rel).exists()
