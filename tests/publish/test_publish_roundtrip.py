"""Random trees published with hep-publish's code and read back with the format reader, and
checked by the real ``cvmfs_swissknife check`` (signatures included) where the reference
CernVM-FS client is at hand."""

from __future__ import annotations

import datetime as dt
import os
import random
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmfs_format.catalog import CatalogTree, DirEntry
from cvmfs_format.objects import Suffix, verify_object
from cvmfs_format.verify import Reader, load_catalog, loading, walk
from publish.keys import KeySet, load_or_create_keys
from publish.publisher import CHUNK_SIZE, publish
from publish.scan import CATALOG_MARKER, scan
from tests.support.nginx import NGINX, Nginx, Site
from tests.support.reference import Reference
from tests.support.repos import Repo

FQRN = "roundtrip.example.org"

# Names: unicode from several scripts, spaces, odd punctuation; never "/", NUL, "." or "..".
NAME = st.text(
    alphabet=st.sampled_from(list("abcXYZ019 _-.,;'~+=%@#!()[]{}") + list("éßø名字ДЖ☃𝄞")),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", "..", CATALOG_MARKER))

FILE_SIZE = st.one_of(
    st.just(0),
    st.integers(1, 3000),
    st.sampled_from([CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 12345]),
)


def _node(depth: int) -> st.SearchStrategy[Any]:
    leaf = st.one_of(
        st.tuples(st.just("file"), FILE_SIZE, st.sampled_from([0o644, 0o755, 0o600, 0o444])),
        st.tuples(
            st.just("symlink"),
            st.one_of(
                NAME,
                st.just("$(RT_VARIANT:-default)/x"),
                st.just("/usr/bin/env"),
                st.just("../../up/and/over"),
            ),
        ),
        st.tuples(st.just("hardlink")),
    )
    if depth == 0:
        return leaf
    return st.one_of(
        leaf,
        st.tuples(
            st.just("dir"),
            st.dictionaries(NAME, _node(depth - 1), max_size=5),
            st.booleans(),  # nested catalog marker
            st.sampled_from([0o755, 0o700, 0o775]),
        ),
    )


TREE = st.dictionaries(NAME, _node(3), min_size=1, max_size=6)


def _materialise(spec: dict[str, Any], where: Path, rng: random.Random) -> None:
    files: list[Path] = []
    for name, node in spec.items():
        path = where / name
        if node[0] == "file":
            path.write_bytes(rng.randbytes(node[1]))
            os.chmod(path, node[2])
            files.append(path)
        elif node[0] == "symlink":
            os.symlink(node[1], path)
        elif node[0] == "dir":
            path.mkdir()
            if node[2]:
                (path / CATALOG_MARKER).touch()
            _materialise(node[1], path, rng)
            os.chmod(path, node[3])
    for name, node in spec.items():
        if node[0] == "hardlink":
            if files:
                os.link(rng.choice(files), where / name)
            else:
                (where / name).write_bytes(b"lonely\n")


def _content(tree: CatalogTree, entry: DirEntry, read: Reader) -> bytes:
    if entry.is_chunked:
        parts = []
        for c in tree.chunks(entry.path):
            parts.append(verify_object(read(c.hash.object_path(Suffix.PARTIAL)), c.hash))
            assert len(parts[-1]) == c.size
        return b"".join(parts)
    assert entry.hash is not None
    return verify_object(read(entry.hash.object_path()), entry.hash)


def _read_back(repo: Repo) -> tuple[dict[str, DirEntry], CatalogTree, Reader]:
    read = repo.local.read
    tree = CatalogTree(load_catalog(read, repo.verified_manifest().root_catalog, "root"))
    return {e.path: e for e in walk(tree, read)}, tree, read


@dataclass(frozen=True)
class Workshop:
    """Made once per module: the keys (RSA key generation is slow) and a directory that
    holds each example's private source tree and store."""

    keys: KeySet
    keys_dir: Path
    tmp: Path


@pytest.fixture(scope="module")
def workshop(tmp_path_factory: pytest.TempPathFactory) -> Workshop:
    keys_dir = tmp_path_factory.mktemp("roundtrip-keys")
    keys, _ = load_or_create_keys(keys_dir, FQRN, dt.datetime.now(dt.UTC))
    return Workshop(keys, keys_dir, tmp_path_factory.mktemp("roundtrip"))


Check = Callable[[Repo], None]


@pytest.fixture(scope="module")
def real_check(
    workshop: Workshop,
    reference_or_reason: Reference | str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Check | None]:
    """``cvmfs_swissknife check -c`` over HTTP (nginx serving the workshop, so that the
    signature chain is checked too) of a repository in the workshop; None without the
    reference client or nginx: the round trip then runs without it."""
    if isinstance(reference_or_reason, str) or not os.path.exists(NGINX):
        yield None
        return
    ref = reference_or_reason
    nginx = Nginx(tmp_path_factory.mktemp("roundtrip-nginx"), [Site(root=workshop.tmp)])

    def check(repo: Repo) -> None:
        where = repo.dir.relative_to(workshop.tmp)
        url = f"http://127.0.0.1:{nginx.sites[0].port}/cvmfs/{where}"
        p = ref.check(url, repo.fqrn, repo.master_pub, repo.store.parent / "swissknife")
        assert p.returncode == 0, f"cvmfs_swissknife check {url}: {p.stdout}{p.stderr}"

    try:
        yield check
    finally:
        nginx.stop()


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=TREE, seed=st.integers(0, 2**32))
def test_random_tree_roundtrip(
    workshop: Workshop, real_check: Check | None, spec: dict[str, Any], seed: int
) -> None:
    with tempfile.TemporaryDirectory(dir=workshop.tmp) as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "src"
        src.mkdir()
        _materialise(spec, src, random.Random(seed))
        repo = Repo(tmp / "store", FQRN, workshop.keys_dir / f"{FQRN}.pub", workshop.keys_dir)
        publish(scan(src), src, repo.local, workshop.keys)
        if real_check is not None:
            real_check(repo)  # the real client's consistency check, signatures included
        entries, tree, read = _read_back(repo)

        expected: dict[str, os.stat_result] = {"": src.lstat()}
        for dirpath, dirnames, filenames in os.walk(src):
            for n in dirnames + filenames:
                p = Path(dirpath) / n
                expected["/" + str(p.relative_to(src))] = p.lstat()
        assert set(entries) == set(expected)

        inode_groups: dict[tuple[str, int], set[int]] = {}
        members: dict[tuple[str, int], list[DirEntry]] = {}
        for path, st_ in expected.items():
            e = entries[path]
            fs_path = src / path.lstrip("/")
            assert e.mode == st_.st_mode, path
            assert (
                e.mtime == int(st_.st_mtime_ns // 10**9) and e.mtime_ns == st_.st_mtime_ns % 10**9
            )
            if stat.S_ISLNK(st_.st_mode):
                assert e.symlink == os.readlink(fs_path)
                assert e.size == len(os.readlink(fs_path).encode())
            elif stat.S_ISREG(st_.st_mode):
                assert e.size == st_.st_size
                assert _content(tree, e, read) == fs_path.read_bytes(), path
                assert e.is_chunked == (st_.st_size > CHUNK_SIZE)
            else:
                assert e.is_dir and e.size == st_.st_size
                children = loading(
                    lambda ref: tree.attach(ref.path, load_catalog(read, ref.hash, ref.path)),
                    partial(tree.listing, path),
                )
                assert e.linkcount == 2 + sum(1 for c in children if c.is_dir)
            if e.hardlink_group:
                group = (str(Path(path).parent), e.hardlink_group)
                inode_groups.setdefault(group, set()).add(st_.st_ino)
                members.setdefault(group, []).append(e)
        # One group per inode within a directory; the group's members share one inode.
        for group, inodes in inode_groups.items():
            assert len(inodes) == 1
            assert all(m.linkcount == len(members[group]) > 1 for m in members[group])
