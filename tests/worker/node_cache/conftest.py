"""Fixtures of the node cache tests: the tree, hep-proxy or a store server, the runtime
directory, and the reaping of jobs a failed test left running."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.node_cache import BLOB, FQRN, TREE_MB, Job, Tree
from tests.support.proxy_process import ProxyProcess, start_proxy
from tests.support.repos import publish_tree
from tests.support.store_server import StoreServer
from tests.support.tracing import ensure_built


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """A published tree: many 512 KiB files, small ones, one chunked file."""
    base = tmp_path_factory.mktemp("nodecache")
    src = base / "src"
    rng = random.Random(11)
    files: dict[str, bytes] = {}
    big = max(1, (TREE_MB - 10) * 2)  # 512 KiB each, the rest: chunked file + small ones
    for i in range(big):
        files[f"/data/d{i % 8}/blob{i}.bin"] = rng.randbytes(BLOB)
    for i in range(100):
        files[f"/lib/pkg{i % 5}/mod{i}.py"] = f"x = {i}\n".encode() * rng.randint(1, 200)
    files["/big/chunked.bin"] = rng.randbytes(9 * 1024 * 1024 + 77)
    for rel, data in files.items():
        p = src / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    repo, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    os.chmod(base, 0o755)  # a second user reads nothing here, but the service user may
    return Tree(repo, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()})


@pytest.fixture(scope="module")
def tracing() -> None:
    """Skip where ptrace/seccomp are forbidden; first, before this process has children (the
    tracer's self-check waits for any child)."""
    ensure_built()


@pytest.fixture
def server(tree: Tree) -> Iterator[StoreServer]:
    s = StoreServer(tree.store)
    yield s
    s.stop()


@pytest.fixture
def proxy(tree: Tree, tmp_path: Path) -> Iterator[ProxyProcess]:
    """hep-proxy serving the tree on 127.0.0.1, with an access log."""
    p = start_proxy(tmp_path / "proxy", "--store", str(tree.store))
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def reap_jobs() -> Iterator[None]:
    """Kill the hep-exec jobs a test left running (a failed test), and reap them all."""
    yield
    while Job.started:
        job = Job.started.pop()
        if job.proc.poll() is None:
            job.proc.kill()  # its traced command dies with it (PTRACE_O_EXITKILL)
        job.proc.communicate()
