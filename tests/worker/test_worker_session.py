"""WorkerSession: built from the parsed command line, against a real loopback server."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.support.network import dead_url
from tests.support.repos import publish_tree
from tests.support.store_server import StoreServer
from worker.config import parse_exec_args
from worker.namespace import Node
from worker.session import WorkerSession

FQRN = "session.example.org"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("session")
    src = base / "src"
    src.mkdir()
    (src / "small").write_bytes(b"x" * 1000)
    (src / "large").write_bytes(os.urandom(3 << 20))
    (src / "sub").mkdir()
    (src / "sub" / "f").write_bytes(b"f\n")
    publish_tree(src, base / "store", FQRN, base / "keys")
    return base / "store", base / "keys"


def test_session_end_to_end(store: tuple[Path, Path]) -> None:
    root, keys = store
    server = StoreServer(root)
    dead = dead_url()
    try:
        cfg = parse_exec_args(
            [
                "--proxy",
                f"{dead};{server.url}",
                "--keys",
                str(keys),
                "--ram",
                "4M",
                "--repositories",
                FQRN,
                "--stats",
                "--no-shared-cache",
                "--",
                "true",
            ],
            {},
        )
        with WorkerSession(cfg) as s:
            small = s.namespace.resolve(f"/cvmfs/{FQRN}/small".encode())
            large = s.namespace.resolve(f"/cvmfs/{FQRN}/large".encode())
            assert isinstance(small, Node) and isinstance(large, Node)
            obj = s.open_file(small)
            assert not isinstance(obj, int)
            with open(obj.path, "rb") as f:
                assert f.read() == b"x" * 1000
            big = s.open_file(large)
            assert not isinstance(big, int)
            # everything pinned, 4 MiB limit: a second large object cannot come in
            again = s.namespace.resolve(f"/cvmfs/{FQRN}/sub/f".encode())
            assert isinstance(again, Node)
            s.release(big)
            s.release(obj)
            mount = s.namespace.resolve(b"/cvmfs")
            assert isinstance(mount, Node) and s.open_file(mount) == errno.EINVAL
            s.syscalls["openat"] += 3
            stats = "\n".join(s.stats_lines())
            assert "cache: 0 hits, 2 misses" in stats and "trapped syscalls: openat 3" in stats
            assert f"repository {FQRN}: revision 1" in stats
            report = s.check()
            text = "\n".join(map(str, report))
            assert f"FAIL proxy {dead}" in text and f"ok   proxy {server.url}" in text
            assert "signature verified" in text and "RAM cache limit: 4.0 MiB" in text
    finally:
        server.stop()


def test_session_cache_full_is_enomem(store: tuple[Path, Path]) -> None:
    root, _ = store
    server = StoreServer(root)
    try:
        cfg = parse_exec_args(
            ["--proxy", server.url, "--ram", "2M", "--no-shared-cache", "--", "true"], {}
        )
        with WorkerSession(cfg) as s:
            large = s.namespace.resolve(f"/cvmfs/{FQRN}/large".encode())
            assert isinstance(large, Node)
            assert s.open_file(large) == errno.ENOMEM
            assert s.cache.stats.full == 1 and server.count("/large") == 0
            report = "\n".join(map(str, s.check()))
            assert "mounted on first access" in report
    finally:
        server.stop()


def test_answer_for_an_evicted_tmpfs_object_fails_never_opens_another(
    store: tuple[Path, Path],
) -> None:
    """An open's answer names the object's file on the private tmpfs; once the object is gone
    that name fails (ENOENT) and is never given to another object, so a tracee thread that
    was answered but opened late can never read other bytes."""
    from worker.catalog_policy import CatalogPolicy
    from worker.ramfiles import RamFiles, RamFilesError

    try:
        RamFiles("tmpfs").close()
    except RamFilesError as e:
        pytest.skip(f"no private tmpfs on this machine: {e}")
    root, _ = store
    server = StoreServer(root)
    small = f"/cvmfs/{FQRN}/small".encode()
    try:
        argv = ["--proxy", server.url, "--ram-files", "tmpfs", "--no-shared-cache", "--", "true"]
        with WorkerSession(parse_exec_args(argv, {})) as s:
            policy = CatalogPolicy(s)
            node = policy.lookup(os.getpid(), small)
            assert not isinstance(node, int)
            first = policy.open(os.getpid(), small, node)
            assert not isinstance(first, int) and first.stable
            assert Path(os.fsdecode(first.path)).read_bytes() == b"x" * 1000
            policy.close()
            s.cache.close()  # evicts (and unlinks) everything
            with pytest.raises(FileNotFoundError):
                Path(os.fsdecode(first.path)).read_bytes()
            again = CatalogPolicy(s)
            second = again.open(os.getpid(), small, node)
            assert not isinstance(second, int) and second.path != first.path
            assert Path(os.fsdecode(second.path)).read_bytes() == b"x" * 1000
            with pytest.raises(FileNotFoundError):
                Path(os.fsdecode(first.path)).read_bytes()
            again.close()
    finally:
        server.stop()
