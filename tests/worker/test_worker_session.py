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
from worker.repo.namespace import Node
from worker.session import WorkerSession

FQRN = "session.example.org"


def object_url(node: Node) -> str:
    """Where a proxy serves the object of a (not chunked) file."""
    assert node.entry is not None and node.entry.hash is not None
    return f"/cvmfs/{FQRN}/{node.entry.hash.object_path()}"


def resolve(s: WorkerSession, rel: str) -> Node:
    node = s.namespace.resolve(f"/cvmfs/{FQRN}/{rel}".encode())
    assert isinstance(node, Node), (rel, node)
    return node


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("session")
    src = base / "src"
    src.mkdir()
    (src / "small").write_bytes(b"x" * 1000)
    (src / "large").write_bytes(os.urandom(3 << 20))
    (src / "large2").write_bytes(os.urandom(3 << 20))
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
                "--server",
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
            small, large, large2 = (resolve(s, r) for r in ("small", "large", "large2"))
            obj = s.open_file(small)
            assert not isinstance(obj, int)
            with open(obj.path, "rb") as f:
                assert f.read() == b"x" * 1000
            big = s.open_file(large)
            assert not isinstance(big, int)
            # everything pinned, 4 MiB limit: a second large object cannot come in, and is
            # not even fetched (the catalog's size says it cannot fit)
            assert s.open_file(large2) == errno.ENOMEM
            assert s.cache.stats.full == 1 and server.requests[object_url(large2)] == 0
            assert big.key in s.cache and obj.key in s.cache  # the pinned ones stay
            with open(big.path, "rb") as f:
                assert len(f.read()) == 3 << 20
            # unpinned, the first large object makes room for the second
            s.release(big)
            big2 = s.open_file(large2)
            assert not isinstance(big2, int) and big.key not in s.cache
            assert s.cache.stats.evictions == 1 and server.requests[object_url(large2)] == 1
            s.release(big2)
            s.release(obj)
            mount = s.namespace.resolve(b"/cvmfs")
            assert isinstance(mount, Node) and s.open_file(mount) == errno.EINVAL
            # --stats reports the counters the cache and the fetcher keep: three loads, the
            # refusal, the eviction; every request the server saw, plus the dead proxy's try
            fetches = server.total + s.fetcher.stats.by_proxy[dead].requests
            assert s.fetcher.stats.by_proxy[dead].requests == 1
            stats = "\n".join(s.stats_lines())
            assert "cache: 0 hits, 3 misses, 0 waits" in stats, stats
            assert "1 evictions (3.0 MiB), 1 cache-full" in stats, stats
            assert f"fetch: {fetches} requests" in stats and "1 failures" in stats, stats
            assert f"repository {FQRN}: revision 1" in stats
            report = s.check()
            text = "\n".join(map(str, report))
            assert f"FAIL server {dead}" in text and f"ok   server {server.url}" in text
            assert "signature verified" in text and "RAM cache limit: 4.0 MiB" in text
    finally:
        server.stop()


def test_session_cache_full_is_enomem(store: tuple[Path, Path]) -> None:
    root, _ = store
    server = StoreServer(root)
    try:
        cfg = parse_exec_args(
            ["--server", server.url, "--ram", "2M", "--no-shared-cache", "--", "true"], {}
        )
        with WorkerSession(cfg) as s:
            large = resolve(s, "large")
            assert s.open_file(large) == errno.ENOMEM
            # refused from the catalog's size: the stored object was never asked for
            assert (root / object_url(large).removeprefix("/cvmfs/")).is_file()
            assert s.cache.stats.full == 1 and server.requests[object_url(large)] == 0
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
    from worker.ram.ramfiles import RamFiles, RamFilesError

    try:
        RamFiles("tmpfs").close()
    except RamFilesError as e:
        pytest.skip(f"no private tmpfs on this machine: {e}")
    root, _ = store
    server = StoreServer(root)
    small = f"/cvmfs/{FQRN}/small".encode()
    try:
        argv = ["--server", server.url, "--ram-files", "tmpfs", "--no-shared-cache", "--", "true"]
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


def test_answer_for_an_evicted_memfd_object_fails_never_opens_another(
    store: tuple[Path, Path],
) -> None:
    """With sealed memfds an open's answer is ``/proc/<pid>/fd/<n>`` of the policy's own
    duplicate. When RAM pressure unpins objects whose answers may still be in flight, a
    tombstone takes their numbers: a tracee thread that was answered but opens late gets
    ENXIO, never the bytes of whatever object is cached next (README: known limits)."""
    from worker.catalog_policy import CatalogPolicy

    root, _ = store
    server = StoreServer(root)
    paths = {r: f"/cvmfs/{FQRN}/{r}".encode() for r in ("small", "large", "large2")}
    argv = ["--server", server.url, "--ram", "4M", "--ram-files", "memfd"]
    try:
        with WorkerSession(parse_exec_args([*argv, "--no-shared-cache", "--", "true"], {})) as s:
            assert s.cache.files.backing == "memfd"
            policy = CatalogPolicy(s, grace=60.0)  # nothing is unpinned for its age
            pid = os.getpid()
            answers = {}
            for rel in ("small", "large"):
                node = policy.lookup(pid, paths[rel])
                assert not isinstance(node, int)
                opened = policy.open(pid, paths[rel], node)
                assert not isinstance(opened, int) and opened.stable
                answers[rel] = os.fsdecode(opened.path)
                assert answers[rel].startswith(f"/proc/{pid}/fd/")
            assert Path(answers["small"]).read_bytes() == b"x" * 1000
            large_bytes = (root.parent / "src" / "large").read_bytes()
            assert Path(answers["large"]).read_bytes() == large_bytes
            # 1000 B + 3 MiB pinned, 4 MiB limit: the next 3 MiB object needs both unpinned
            node = policy.lookup(pid, paths["large2"])
            assert not isinstance(node, int)
            third = policy.open(pid, paths["large2"], node)
            assert not isinstance(third, int)
            assert policy.unpinned == 2 and s.cache.stats.evictions == 2
            assert os.fsdecode(third.path) not in answers.values()
            assert (
                Path(os.fsdecode(third.path)).read_bytes()
                == (root.parent / "src" / "large2").read_bytes()
            )
            for rel in ("small", "large"):  # the late opens of the earlier answers
                with pytest.raises(OSError) as info:
                    Path(answers[rel]).read_bytes()
                assert info.value.errno == errno.ENXIO, (rel, info.value)
            policy.close()
    finally:
        server.stop()
