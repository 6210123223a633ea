"""Mounted repositories over real loopback servers: signatures, lazy catalogs, objects."""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_format.manifest import parse_manifest
from cvmfs_format.proxies import parse_server_templates
from cvmfs_format.rsa_keys import RsaPublicKey
from cvmfs_format.store import LocalRepository
from cvmfs_format.verify import load_catalog, loading, open_tree, walk
from cvmfs_format.whitelist import load_public_key
from tests.support.repos import Repo, publish_tree
from tests.support.store_server import StoreServer
from tests.support.trees import CHUNKED_SIZE, make_random_tree
from tests.support.waiting import wait_until
from worker.ram.ramcache import CachedObject, CacheFull, RamCache
from worker.repo.fetcher import Fetcher
from worker.repo.repository import MountedRepository, Repositories, RepositoryError

FQRN = "repo.example.org"


@dataclass
class Mirrors:
    """The published repository (and its source tree) behind two StoreServers."""

    repo: Repo
    src: Path
    servers: list[StoreServer]

    @property
    def proxies(self) -> str:
        """The two servers as fail-over groups: the first, then the second."""
        return ";".join(s.url for s in self.servers)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Path]:
    base = tmp_path_factory.mktemp("repo")
    src = make_random_tree(base / "src", random.Random(5), files=80)
    (src / "big.bin").write_bytes(random.Random(9).randbytes(CHUNKED_SIZE))
    repo, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    return repo, src


@pytest.fixture
def served(published: tuple[Repo, Path]) -> Iterator[Mirrors]:
    repo, src = published
    servers = [StoreServer(repo.store), StoreServer(repo.store)]
    yield Mirrors(repo, src, servers)
    for s in servers:
        s.stop()


def master_key(repo: Repo) -> list[RsaPublicKey]:
    return [load_public_key(repo.master_pub.read_bytes(), str(repo.master_pub))]


def files_of(src: Path) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(src):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append("/" + os.path.relpath(p, src))
    return sorted(out)


def read_object(repo: MountedRepository, rel: str) -> bytes:
    entry = repo.lookup(rel)
    assert entry is not None, rel
    obj = repo.open_object(entry)
    try:
        with open(obj.path, "rb") as f:
            return f.read()
    finally:
        repo.cache.release(obj)


def test_signed_mount_and_contents(served: Mirrors) -> None:
    with Fetcher(parse_server_templates(served.proxies)).start() as f:
        repo = MountedRepository(FQRN, f, master_key(served.repo))
        assert repo.verified and repo.revision == 1
        for rel in files_of(served.src):
            assert read_object(repo, rel) == (served.src / rel[1:]).read_bytes(), rel


def test_wrong_master_key_refuses_to_mount(served: Mirrors, tmp_path: Path) -> None:
    import datetime as dt

    from publish.keys import load_or_create_keys

    load_or_create_keys(tmp_path, "other.example.org", dt.datetime.now(dt.UTC))
    other = load_public_key((tmp_path / "other.example.org.pub").read_bytes(), "other")
    with (
        Fetcher(parse_server_templates(served.proxies)).start() as f,
        pytest.raises(RepositoryError) as info,
    ):
        MountedRepository(FQRN, f, [other])
    assert info.value.errno == errno.EIO
    assert FQRN in str(info.value) and "\n" not in str(info.value)


def test_corrupt_manifest_on_one_proxy(served: Mirrors) -> None:
    bad = served.servers[0]
    bad.corrupt.add(f"/cvmfs/{FQRN}/.cvmfspublished")
    with Fetcher(parse_server_templates(served.proxies)).start() as f:
        repo = MountedRepository(FQRN, f, master_key(served.repo))
        assert repo.revision == 1 and f.stats.corrupt == 1


