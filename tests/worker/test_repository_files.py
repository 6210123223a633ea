"""A repository's own files as the node's cache service gives them to jobs
(worker/repo/repository_files.py), through a real fetcher and a real server on loopback."""

from __future__ import annotations

import errno
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


def test_catalogs_are_kept_the_manifest_is_always_fresh(
    repo: Repo, served: tuple[StoreServer, Fetcher]
) -> None:
    server, fetcher = served
    files = RepositoryFiles(fetcher)
    raw = files.get(FQRN, ".cvmfspublished")
    root = parse_manifest(raw).manifest.root_catalog
    catalog = f"data/{root.hex[:2]}/{root.hex[2:]}C"
    assert files.get(FQRN, catalog) == (repo.store / FQRN / catalog).read_bytes()
    assert files.get(FQRN, catalog) == files.get(FQRN, catalog)
    assert files.get(FQRN, ".cvmfspublished") == raw
    assert server.requests[f"/cvmfs/{FQRN}/{catalog}"] == 1
    assert server.requests[f"/cvmfs/{FQRN}/.cvmfspublished"] == 2
    assert files.hits == 2


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
