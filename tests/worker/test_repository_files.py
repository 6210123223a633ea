"""A repository's own files as the node's cache service gives them to jobs
(worker/repo/repository_files.py), through a real fetcher and a real server on loopback."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_format.manifest import parse_manifest
from cvmfs_format.proxies import parse_server_templates
from tests.support.repos import Repo, publish_tree
from tests.support.store_server import StoreServer
from worker.repo.fetcher import Fetcher
from worker.repo.repository import RepositoryError
from worker.repo.repository_files import RepositoryFiles, is_repository_file

FQRN = "meta.example.org"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    base = tmp_path_factory.mktemp("meta")
    (base / "src" / "d").mkdir(parents=True)
    (base / "src" / "d" / "f").write_bytes(b"file\n")
    return publish_tree(base / "src", base / "store", FQRN, base / "keys")[0]


@pytest.fixture
def served(repo: Repo) -> Iterator[tuple[StoreServer, Fetcher]]:
    server = StoreServer(repo.store)
    fetcher = Fetcher(parse_server_templates(server.url)).start()
    yield server, fetcher
    fetcher.close()
    server.stop()


def test_only_a_repositorys_own_files_may_be_asked_for() -> None:
    assert is_repository_file(FQRN, ".cvmfspublished")
    assert is_repository_file(FQRN, ".cvmfswhitelist")
    assert is_repository_file(FQRN, "data/ab/" + "c" * 38 + "C")  # a catalog
    assert is_repository_file(FQRN, "data/ab/" + "c" * 38 + "X")  # a certificate
    for fqrn, path in [
        (FQRN, "data/ab/" + "c" * 38),  # a file object: those go through ``open``
        (FQRN, "data/ab/" + "c" * 38 + "P"),
        (FQRN, "../../etc/passwd"),
        (FQRN, ".cvmfspublished/../x"),
        ("lib", ".cvmfspublished"),  # not a repository name
        ("a.b/../c.d", ".cvmfspublished"),
    ]:
        assert not is_repository_file(fqrn, path), (fqrn, path)


def test_catalogs_are_kept_inflated_the_manifest_is_always_fresh(
    repo: Repo, served: tuple[StoreServer, Fetcher]
) -> None:
    """A catalog is fetched, verified and inflated once: every job gets a sealed memfd of
    the same SQLite bytes; the manifest is fetched for every job."""
    server, fetcher = served
    files = RepositoryFiles(fetcher)
    raw = files.get(FQRN, ".cvmfspublished")
    root = parse_manifest(raw).manifest.root_catalog
    catalog = f"data/{root.hex[:2]}/{root.hex[2:]}C"
    want = zlib.decompress((repo.store / FQRN / catalog).read_bytes())
    for _ in range(3):
        fd, size = files.catalog(FQRN, catalog)
        try:
            assert size == len(want) and os.pread(fd, size + 1, 0) == want
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE  # no one can change it
        finally:
            os.close(fd)
    assert files.get(FQRN, ".cvmfspublished") == raw
    assert server.requests[f"/cvmfs/{FQRN}/{catalog}"] == 1
    assert server.requests[f"/cvmfs/{FQRN}/.cvmfspublished"] == 2
    assert files.hits == 2
    files.close()


def test_kept_catalogs_stay_within_their_budget(
    repo: Repo, served: tuple[StoreServer, Fetcher]
) -> None:
    """Past the budget the oldest catalog goes (its memfd closed: no fd leaks); a job's own
    fd of it stays readable."""
    server, fetcher = served
    root = parse_manifest(RepositoryFiles(fetcher).get(FQRN, ".cvmfspublished")).manifest
    catalog = f"data/{root.root_catalog.hex[:2]}/{root.root_catalog.hex[2:]}C"
    size = len(zlib.decompress((repo.store / FQRN / catalog).read_bytes()))
    before = len(os.listdir("/proc/self/fd"))
    files = RepositoryFiles(fetcher, kept_bytes=size - 1)  # too big to keep
    fd, _ = files.catalog(FQRN, catalog)
    assert len(os.listdir("/proc/self/fd")) == before + 1  # only the caller's own
    assert os.pread(fd, 16, 0) == b"SQLite format 3\0"
    os.close(fd)
    os.close(files.catalog(FQRN, catalog)[0])
    assert server.requests[f"/cvmfs/{FQRN}/{catalog}"] == 2  # not kept: fetched again
    files.close()


@pytest.mark.parametrize("stored", ["not zlib at all", "bomb"])
def test_a_catalog_that_does_not_inflate_is_one_line_and_kept_nowhere(
    repo: Repo, tmp_path: Path, stored: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored bytes that match their name but do not inflate (or inflate past the catalog
    limit) are EIO with one line, and nothing is kept."""
    from cvmfs_format import catalog as catalog_format

    data = b"x" * 100 if stored != "bomb" else zlib.compress(b"\0" * (4 << 20))
    digest = hashlib.sha1(data).hexdigest()
    path = f"data/{digest[:2]}/{digest[2:]}C"
    (tmp_path / FQRN / "data" / digest[:2]).mkdir(parents=True)
    (tmp_path / FQRN / path).write_bytes(data)
    server = StoreServer(tmp_path)
    fetcher = Fetcher(parse_server_templates(server.url)).start()
    monkeypatch.setattr(catalog_format, "MAX_CATALOG_BYTES", 1 << 20)  # the bomb makes 4 MiB
    try:
        files = RepositoryFiles(fetcher)
        with pytest.raises(RepositoryError) as e:
            files.catalog(FQRN, path)
        assert e.value.errno == errno.EIO and "\n" not in str(e.value)
        assert f"{FQRN}/{path}" in str(e.value)
        assert not files._kept
    finally:
        fetcher.close()
        server.stop()


def test_errors_are_one_line_with_an_errno(
    repo: Repo, served: tuple[StoreServer, Fetcher], tmp_path: Path
) -> None:
    _, fetcher = served
    files = RepositoryFiles(fetcher)
    with pytest.raises(RepositoryError) as e:
        files.get("other.example.org", ".cvmfspublished")
    assert e.value.errno == errno.ENOENT and "other.example.org" in str(e.value)
    with pytest.raises(RepositoryError) as e:
        files.get(FQRN, "../../etc/passwd")
    assert e.value.errno == errno.EINVAL
    assert str(e.value) == f"{FQRN}/../../etc/passwd: not a repository file"
    missing = "data/00/" + "0" * 38 + "C"
    with pytest.raises(RepositoryError) as e:
        files.get(FQRN, missing)
    assert e.value.errno == errno.ENOENT and "\n" not in str(e.value)