def test_corrupt_objects_never_reach_the_cache(served: Mirrors) -> None:
    """Every data object is corrupt on the first proxy: all content still right."""
    bad = served.servers[0]
    bad.corrupt.update(f"/cvmfs/{FQRN}/{rel}" for rel in served.repo.objects())
    with Fetcher(parse_server_templates(served.proxies)).start() as f:
        repo = MountedRepository(FQRN, f, master_key(served.repo))
        assert read_object(repo, "/big.bin") == (served.src / "big.bin").read_bytes()
        for rel in files_of(served.src)[:20]:
            assert read_object(repo, rel) == (served.src / rel[1:]).read_bytes()
        # the first wrong answer: that proxy is tried last from then on
        assert f.stats.corrupt >= 1 and f.stats.by_proxy[bad.url].dead_until > 0
        assert f.stats.by_proxy[bad.url].requests < 5


def test_an_answer_wrong_in_its_middle_is_not_what_the_file_keeps(tmp_path: Path) -> None:
    """An object is inflated into its RAM file chunk by chunk as it arrives; when the answer
    turns out wrong (its hash, at its end) the next server's answer is written again from
    the first byte: the file is exactly the object, for data zlib stores as it is (a wrong
    byte inflates to a wrong byte) and for data it codes (a wrong byte breaks the stream)."""
    src = tmp_path / "src"
    src.mkdir()
    stored_raw = random.Random(3).randbytes(3 << 20)  # below the 4 MiB chunks: one object
    coded = b"".join(b"line %d of a log that compresses\n" % i for i in range(60_000))
    (src / "random.bin").write_bytes(stored_raw)
    (src / "text.log").write_bytes(coded)
    repo, _ = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    bad, good = StoreServer(repo.store), StoreServer(repo.store)
    try:
        for name, data in (("random.bin", stored_raw), ("text.log", coded)):
            # a fetcher each: after a wrong answer the first server is asked last for a while
            with Fetcher(parse_server_templates(f"{bad.url};{good.url}")).start() as f:
                mounted = MountedRepository(FQRN, f, master_key(repo))
                entry = mounted.lookup(f"/{name}")
                assert entry is not None and entry.hash is not None and not entry.is_chunked
                url = f"/cvmfs/{FQRN}/{entry.hash.object_path()}"
                bad.corrupt_middle.add(url)
                assert read_object(mounted, f"/{name}") == data, name
                assert f.stats.corrupt == 1 and (bad.requests[url], good.requests[url]) == (1, 1)
    finally:
        bad.stop()
        good.stop()


def test_corrupt_everywhere_is_eio(served: Mirrors) -> None:
    rel = next(
        r for r in files_of(served.src) if 10 < (served.src / r[1:]).stat().st_size < 1 << 20
    )
    with Fetcher(parse_server_templates(served.proxies), retries=0).start() as f:
        repo = MountedRepository(FQRN, f)
        entry = repo.lookup(rel)
        assert entry is not None and entry.hash is not None
        url = f"/cvmfs/{FQRN}/{entry.hash.object_path()}"
        for s in served.servers:
            s.corrupt.add(url)
        with pytest.raises(RepositoryError) as info:
            repo.open_object(entry)
        assert info.value.errno == errno.EIO and "hash mismatch" in str(info.value)
        assert entry.hash.hex not in repo.cache


def test_concurrent_opens_make_one_request(served: Mirrors) -> None:
    """8 threads open a chunked file while its chunks' answers are held: one load, each
    chunk requested once, every thread gets the same pinned object."""
    server = served.servers[0]
    with Fetcher(parse_server_templates(server.url)).start() as f:
        repo = MountedRepository(FQRN, f)
        entry = repo.lookup("/big.bin")
        assert entry is not None and entry.is_chunked
        chunks = [f"/cvmfs/{FQRN}/{c.hash.object_path('P')}" for c in repo.chunks("/big.bin")]
        assert len(chunks) == 3
        server.gated.update(chunks)
        objs: list[CachedObject] = []
        threads = [
            threading.Thread(target=lambda: objs.append(repo.open_object(entry))) for _ in range(8)
        ]
        for t in threads:
            t.start()
        wait_until(
            lambda: repo.cache.stats.waits == 7 and sum(server.held.values()) == 3,
            what="7 opens waiting for the one load, whose 3 chunk requests are held",
        )
        server.open_gate()
        for t in threads:
            t.join(20)
        assert len(objs) == 8 and all(o is objs[0] for o in objs)
        assert objs[0].refs == 8 and objs[0].size == CHUNKED_SIZE
        assert [server.requests[c] for c in chunks] == [1, 1, 1]  # each chunk requested once
        assert repo.cache.stats.misses == 1
        for o in objs:
            repo.cache.release(o)


def test_ram_limit_smaller_than_working_set(served: Mirrors) -> None:
    total = sum((served.src / r[1:]).stat().st_size for r in files_of(served.src))
    cache = RamCache(CHUNKED_SIZE + (total - CHUNKED_SIZE) // 3)
    with Fetcher(parse_server_templates(served.proxies)).start() as f:
        repo = MountedRepository(FQRN, f, cache=cache)
        for _ in range(2):
            for rel in files_of(served.src):
                assert read_object(repo, rel) == (served.src / rel[1:]).read_bytes()
                assert cache.used_bytes <= cache.limit
        assert cache.stats.evictions > 0
        # with every pin held, a new object cannot come in
        small = [r for r in files_of(served.src) if (served.src / r[1:]).stat().st_size > 1000]
        held = []
        with pytest.raises(CacheFull):
            for rel in ["/big.bin", *small]:
                entry = repo.lookup(rel)
                assert entry is not None
                held.append(repo.open_object(entry))
        for o in held:
            cache.release(o)


def test_the_real_2015_repository(fixture_repo: Repo) -> None:
    server = StoreServer(fixture_repo.store)
    try:
        with Fetcher(parse_server_templates(server.url)).start() as f:
            repo = MountedRepository(
                fixture_repo.fqrn,
                f,
                master_key(fixture_repo),
            )
            local = LocalRepository(fixture_repo.store, fixture_repo.fqrn)
            tree = open_tree(local.read, parse_manifest(local.read_manifest()).manifest)
            files = 0
            for want in walk(tree, local.read):
                got = repo.lookup(want.path)
                assert got == want
                if want.is_dir:
                    expected = loading(
                        lambda ref: tree.attach(
                            ref.path, load_catalog(local.read, ref.hash, ref.path)
                        ),
                        lambda: tree.listing(want.path),  # noqa: B023
                    )
                    assert repo.listing(want.path) == expected
                elif want.is_regular and files < 50:
                    data = read_object(repo, want.path)
                    assert len(data) == want.size
                    files += 1
            assert files > 0 and repo.catalogs_loaded == len(tree.catalogs)
    finally:
        server.stop()


def test_repositories_mount_once_and_remember_failures(served: Mirrors) -> None:
    with Fetcher(parse_server_templates(served.proxies)).start() as f:
        repos = Repositories(f)
        got: list[MountedRepository] = []
        threads = [threading.Thread(target=lambda: got.append(repos.get(FQRN))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(got) == 6 and all(r is got[0] for r in got)
        assert sum(s.count(f"{FQRN}/.cvmfspublished") for s in served.servers) == 1
        assert repos.names() == [FQRN]
        for _ in range(3):
            with pytest.raises(RepositoryError) as info:
                repos.get("missing.example.org")
            assert info.value.errno == errno.ENOENT
        assert sum(s.count("missing.example.org/.cvmfspublished") for s in served.servers) == 2


def test_store_copy_without_catalog_is_eio(served: Mirrors, tmp_path: Path) -> None:
    """A store that lost its nested or root catalog object gives EIO naming the repository."""
    broken = tmp_path / "store"
    shutil.copytree(served.repo.store, broken)
    manifest = parse_manifest((broken / FQRN / ".cvmfspublished").read_bytes()).manifest
    (broken / FQRN / manifest.root_catalog.object_path("C")).unlink()
    server = StoreServer(broken)
    try:
        with Fetcher(parse_server_templates(server.url)).start() as f:
            with pytest.raises(RepositoryError) as info:
                MountedRepository(FQRN, f)
            assert info.value.errno == errno.EIO and "root catalog" in str(info.value)
    finally:
        server.stop()
